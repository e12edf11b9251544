"""Helpers shared by the benchmarks: timing, run metadata (git, device, versions) and CLI parsing."""

from __future__ import annotations

import argparse
import math
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_MIN_REPS = 3


def bench(run: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float,
          grad_to_none: list[torch.Tensor] = ()) -> dict:
    """Median time of ``run`` in ms (plus the 20th/80th percentiles).

    CUDA: ``triton.testing.do_bench`` (flushes L2 before every rep). CPU: ``time.perf_counter`` over at least
    ``CPU_MIN_REPS`` reps filling ``rep_ms``, after warm-up calls filling ``warmup_ms`` (at least one).
    """
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none),
                                                quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20_ms": p20, "p80_ms": p80, "reps": None}

    def once() -> float:
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    deadline = time.perf_counter() + warmup_ms / 1e3
    estimate = once()
    while time.perf_counter() < deadline:
        estimate = once()
    reps = min(10_000, max(CPU_MIN_REPS, math.ceil(rep_ms / 1e3 / max(estimate, 1e-9))))
    times_ms = np.array([once() for _ in range(reps)]) * 1e3
    p20, med, p80 = np.percentile(times_ms, [20, 50, 80]).tolist()
    return {"ms": med, "p20_ms": p20, "p80_ms": p80, "reps": reps}


def git_state() -> dict:
    """HEAD and whether the tree differs from it (results files ignored)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(status.strip())}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions, thread count and the device's name (GPU name, SMs, capability; or the CPU model)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
           "numpy": np.__version__, "platform": platform.platform(), "num_threads": torch.get_num_threads(),
           "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   capability=list(torch.cuda.get_device_capability(device)), sms=props.multi_processor_count,
                   allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["device_name"] = cpu_model()
    return env


def device_tag(env: dict, device: torch.device) -> str:
    """File-name tag for the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc``."""
    name = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    return name if device.type == "cuda" else f"cpu-{name}"


def parse_tokens(text: str) -> list[int]:
    """``1k,4k,16384`` -> [1024, 4096, 16384] (k = 1024)."""
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)(k?)", item)
        if not m or int(m.group(1)) == 0:
            raise argparse.ArgumentTypeError(f"token count {item!r} is not a positive integer (optional k suffix)")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise argparse.ArgumentTypeError("no token counts given")
    return out


def choice_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type for a comma-separated subset of ``choices`` (returned in ``choices`` order)."""

    def parse(text: str) -> list[str]:
        out = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in out if s not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {','.join(choices)}")
        return [c for c in choices if c in out]

    return parse


def closest(values, target: float, log_scale: bool = False):
    """The element of ``values`` nearest to ``target`` (by ratio when ``log_scale``)."""
    return min(values, key=lambda v: abs(math.log(v / target)) if log_scale else abs(v - target))
