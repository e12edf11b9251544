"""The trainer end to end on a tiny LLM and tiny datasets: what trains, what stays frozen, loss, resume, bad data,
non-finite steps, export, the stage chain and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evip.config import from_dict
from evip.job import JobConfig
from evip.loss import weighted_ce
from evip.recipe import run_recipe, stage_jobs
from evip.stages import group_of
from evip.train import NonFiniteError, Trainer, train
from mono import MonoInternVL
from tests.evip.fixtures import BAD_CASES, tiny_bpe_tokenizer, write_conversations, write_pairs_webdataset
from tests.evip.tiny_llm import save_tiny_llm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evip-train")
    tokenizer = tiny_bpe_tokenizer()
    return {
        "root": root,
        "llm": save_tiny_llm(root / "llm", tokenizer),
        "pairs": write_pairs_webdataset(root / "pairs", 12, seed=0),
        "convs": write_conversations(root / "convs", 12, seed=1),
        "bad_pairs": write_pairs_webdataset(root / "bad_pairs", 6, seed=2, bad=BAD_CASES),
        "bad_convs": write_conversations(root / "bad_convs", 6, seed=3, bad=BAD_CASES),
    }


def job_dict(ws: dict, stage: str, out: Path, dataset: str = "pairs", init=None, **sections) -> dict:
    cfg = {
        "stage": stage,
        "output_dir": str(out),
        "model": {"init": str(init or ws["llm"]), "image_size": 56, "vision_hidden_size": 16},
        "data": {"datasets": [{"path": str(ws[dataset].path), "format": ws[dataset].format}], "max_seq_len": 512},
        "optim": {"lr": 2e-3},
        "schedule": {"steps": 4},
        "logging": {"every": 1, "progress": "off", "tensorboard": False},
        "checkpoint": {"every": 100},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def make_job(*args, **kwargs) -> JobConfig:
    return from_dict(JobConfig, job_dict(*args, **kwargs))


def test_s1_1_trains_exactly_the_visual_parts_and_exports(workspace, tmp_path):
    start = MonoInternVL.from_llm(
        str(workspace["llm"]), tokenizer=tiny_bpe_tokenizer(), image_size=56, vision_hidden_size=16, seed=0,
        dtype=torch.float32,
    )
    before = {k: v.clone() for k, v in start.state_dict().items()}
    result = train(make_job(workspace, "s1.1", tmp_path / "run", data={"max_tiles": 3}))
    assert result.step == 4 and result.export_dir == tmp_path / "run" / "export"
    trained = MonoInternVL.from_pretrained(result.export_dir, dtype=torch.float32)
    # the training tile cap is the exported inference default (the start had the release's 6)
    assert start.config.max_dynamic_patch == 6 and trained.config.max_dynamic_patch == 3
    after = trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    visual = {k for k in before if group_of(k) in ("patch_embed", "projector", "visual_experts")}
    assert changed and changed <= visual
    assert {group_of(k) for k in changed} == {"patch_embed", "projector", "visual_experts"}
    # the language model is untouched: text-only logits are bit-identical to the converted LLM's
    ids = torch.tensor([[1, 17, 33, 5, 60, 8]])
    with torch.no_grad():
        assert torch.equal(start.eval()(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step-00000004" / "meta.json").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(x["tokens_per_s/visual"] > 0 and x["tokens_per_s/text"] > 0 for x in lines)


def test_tiny_run_loss_decreases(workspace, tmp_path):
    job = make_job(
        workspace, "s2", tmp_path / "run", dataset="convs",
        schedule={"steps": 24}, optim={"lr": 3e-3}, checkpoint={"every": 100, "export": False},
    )
    # S2 normally starts from a Mono folder; start it from the plain LLM by converting first.
    mono_dir = tmp_path / "mono"
    MonoInternVL.from_llm(
        str(workspace["llm"]), tokenizer=tiny_bpe_tokenizer(), image_size=56, vision_hidden_size=16, dtype=torch.float32
    ).save_pretrained(mono_dir)
    tiny_bpe_tokenizer().save_pretrained(mono_dir)
    job.model.init = mono_dir
    losses = list(train(job).losses.values())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses


@pytest.mark.parametrize("packing", [True, False])
def test_stop_and_resume_is_bit_identical(workspace, tmp_path, packing):
    sections = dict(
        data={"packing": packing, "micro_batch_size": 2, "num_workers": 0},
        schedule={"steps": 6, "grad_accum": 2},
        checkpoint={"every": 100, "export": False},
    )
    whole = train(make_job(workspace, "s1.1", tmp_path / "whole", **sections)).losses
    first = train(make_job(workspace, "s1.1", tmp_path / "split", **sections), stop_at=3).losses
    second = Trainer(make_job(workspace, "s1.1", tmp_path / "split", **sections)).run().losses
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    assert {**first, **second} == whole  # exact float equality


def test_every_bad_sample_is_skipped_and_counted(workspace, tmp_path):
    pairs, convs = workspace["bad_pairs"], workspace["bad_convs"]
    cfg = job_dict(workspace, "s1.3", tmp_path / "run", schedule={"steps": 4}, checkpoint={"every": 100, "export": False})
    cfg["model"]["init"] = str(_mono_folder(workspace, tmp_path))
    cfg["data"]["datasets"] = [
        {"path": str(pairs.path), "format": "webdataset"},
        {"path": str(convs.path), "format": "meta"},
    ]
    cfg["data"]["packing"] = False
    cfg["data"]["micro_batch_size"] = 3  # 4 steps x 3 = 12 good samples: the epoch's bad ones are all met
    cfg["data"]["shuffle"] = False
    result = train(from_dict(JobConfig, cfg))
    expected = {}
    for data in (pairs, convs):
        for reason, n in data.expected_skips.items():
            expected[reason] = expected.get(reason, 0) + n
    got = {k: v for k, v in result.skips.items() if k in expected}
    assert got == expected and set(expected) == set(BAD_CASES)
    logged = [json.loads(x) for x in (tmp_path / "run" / "skipped-rank0.jsonl").read_text().splitlines()]
    ids = {(x["reason"], x["sample_id"]) for x in logged}
    for data in (pairs, convs):
        for reason, sid in data.bad_ids.items():
            assert (reason, sid) in ids
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped/total"] == sum(expected.values())


def _mono_folder(ws: dict, tmp_path: Path) -> Path:
    folder = tmp_path / "mono-start"
    if not folder.exists():
        tok = tiny_bpe_tokenizer()
        MonoInternVL.from_llm(str(ws["llm"]), tokenizer=tok, image_size=56, vision_hidden_size=16).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def test_nonfinite_steps_are_skipped_then_abort(workspace, tmp_path, monkeypatch):
    job = make_job(workspace, "s1.1", tmp_path / "run", schedule={"steps": 10, "max_nonfinite": 3})
    trainer = Trainer(job)
    real = Trainer._forward_loss
    calls = {"n": 0}

    def poisoned(self, batch, denominator):
        calls["n"] += 1
        loss, loss_sum = real(self, batch, denominator)
        if calls["n"] == 2 or calls["n"] >= 4:  # step 2 once, then every step from 4 on
            return loss * float("nan"), loss_sum * float("nan")
        return loss, loss_sum

    monkeypatch.setattr(Trainer, "_forward_loss", poisoned)
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        trainer.run()
    assert trainer.step == 6 and trainer.nonfinite_total == 4
    # skipped updates left the parameters as they were after step 3
    assert any(not torch.equal(params[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_recipe_chains_the_four_stages(workspace, tmp_path):
    stage_files = []
    for stage, data in (("s1.1", "pairs"), ("s1.2", "pairs"), ("s1.3", "convs"), ("s2", "convs")):
        cfg = job_dict(workspace, stage, tmp_path / "ignored", dataset=data, schedule={"steps": 2})
        del cfg["output_dir"], cfg["model"]["init"]
        cfg["output_dir"] = "overridden-by-the-recipe"
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        stage_files.append({"config": path.name})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "chain"), "init": str(workspace["llm"]), "stages": stage_files}))
    results = run_recipe(recipe)
    assert all(r is not None and r.step == 2 for r in results)
    exports = [tmp_path / "chain" / s / "export" for s in ("s1.1", "s1.2", "s1.3", "s2")]
    states = [MonoInternVL.from_pretrained(e, dtype=torch.float32).state_dict() for e in exports]
    changed = [
        {group_of(k) for k in states[i] if not torch.equal(states[i - 1][k], states[i][k])} for i in range(1, 4)
    ]
    assert changed[0] == {"patch_embed", "projector", "visual_experts"}  # S1.2
    assert changed[1] == {"patch_embed", "projector", "visual_experts", "attention"}  # S1.3
    assert {"text_ffn", "lm_head", "norms", "attention"} <= changed[2]  # S2 trains everything
    assert run_recipe(recipe) == [None, None, None, None]  # done stages are not run again


def test_a_stage_may_run_twice_under_two_names(tmp_path):
    (tmp_path / "s1_3.yaml").write_text("stage: s1.3\noutput_dir: x\n")
    recipe = tmp_path / "recipe.yaml"
    entries = [{"config": "s1_3.yaml", "name": "s1.3-shapes", "overrides": ["schedule.steps=7"]}, {"config": "s1_3.yaml"}]
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "chain"), "init": "llm", "stages": entries}))
    _, jobs = stage_jobs(recipe)
    assert [Path(j.output_dir).name for j in jobs] == ["s1.3-shapes", "s1.3"]
    assert [j.stage for j in jobs] == ["s1.3", "s1.3"] and [j.schedule.steps for j in jobs] == [7, 100]
    assert Path(jobs[1].model.init) == tmp_path / "chain" / "s1.3-shapes" / "export"  # the second starts from the first
    entries[0].pop("name")
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "chain"), "stages": entries}))
    with pytest.raises(ValueError, match=r"stages\[1\] runs in 's1.3' like an earlier entry.*stages\[i\].name"):
        stage_jobs(recipe)
    entries[0]["name"] = "../elsewhere"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "chain"), "stages": entries}))
    with pytest.raises(ValueError, match="plain folder name"):
        stage_jobs(recipe)


def test_cli_reports_config_errors_with_the_key(tmp_path):
    bad = tmp_path / "stage.yaml"
    bad.write_text("stage: s1.1\noutput_dir: x\noptim:\n  lr: 1e-4\n  betas: [0.9, 0.95]\n  warmup: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "evip.cli", "train", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "optim.warmup" in proc.stderr and "stage.yaml:6" in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text("stage: s1.1\noutput_dir: x\n")
    proc = subprocess.run(
        [sys.executable, "-m", "evip.cli", "train", str(good), "schedule.step=3"], cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )
    assert proc.returncode == 2 and "schedule.step" in proc.stderr and "did you mean 'steps'" in proc.stderr


def test_fsdp2_on_a_single_process_matches_the_plain_module(workspace, tmp_path, monkeypatch):
    """The one-device FSDP2 path (a GPU without torchrun) starts its own one-rank group; on CPU, with activation
    checkpointing, it must train exactly what the plain module trains."""
    import torch.distributed as dist

    import evip.train as T

    sections = dict(schedule={"steps": 3}, checkpoint={"every": 100, "export": True})
    plain = train(make_job(workspace, "s1.1", tmp_path / "plain", **sections))
    monkeypatch.setattr(T, "_wants_fsdp", lambda fsdp, world, device: fsdp)
    try:
        # with activation checkpointing too: recomputing the layers changes nothing either
        trainer = Trainer(make_job(workspace, "s1.1", tmp_path / "fsdp", parallel={"activation_checkpointing": True},
                                   **sections))
        assert trainer.model.language_model.model.gradient_checkpointing
        assert trainer.sharded and dist.is_initialized() and dist.get_world_size() == 1
        sharded = trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for step, loss in plain.losses.items():
        assert abs(loss - sharded.losses[step]) <= 1e-5 * abs(loss)
    a = MonoInternVL.from_pretrained(plain.export_dir, dtype=torch.float32).state_dict()
    b = MonoInternVL.from_pretrained(sharded.export_dir, dtype=torch.float32).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_resume_after_a_crash_drops_the_metric_lines_of_lost_steps(workspace, tmp_path):
    sections = dict(schedule={"steps": 5}, checkpoint={"every": 2, "export": False})
    run = tmp_path / "run"
    train(make_job(workspace, "s1.1", run, **sections), stop_at=3)  # checkpoints 2 and 3, metrics 1..3
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000003")  # as if the process died before saving step 3
    resumed = Trainer(make_job(workspace, "s1.1", run, **sections))
    result = resumed.run()
    assert resumed.resumed_step == 2 and sorted(result.losses) == [3, 4, 5]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_export_in_bf16_is_the_release_format(workspace, tmp_path):
    from safetensors import safe_open

    job = make_job(workspace, "s1.1", tmp_path / "run", schedule={"steps": 1},
                   checkpoint={"every": 100, "export_dtype": "bfloat16"})
    export = train(job).export_dir
    (shard,) = export.glob("*.safetensors")
    with safe_open(str(shard), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert MonoInternVL.from_pretrained(export).dtype == torch.bfloat16


@pytest.mark.parametrize("stage, dataset", [("s1.1", "pairs"), ("s2", "convs")])
def test_loss_with_logits_at_targets_equals_the_loss_over_all_logits(workspace, tmp_path, stage, dataset):
    # The trainer computes logits only where a target is; loss and gradients are those of the full logits.
    init = _mono_folder(workspace, tmp_path) if stage != "s1.1" else None
    trainer = Trainer(make_job(workspace, stage, tmp_path / "run", dataset=dataset, init=init))
    batch = next(iter(trainer.loader))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss, loss_sum = trainer._forward_loss(batch, denominator=7.0)
    grads = torch.autograd.grad(loss, params)
    out = trainer.model(
        input_ids=batch.input_ids_BT, position_ids=batch.position_ids_BT, attention_mask=batch.attention_mask_BTT,
        pixel_values=batch.pixel_values_N, image_flags=batch.image_flags_N,
    )
    ref_sum, _ = weighted_ce(out.logits, batch.targets_BT, batch.weights_BT)
    ref_grads = torch.autograd.grad(ref_sum / 7.0, params)
    assert 0 < int((batch.targets_BT != -100).sum()) < batch.targets_BT.numel()
    torch.testing.assert_close(loss_sum, ref_sum.detach(), rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
