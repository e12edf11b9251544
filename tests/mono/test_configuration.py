import json

import pytest
from transformers import AutoConfig

from mono import InternLM2Config, MonoInternVLConfig


def test_release_config_round_trip_keeps_every_field(release_ckpt, tmp_path):
    source = json.loads((release_ckpt / "config.json").read_text())
    config = MonoInternVLConfig.from_pretrained(release_ckpt)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == source


def test_unknown_fields_preserved_at_every_level(release_ckpt, tmp_path):
    source = json.loads((release_ckpt / "config.json").read_text())
    source["my_outer_field"] = {"a": [1, 2]}
    source["llm_config"]["my_llm_field"] = "x"
    source["vision_config"]["my_vision_field"] = 3.5
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(source))
    MonoInternVLConfig.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == source


def test_typed_fields_read_from_release(release_ckpt):
    config = MonoInternVLConfig.from_pretrained(release_ckpt)
    assert config.tokens_per_tile == 4
    assert config.llm_config.head_dim == 12
    assert config.llm_config.has_visual_experts
    assert config.vision_config.hidden_size == 24
    assert config.img_context_token_id == 100


def test_autoconfig_resolves_release_folder(release_ckpt, auto_classes):
    assert isinstance(AutoConfig.from_pretrained(release_ckpt), MonoInternVLConfig)


def test_import_leaves_internvl_chat_to_remote_code(release_ckpt):
    """Importing mono must not claim ``internvl_chat`` (see mono/__init__.py); the decoder type it does claim."""
    import mono  # noqa: F401
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert "internvl_chat" not in CONFIG_MAPPING
    assert CONFIG_MAPPING["internlm2"] is InternLM2Config
    with pytest.raises(ValueError, match="internvl_chat"):
        AutoConfig.from_pretrained(release_ckpt)  # no local class, remote code not trusted


def test_written_architectures_are_the_release_switches():
    d = MonoInternVLConfig().to_dict()
    assert d["architectures"] == ["InternVLChatModel"]
    assert d["model_type"] == "internvl_chat"
    assert d["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    assert d["vision_config"]["model_type"] == "intern_vit_patch"
    assert "visual_attention_experts" not in d["llm_config"]


def test_visual_attention_experts_flag_written_only_when_on():
    on = MonoInternVLConfig(llm_config={"visual_attention_experts": True}).to_dict()
    assert on["llm_config"]["visual_attention_experts"] is True


def test_unsupported_llm_architecture_is_an_error():
    with pytest.raises(ValueError, match="InternLM2VEForCausalLM"):
        MonoInternVLConfig(llm_config={"architectures": ["InternLM2ForCausalLM"]})
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        InternLM2Config(architectures=["LlamaForCausalLM"])


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_key_value_heads", 3, "num_key_value_heads"),
        ("rope_scaling", {"type": "yarn", "factor": 2.0}, "rope_scaling.type"),
        ("rope_scaling", {"type": "dynamic", "factor": 0.5}, "factor"),
        ("hidden_act", "gelu", "hidden_act"),
    ],
)
def test_bad_llm_fields_name_the_key(field, value, match):
    with pytest.raises(ValueError, match=match):
        InternLM2Config(**{field: value})


def test_bad_outer_fields_name_the_key():
    with pytest.raises(ValueError, match="ps_version"):
        MonoInternVLConfig(ps_version="v3")
    with pytest.raises(ValueError, match="min_dynamic_patch"):
        MonoInternVLConfig(min_dynamic_patch=4, max_dynamic_patch=2)


def test_non_mono_checkpoint_gets_the_outer_explanation(tmp_path):
    import json as _json

    (tmp_path / "config.json").write_text(
        _json.dumps({"model_type": "internvl_chat", "llm_config": {"architectures": ["Qwen2ForCausalLM"]}})
    )
    with pytest.raises(ValueError, match="vision transformer"):
        MonoInternVLConfig.from_pretrained(tmp_path)


def test_visual_attention_experts_refuse_biases():
    with pytest.raises(ValueError, match="bias"):
        InternLM2Config(visual_attention_experts=True, bias=True)
