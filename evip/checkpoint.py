"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, pruned, resumable on another world size.

Layout of a run's checkpoint folder::

    step-00000100/          one complete checkpoint
        .metadata, *.distcp model + optimizer (sharded as trained; DCP reshards on load) + ``extra`` state
        rng-rank0.pt ...    each rank's RNG states (python, numpy, torch CPU, CUDA)
        meta.json           written last: step, world size, time -- its presence marks the checkpoint complete
    .step-00000200.tmp/     a save in progress (or one a crash interrupted: ignored, removed by the next save)
    latest                  the newest complete checkpoint's folder name (a hint; the scan below decides)

Atomicity: every rank writes into the hidden ``.tmp`` folder; after a barrier rank 0 writes ``meta.json``
(fsynced) and renames the folder into place, which is atomic on POSIX file systems. A process killed at any
moment of a save therefore leaves the previous checkpoint intact and loadable, and :meth:`Checkpointer.latest`
never returns a half-written one. The newest ``keep_last`` complete checkpoints are kept.

Topology: the model and optimizer state are taken with ``get_state_dict`` (FSDP2 shards stay sharded, FQN keys),
so a checkpoint written by 2 ranks loads on 1 (or 4) and the other way round. RNG states are per rank; on
another world size the ranks without a saved state keep their own (the step's data order does not depend on
them: it is part of ``extra``), and :meth:`Checkpointer.load` reports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["CheckpointError", "Checkpointer", "TrainState", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the folder."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python ``random``, numpy's global generator, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainState(Stateful):
    """Model + optimizer (+ any ``Stateful`` extras such as an LR scheduler) as one DCP ``Stateful``.

    ``get_state_dict`` keys the optimizer state by parameter name and keeps FSDP2 shards as DTensors, which is
    what lets DCP load a checkpoint on another number of ranks.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, **extras: Any):
        self.model = model
        self.optimizer = optimizer
        self.extras = extras

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            model_sd, optim_sd = get_model_state_dict(self.model), {}
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        out = {"model": model_sd, "optim": optim_sd}
        for name, obj in self.extras.items():
            out[name] = obj.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
        else:
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
            )
        for name, obj in self.extras.items():
            obj.load_state_dict(state_dict[name])


class Checkpointer:
    """Saves and finds the checkpoints of one run folder (see the module docstring)."""

    def __init__(self, folder: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last

    # ---------------------------------------------------------------------------------------------- finding

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every complete checkpoint, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for child in self.folder.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "meta.json").is_file():
                found.append((int(m.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or ``None``."""
        found = self.complete()
        return found[-1][1] if found else None

    # ---------------------------------------------------------------------------------------------- saving

    def save(self, step: int, state: TrainState, extra: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` (collective: every rank calls it). ``extra`` is JSON-able run state that
        is the same on every rank (the data position, counters); returns the checkpoint folder."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rank, world = _rank(), _world_size()
        final = self.folder / f"step-{step:08d}"
        staging = self.folder / f".step-{step:08d}.tmp"
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".step-*.tmp"):  # saves a crash interrupted
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():
                shutil.rmtree(final)
            staging.mkdir()
        _barrier()
        with _single_process_quiet():
            dcp.save({"train": state}, checkpoint_id=staging)
        torch.save(rng_state(), staging / f"rng-rank{rank}.pt")
        _barrier()
        if rank == 0:
            meta = {"step": step, "world_size": world, "time": time.time(), "extra": extra or {}}
            self._finalize(staging, final, meta)
        _barrier()
        return final

    def _finalize(self, staging: Path, final: Path, meta: dict[str, Any]) -> None:
        with open(staging / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, final)
        _fsync_dir(self.folder)
        pointer = self.folder / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.folder / "latest")
        for _, old in self.complete()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- loading

    def load(self, state: TrainState, path: str | Path | None = None) -> dict[str, Any]:
        """Load ``path`` (default: :meth:`latest`) into ``state`` and this rank's RNG; returns the checkpoint's
        meta (``step``, ``world_size``, ``extra``, and ``rng_restored``: whether this rank's RNG came back)."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise CheckpointError(f"no complete checkpoint in {self.folder}")
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json; a save was interrupted)")
        meta = json.loads(meta_file.read_text())
        try:
            with _single_process_quiet():
                dcp.load({"train": state}, checkpoint_id=path)
        except Exception as exc:
            raise CheckpointError(f"cannot load {path}: {exc}") from exc
        rng_file = path / f"rng-rank{_rank()}.pt"
        restored = rng_file.is_file() and meta["world_size"] == _world_size()
        if restored:
            set_rng_state(torch.load(rng_file, weights_only=False))
        meta["rng_restored"] = restored
        return meta


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save/load without a process group that it assumes one process: that is intended here."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
