"""Worker processes for the checkpoint tests (run as scripts: torchrun, or a plain subprocess to be killed).

    python -m tests.evip.ckpt_worker fsdp-save DIR          (under torchrun, 2 ranks: FSDP2 train + save)
    python -m tests.evip.ckpt_worker save-loop DIR          (saves steps 1, 2, ... until killed)
    python -m tests.evip.ckpt_worker crash-in-finalize DIR  (saves step 1, then dies inside the save of step 2)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from evip.checkpoint import Checkpointer, TrainState
from evip.train import close_distributed


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    )


def train_steps(model, optimizer, steps: int, seed: int) -> list[float]:
    """Deterministic toy regression steps; the batch depends on ``seed`` and the step only."""
    losses = []
    for i in range(steps):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        x = torch.randn(8, 16, generator=gen)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def fsdp_save(folder: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    model = tiny_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 3, seed=dist.get_rank())
    Checkpointer(folder).save(3, TrainState(model, optimizer), extra={"consumed": 48})
    full_model, full_optim = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        torch.save({"model": full_model, "optim": full_optim}, folder / "reference.pt")
    del model, optimizer, full_model, full_optim  # sharded tensors must not outlive the group (gloo aborts at exit)
    close_distributed()


def save_loop(folder: Path) -> None:
    """Saves a ~16 MB model whose every weight equals the step number, forever."""
    model = torch.nn.Linear(2048, 2048)
    ckpt = Checkpointer(folder, keep_last=2)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        ckpt.save(step, TrainState(model), extra={"step": step})
        print(step, flush=True)


def crash_in_finalize(folder: Path) -> None:
    model = tiny_model()
    ckpt = Checkpointer(folder)
    ckpt.save(1, TrainState(model), extra={"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def die(*args, **kwargs):
        os._exit(3)  # as a kill would: the shard files are written, meta.json and the rename are not

    ckpt._finalize = die
    ckpt.save(2, TrainState(model), extra={"step": 2})


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    {"fsdp-save": fsdp_save, "save-loop": save_loop, "crash-in-finalize": crash_in_finalize}[command](folder)
