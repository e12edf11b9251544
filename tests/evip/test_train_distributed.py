"""The trainer under torchrun: 2 gloo ranks, with FSDP2 or replicated (``parallel.fsdp=false``, gradients averaged
by one all-reduce), train exactly what 1 rank with 2 accumulation steps trains, and a checkpoint written by 2 ranks
resumes on 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mono import MonoInternVL
from tests.evip.fixtures import tiny_bpe_tokenizer, write_conversations
from tests.evip.tiny_llm import save_tiny_llm

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]


def _evip(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "evip.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss_step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2", "replicated"])
def test_two_ranks_equal_one_rank_and_resume_on_one(tmp_path, fsdp):
    tok = tiny_bpe_tokenizer()
    llm = save_tiny_llm(tmp_path / "llm", tok)
    start = tmp_path / "mono"
    MonoInternVL.from_llm(str(llm), tokenizer=tok, image_size=56, vision_hidden_size=16).save_pretrained(start)
    tok.save_pretrained(start)
    data = write_conversations(tmp_path / "convs", 16, seed=0)  # single-, multi-image and text-only samples
    config = {
        "stage": "s1.3",  # attention + visual parts train, the text FFN is frozen inside the same FSDP units
        "output_dir": "set-below",
        "model": {"init": str(start)},
        "data": {"datasets": [{"path": str(data.path), "format": "meta"}], "packing": False, "micro_batch_size": 1,
                 "max_seq_len": 512},
        "optim": {"lr": 3e-3},
        "schedule": {"steps": 5},
        "logging": {"every": 1, "progress": "off", "tensorboard": False},
        "checkpoint": {"every": 100},
        "parallel": {"fsdp": fsdp},
    }
    path = tmp_path / "s1_3.yaml"
    path.write_text(yaml.safe_dump(config))

    _evip(["train", str(path), f"output_dir={tmp_path / 'one'}", "schedule.grad_accum=2"], nproc=1)
    _evip(["train", str(path), f"output_dir={tmp_path / 'two'}", "schedule.grad_accum=1"], nproc=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * max(1.0, abs(one[step])), (step, one, two)
    a = MonoInternVL.from_pretrained(tmp_path / "one" / "export", dtype=torch.float32).state_dict()
    b = MonoInternVL.from_pretrained(tmp_path / "two" / "export", dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)

    # a checkpoint of 2 ranks (stopped at step 3) resumes on 1 rank and finishes the stage
    resume = [f"output_dir={tmp_path / 'moved'}"]
    _evip(["train", str(path), *resume, "schedule.grad_accum=1", "--stop-at", "3"], nproc=2)
    proc = _evip(["train", str(path), *resume, "schedule.grad_accum=2"], nproc=1)
    assert "resumed a checkpoint of 2 ranks on 1" in proc.stdout
    moved = _losses(tmp_path / "moved")
    assert sorted(moved) == [1, 2, 3, 4, 5]
    for step in (1, 2, 3):
        assert abs(moved[step] - two[step]) <= 1e-5 * max(1.0, abs(two[step]))
    assert (tmp_path / "moved" / "export" / "config.json").is_file()
