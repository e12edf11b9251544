"""Stages as data: exact trainable sets per stage on real model layouts."""

from __future__ import annotations

import re

import pytest

from evip.stages import PARAM_GROUPS, STAGES, group_of, parameter_groups, set_trainable, stage_spec
from mono import MonoInternVL
from tests.mono.conftest import tiny_config


@pytest.fixture(scope="module")
def release_model(release_ckpt):
    return MonoInternVL.from_pretrained(release_ckpt)


def _collapse(names):
    return sorted({re.sub(r"layers\.\d+", "layers.N", n) for n in names})


def test_s1_trainable_set_is_exactly_the_visual_parameters(release_model):
    for stage in ("s1.1", "s1.2"):
        names = set_trainable(release_model, stage_spec(stage).trainable)
        assert _collapse(names) == [
            "language_model.model.layers.N.feed_forward_ve.w1.weight",
            "language_model.model.layers.N.feed_forward_ve.w2.weight",
            "language_model.model.layers.N.feed_forward_ve.w3.weight",
            "mlp1.0.bias", "mlp1.0.weight", "mlp1.1.bias", "mlp1.1.weight", "mlp1.3.bias", "mlp1.3.weight",
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.patch_embedding.bias",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding",
        ]
        frozen = [n for n, p in release_model.named_parameters() if not p.requires_grad]
        assert all(n.startswith("language_model.") and "feed_forward_ve" not in n for n in frozen)
        # the whole text path is frozen: embeddings, attention, text FFN, norms, output head
        assert {group_of(n) for n in frozen} == {"attention", "text_ffn", "norms", "embeddings", "lm_head"}


def test_s1_3_adds_attention_and_s2_trains_everything(release_model):
    names = set(set_trainable(release_model, stage_spec("s1.3").trainable))
    s1 = set(set_trainable(release_model, stage_spec("s1.2").trainable))
    added = _collapse(set(names) - s1)
    assert added == ["language_model.model.layers.N.attention.wo.weight", "language_model.model.layers.N.attention.wqkv.weight"]
    names = set_trainable(release_model, stage_spec("s2").trainable)
    assert len(names) == sum(1 for _ in release_model.parameters())
    assert all(p.requires_grad for p in release_model.parameters())


def test_every_parameter_in_exactly_one_group_including_attention_experts():
    model = MonoInternVL(tiny_config(visual_attention_experts=True, bias=False))
    groups = parameter_groups(model)
    assert sum(len(v) for v in groups.values()) == sum(1 for _ in model.parameters())
    assert any("attention_ve" in n for n in groups["visual_experts"])
    names = set_trainable(model, stage_spec("s1.1").trainable)
    assert any("attention_ve.wqkv" in n for n in names) and not any(".attention.wqkv" in n for n in names)


def test_unclassified_or_ambiguous_parameter_is_an_error():
    with pytest.raises(ValueError, match="no parameter group"):
        group_of("language_model.model.layers.0.new_adapter.weight")
    with pytest.raises(ValueError, match="unknown parameter group"):
        set_trainable(MonoInternVL(tiny_config()), ("patch_embed", "lora"))


def test_stage_lookup_and_defaults():
    assert list(STAGES) == ["s1.1", "s1.2", "s1.3", "s2"]
    assert stage_spec("S2").lr == 4e-5 and stage_spec("s2").trainable == tuple(PARAM_GROUPS)
    assert stage_spec("s1.1").init == "llm" and all(STAGES[s].init == "previous" for s in ("s1.2", "s1.3", "s2"))
    with pytest.raises(ValueError, match="s1.1, s1.2, s1.3, s2"):
        stage_spec("s3")


def test_delta_tuning_off_trains_every_group_in_every_stage():
    from evip.config import from_dict
    from evip.job import JobConfig
    from evip.stages import PARAM_GROUPS

    for stage in ("s1.1", "s1.2", "s1.3", "s2"):
        on = from_dict(JobConfig, {"stage": stage, "output_dir": "x"})
        off = from_dict(JobConfig, {"stage": stage, "output_dir": "x", "delta_tuning": False})
        assert off.trainable_groups == tuple(PARAM_GROUPS)
        assert on.trainable_groups == on.spec.trainable
