"""Training checkpoints: exact resume, pruning, crashes during a save, 2 ranks -> 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evip.checkpoint import CheckpointError, Checkpointer, TrainState

from .ckpt_worker import tiny_model, train_steps

ROOT = Path(__file__).resolve().parents[2]


def _optim_sched(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def _steps(model, optimizer, scheduler, n, seed):
    losses = []
    for i in range(n):
        # an RNG draw inside the step (dropout-like noise), so the RNG state must come back too
        noise = torch.rand(()) * 1e-3
        losses.append(train_steps(model, optimizer, 1, seed=seed * 100 + i)[0] + noise.item())
        scheduler.step()
    return losses


def test_stop_and_resume_is_bit_identical(tmp_path):
    torch.manual_seed(123)
    model = tiny_model()
    optimizer, scheduler = _optim_sched(model)
    head = _steps(model, optimizer, scheduler, 3, seed=0)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, TrainState(model, optimizer, scheduler=scheduler), extra={"consumed": 24})
    tail = [_steps(model, optimizer, scheduler, 1, seed=10 + i)[0] for i in range(3)]

    resumed = tiny_model(seed=999)  # different init: everything must come from the checkpoint
    optimizer2, scheduler2 = _optim_sched(resumed)
    torch.manual_seed(7)  # a different RNG position too
    meta = ckpt.load(TrainState(resumed, optimizer2, scheduler=scheduler2))
    assert meta["step"] == 3 and meta["extra"] == {"consumed": 24} and meta["rng_restored"]
    again = [_steps(resumed, optimizer2, scheduler2, 1, seed=10 + i)[0] for i in range(3)]
    assert again == tail  # bit-identical losses
    assert head  # (the first segment ran)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_keep_last_and_latest(tmp_path):
    model = tiny_model()
    ckpt = Checkpointer(tmp_path, keep_last=2)
    assert ckpt.latest() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.load(TrainState(model))
    for step in (10, 20, 30):
        ckpt.save(step, TrainState(model))
    assert [s for s, _ in ckpt.complete()] == [20, 30]
    assert ckpt.latest().name == "step-00000030"
    assert (tmp_path / "latest").read_text().strip() == "step-00000030"


def test_crash_inside_a_save_leaves_the_previous_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.evip.ckpt_worker", "crash-in-finalize", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert (tmp_path / ".step-00000002.tmp").is_dir()  # the interrupted save's files are there ...
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest().name == "step-00000001"  # ... but never taken for a checkpoint
    model = tiny_model(seed=5)
    assert ckpt.load(TrainState(model))["extra"] == {"step": 1}
    for a, b in zip(model.parameters(), tiny_model().parameters()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.load(TrainState(model), tmp_path / ".step-00000002.tmp")
    ckpt.save(2, TrainState(model))  # the next save clears the stale folder
    assert not (tmp_path / ".step-00000002.tmp").exists()


@pytest.mark.slow
def test_killed_at_random_moments_always_resumable(tmp_path):
    """SIGKILL a process that saves a 16 MB model in a loop, at several moments; the newest complete
    checkpoint always loads and holds exactly the values of its step."""
    for attempt, delay in enumerate((1.5, 2.2, 2.9)):
        folder = tmp_path / f"run{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.evip.ckpt_worker", "save-loop", str(folder)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.time() + 60
        while not (folder / "latest").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(delay - 1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = Checkpointer(folder)
        latest = ckpt.latest()
        assert latest is not None, proc.stderr.read()
        model = torch.nn.Linear(2048, 2048)
        step = ckpt.load(TrainState(model))["step"]
        assert all(torch.all(p == float(step)) for p in model.parameters()), step


@pytest.mark.distributed
def test_fsdp2_two_ranks_save_resumes_on_one(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "tests.evip.ckpt_worker", "fsdp-save", str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = torch.load(tmp_path / "reference.pt", weights_only=False)
    ckpt = Checkpointer(tmp_path)
    meta_path = ckpt.latest()
    assert meta_path.name == "step-00000003"
    model = tiny_model(seed=42)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    meta = ckpt.load(TrainState(model, optimizer))
    assert meta["world_size"] == 2 and meta["extra"] == {"consumed": 48}
    assert not meta["rng_restored"]  # 2 ranks' RNG cannot be 1 rank's: reported, not faked
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference["model"][name]), name
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _, optim_sd = get_state_dict(model, optimizer)
    for name, st in reference["optim"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optim_sd["state"][name][key], st[key]), (name, key)
