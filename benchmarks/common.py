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
CPU_MIN_REPS = 5
# CPU statistic: the minimum over reps. On shared 2-core VMs other processes stall torch's thread pool for whole
# scheduler slices (a dense FFN's median moves by 15-40 % between runs), and the minimum is what the code costs
# when nothing interferes; the percentiles are recorded beside it.
CPU_STAT = "min"


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


def bench_interleaved(runs: dict[str, Callable[[], object]], warmup_ms: float, rep_ms: float,
                      grad_to_none: list[torch.Tensor] = (), log=print) -> dict[str, dict]:
    """CPU timing of several implementations of one case, interleaved: every round times each of them once,
    in an order rotated from round to round, so load bursts and clock drift hit all of them alike.

    Returns ``{name: {"ms", "p20_ms", "median_ms", "p80_ms", "reps", "stat"}}`` (``ms`` = the minimum, see
    ``CPU_STAT``), or ``{name: {"error": message}}`` for a run that raised (it is dropped from later rounds).
    """
    names = list(runs)
    out: dict[str, dict] = {}

    def once(name: str) -> float | None:
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        try:
            runs[name]()
        except Exception as exc:  # recorded, the others go on
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  ERROR {name}: {out[name]['error']}")
            return None
        return time.perf_counter() - start

    estimates = {}
    deadline = time.perf_counter() + warmup_ms / 1e3
    while True:  # at least one warm-up call each
        for name in names:
            if name not in out:
                estimates[name] = once(name)
        if time.perf_counter() >= deadline:
            break
    alive = [n for n in names if n not in out]
    if not alive:
        return out
    mean = sum(estimates[n] for n in alive) / len(alive)
    rounds = min(10_000, max(CPU_MIN_REPS, math.ceil(rep_ms / 1e3 / max(mean, 1e-9))))
    times: dict[str, list[float]] = {n: [] for n in alive}
    for r in range(rounds):
        order = alive[r % len(alive):] + alive[:r % len(alive)]
        for name in order:
            if name in out:
                continue
            t = once(name)
            if t is not None:
                times[name].append(t * 1e3)
    for name in alive:
        if name in out:
            continue
        ms = np.array(times[name])
        p20, med, p80 = np.percentile(ms, [20, 50, 80]).tolist()
        out[name] = {"ms": float(ms.min()), "p20_ms": p20, "median_ms": med, "p80_ms": p80, "reps": len(ms),
                     "stat": CPU_STAT}
    return out


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
