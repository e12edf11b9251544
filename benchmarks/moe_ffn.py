"""Microbenchmark of the modality-routed SwiGLU FFN against the dense-FFN bound and the alternatives.

Legend: T tokens, D model width, F FFN width, E = 2 experts (0 text, 1 visual), f visual fraction of the tokens.

    python -m benchmarks.moe_ffn                # device defaults (CUDA if present, else CPU)
    python -m benchmarks.moe_ffn --quick        # tiny smoke run
    python -m benchmarks.moe_ffn --tokens 4k,16k --fractions 0.5 --modes fwd,fwdbwd --impls dense,blend,ours

Implementations (each builds a callable from the same inputs):
  dense         one dense SwiGLU FFN over all T tokens with expert 0's weights: the bound (ratio 1)
  blend         both experts on all tokens, blended by the visual mask (the released training code)
  index_select  index tensors built once outside the timed region, index_select + two FFNs + index_copy_
  grouped_mm    sort + torch._grouped_mm: kernels.moe_ffn(backend="torch") with Routing.counts_host = None
  megablocks    kernels.moe_ffn(backend="megablocks")
  ours          kernels.moe_ffn(backend=None): auto (Triton on CUDA, the torch slice path on CPU)

Modes: fwd (under no_grad), fwdbwd (y.backward(dy); grads set to None before every rep), bwd = fwdbwd - fwd
(of the reported times: CUDA medians, CPU minima), frozen (fwdbwd with expert 0's weights frozen, as in EViP
S1.1/S1.2), frozen_bwd = frozen - fwd.
Conventions (FLOPs, ratios, timing) and how to read the output: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import kernels

from .common import (
    CPU_MIN_REPS, RESULTS_DIR, bench, bench_interleaved, choice_list, closest, device_tag, environment, git_state, parse_tokens,
)

IMPLS = ("dense", "blend", "index_select", "grouped_mm", "megablocks", "ours")
MODES = ("fwd", "fwdbwd", "bwd", "frozen", "frozen_bwd")
DERIVED = {"bwd": "fwdbwd", "frozen_bwd": "frozen"}  # derived mode -> the measured mode it subtracts fwd from
# Useful FLOPs in units of T*D*F; frozen ones add 6*f (the visual expert's weight gradients).
FLOPS_TDF = {"fwd": (6, 0), "fwdbwd": (18, 0), "bwd": (12, 0), "frozen": (12, 6), "frozen_bwd": (6, 6)}
# Dense keeps all its weights trainable in the frozen modes (the reference stays the full dense fwdbwd).
DENSE_FROZEN = {"frozen": "fwdbwd", "frozen_bwd": "bwd"}

DEVICE_DEFAULTS = {
    "cuda": {"d": 2048, "f": 8192, "dtype": "bf16", "tokens": [1024, 4096, 16384, 65536], "warmup": 25.0,
             "rep": 100.0, "span": 256},
    "cpu": {"d": 512, "f": 2048, "dtype": "fp32", "tokens": [256, 1024, 4096], "warmup": 1.0, "rep": 1000.0,
            "span": 256},
}
QUICK = {"d": 64, "f": 128, "tokens": [64, 256], "fractions": [0.0, 0.5, 1.0], "warmup": 1.0, "rep": 10.0, "span": 32}
FRACTIONS = [0.0, 0.25, 0.5, 0.9, 1.0]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Relative Frobenius error of each forward against kernels.moe_ffn_reference (fp32 on the same rounded inputs).
# fp32 on CUDA is looser: Triton's tl.dot computes fp32 products in TF32 unless told otherwise.
TOLERANCES = {("cpu", torch.float32): 1e-4, ("cuda", torch.float32): 5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}

# Targets, evaluated at the T closest to 16k and the visual fraction closest to 0.5.
TARGET_TOKENS, TARGET_FRACTION = 16384, 0.5
# The targets of issue 3 (GPU: H100, T = 16k, f = 0.5; CPU: the torch backend vs dense).
OURS_VS_DENSE_MAX = {("cuda", "fwd"): 1.05, ("cuda", "fwdbwd"): 1.10, ("cpu", "fwd"): 1.15, ("cpu", "fwdbwd"): 1.15}
BLEND_SPEEDUP_MIN = 1.8  # the FLOP ratio is 2
FROZEN_SAVING_MIN = 0.20  # a frozen-text backward at least 20 % cheaper than the full one (FLOP ideal (1 - f) / 2)
OURS_VS_OTHER_MAX = 1.0  # faster than index-select, grouped_mm and megablocks


class Unavailable(Exception):
    """An implementation that cannot run with these inputs on this machine (the message says why)."""


# ----------------------------------------------------------------------------------------------- inputs

def visual_layout(num_tokens: int, fraction: float, span: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Visual-token mask laid out like real images: ``round(f * T)`` visual tokens in spans of ``span`` tokens
    (the last one shorter), separated by text runs of random length; deterministic in (seed, T, f).

    Returns the bool mask ``(T,)`` and the spans as ``[start, length]``.
    """
    num_visual = round(fraction * num_tokens)
    mask_T = np.zeros(num_tokens, dtype=bool)
    if num_visual == 0:
        return mask_T, []
    num_spans = -(-num_visual // span)
    lengths = [span] * (num_spans - 1) + [num_visual - span * (num_spans - 1)]
    rng = np.random.default_rng([seed, num_tokens, round(fraction * 1_000_000)])
    cuts = np.sort(rng.integers(0, num_tokens - num_visual + 1, size=num_spans))
    text_before = np.diff(cuts, prepend=0)  # text tokens before each span; the rest follow the last one
    spans, pos = [], 0
    for gap, length in zip(text_before.tolist(), lengths):
        pos += gap
        spans.append([pos, length])
        mask_T[pos:pos + length] = True
        pos += length
    return mask_T, spans


@dataclasses.dataclass
class Case:
    """Inputs shared by every implementation at one (T, f)."""

    x_TD: torch.Tensor
    dy_TD: torch.Tensor
    w1: list[torch.Tensor]  # E x (F, D)
    w3: list[torch.Tensor]  # E x (F, D)
    w2: list[torch.Tensor]  # E x (D, F)
    dense_w: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # expert 0's (w1, w3, w2), always trainable
    routing: kernels.Routing | None = None
    mask_T1: torch.Tensor | None = None  # float (T, 1) in x's dtype, 1 = visual
    rows_text: torch.Tensor | None = None  # int64 row indices, built once like a data loader would
    rows_vis: torch.Tensor | None = None


def make_weights(d: int, f: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Random expert weights (nn.Linear layout) scaled so activations and outputs stay O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) / math.sqrt(cols)).to(device=device, dtype=dtype)

    w1, w3, w2 = ([rand(f, d) for _ in range(2)], [rand(f, d) for _ in range(2)], [rand(d, f) for _ in range(2)])
    dense_w = tuple(w[0].detach().clone() for w in (w1, w3, w2))
    return w1, w3, w2, dense_w


def make_activations(num_tokens: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    """``x_TD`` and the output gradient ``dy_TD``, standard normal, deterministic in (seed, T)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + num_tokens)
    x_TD = torch.randn(num_tokens, d, generator=gen).to(device=device, dtype=dtype)
    dy_TD = torch.randn(num_tokens, d, generator=gen).to(device=device, dtype=dtype)
    return x_TD, dy_TD


# ---------------------------------------------------------------------------------------- implementations

def _swiglu(x_ND: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_ND, w1_FD)) * F.linear(x_ND, w3_FD), w2_DF)


def build_dense(c: Case) -> Callable[[], torch.Tensor]:
    """One dense SwiGLU FFN over all T tokens with (a trainable copy of) expert 0's weights."""
    w1, w3, w2 = c.dense_w
    return lambda: _swiglu(c.x_TD, w1, w3, w2)


def build_blend(c: Case) -> Callable[[], torch.Tensor]:
    """The released training path: both experts on every token, blended by the visual mask."""

    def run():
        text_TD = _swiglu(c.x_TD, c.w1[0], c.w3[0], c.w2[0])
        vis_TD = _swiglu(c.x_TD, c.w1[1], c.w3[1], c.w2[1])
        return text_TD * (1 - c.mask_T1) + vis_TD * c.mask_T1
    return run


def build_index_select(c: Case) -> Callable[[], torch.Tensor]:
    """Gather each modality's rows by prebuilt indices, one dense FFN per modality, ``index_copy_`` back."""

    def run():
        y_TD = torch.empty_like(c.x_TD)
        for e, rows in enumerate((c.rows_text, c.rows_vis)):
            y_TD.index_copy_(0, rows, _swiglu(c.x_TD.index_select(0, rows), c.w1[e], c.w3[e], c.w2[e]))
        return y_TD
    return run


def build_grouped_mm(c: Case) -> Callable[[], torch.Tensor]:
    """The torch backend without host counts: sort + ``torch._grouped_mm`` on stacked expert weights."""
    if not hasattr(torch, "_grouped_mm"):
        raise Unavailable(f"torch {torch.__version__} has no torch._grouped_mm")
    align = 16 // c.x_TD.element_size()
    d, f = c.x_TD.shape[1], c.w1[0].shape[0]
    if d % align or f % align:
        raise Unavailable(f"torch._grouped_mm needs D and F multiples of {align} for {c.x_TD.dtype}; got D={d}, F={f}")
    routing = dataclasses.replace(c.routing, counts_host=None)
    return lambda: kernels.moe_ffn(c.x_TD, routing, c.w1, c.w3, c.w2, backend="torch")


def build_megablocks(c: Case) -> Callable[[], torch.Tensor]:
    """MegaBlocks' grouped GEMM through ``kernels.moe_ffn``; raises ``BackendUnavailable`` where not installed."""
    return lambda: kernels.moe_ffn(c.x_TD, c.routing, c.w1, c.w3, c.w2, backend="megablocks")


def build_ours(c: Case) -> Callable[[], torch.Tensor]:
    """``kernels.moe_ffn`` with the backend it picks for this device."""
    return lambda: kernels.moe_ffn(c.x_TD, c.routing, c.w1, c.w3, c.w2, backend=None)


BUILDERS = {
    "dense": build_dense, "blend": build_blend, "index_select": build_index_select,
    "grouped_mm": build_grouped_mm, "megablocks": build_megablocks, "ours": build_ours,
}


def set_trainable(c: Case, mode: str) -> list[torch.Tensor]:
    """requires_grad for ``mode``; returns the tensors whose grads are reset before every rep."""
    backward = mode != "fwd"
    c.x_TD.requires_grad_(backward)
    for e in range(2):
        for w in (c.w1[e], c.w3[e], c.w2[e]):
            w.requires_grad_(backward and not (mode == "frozen" and e == 0))
    for w in c.dense_w:
        w.requires_grad_(backward)
    return [t for t in (c.x_TD, *c.w1, *c.w3, *c.w2, *c.dense_w) if t.requires_grad]


def clear_grads(c: Case) -> None:
    """Drop every gradient (between measurements, so none accumulates across modes)."""
    for t in (c.x_TD, *c.w1, *c.w3, *c.w2, *c.dense_w):
        t.grad = None


def timed(fn: Callable[[], torch.Tensor], mode: str, dy_TD: torch.Tensor) -> Callable[[], None]:
    """What one rep of ``mode`` runs: the forward under ``no_grad``, or forward + ``backward(dy)``."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            fn().backward(dy_TD)
    return run


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in fp32; NaN or inf in ``got`` gives a non-finite error."""
    ref = ref.float()
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------- the sweep

def needed_modes(modes: list[str]) -> list[str]:
    """Measured modes the requested ones need (derived ones subtract fwd from their base)."""
    want = set()
    for m in modes:
        want |= {DERIVED[m], "fwd"} if m in DERIVED else {m}
    return [m for m in ("fwd", "fwdbwd", "frozen") if m in want]


def sweep(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, log) -> dict:
    """Check and time every (T, f, mode, impl); returns the raw records (no derived modes yet)."""
    tol = TOLERANCES.get(dtype) or TOLERANCES[(device.type, dtype)]
    w1, w3, w2, dense_w = make_weights(args.d, args.f, dtype, device, args.seed)
    measured = needed_modes(args.modes)
    records, checks, cases, unavailable = [], [], [], {}

    def measure(c: Case, jobs: list[tuple[str, object, str, str | None]], tokens: int, fraction: float) -> None:
        """Time every ``(impl, fn, status, reason)`` job in every measured mode (dense is not re-timed with a
        frozen text expert: its reference stays the full fwdbwd). CPU: all jobs of a mode interleaved."""
        for mode in measured:
            mode_jobs = [j for j in jobs if not (j[0] == "dense" and mode == "frozen")]
            grads = set_trainable(c, mode)
            base = {"tokens": tokens, "vis_fraction": fraction, "mode": mode}
            try:
                if device.type == "cpu":
                    results = bench_interleaved({impl: timed(fn, mode, c.dy_TD) for impl, fn, _, _ in mode_jobs},
                                                args.warmup, args.rep, grads, log=log)
                else:
                    results = {}
                    for impl, fn, _, _ in mode_jobs:
                        try:
                            results[impl] = bench(timed(fn, mode, c.dy_TD), device, args.warmup, args.rep, grads)
                        except Exception as exc:  # an OOM or a kernel bug must not lose the rest of a GPU lease
                            results[impl] = {"error": f"{type(exc).__name__}: {exc}"}
                            log(f"  ERROR {impl} {mode}: {results[impl]['error']}")
                        finally:
                            clear_grads(c)
            finally:
                clear_grads(c)
            for impl, _, status, reason in mode_jobs:
                rec = {**base, "impl": impl, "status": status, "reason": reason}
                res = results[impl]
                if "error" in res:
                    rec.update(status="error", reason=res["error"])
                else:
                    rec.update(res)
                records.append(rec)

    def check(c: Case, impl: str, fn, expected_TD: torch.Tensor, tokens: int, fraction: float | None):
        """Returns (callable or None, status, reason)."""
        entry = {"tokens": tokens, "vis_fraction": fraction, "impl": impl, "tol": tol}
        try:
            set_trainable(c, "fwd")
            with torch.no_grad():
                err = rel_err(fn(), expected_TD)
        except (Unavailable, kernels.BackendUnavailable) as exc:
            unavailable.setdefault(impl, str(exc))
            return None, "unavailable", str(exc)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log(f"  ERROR {impl} forward: {reason}")
            checks.append({**entry, "rel_err": None, "ok": False, "reason": reason})
            return None, "error", reason
        ok = math.isfinite(err) and err <= tol
        checks.append({**entry, "rel_err": err if math.isfinite(err) else None, "ok": ok})
        if not ok:
            log(f"  WRONG {impl}: relative error {err:.3g} > {tol:g}")
            return fn, "WRONG", f"relative error {err:.3g} > tolerance {tol:g}"
        return fn, "ok", None

    for tokens in args.tokens:
        x_TD, dy_TD = make_activations(tokens, args.d, dtype, device, args.seed)
        c = Case(x_TD, dy_TD, w1, w3, w2, dense_w)
        with torch.no_grad():
            dense_expected_TD = kernels.moe_ffn_reference(
                x_TD, torch.zeros(tokens, dtype=torch.long, device=device), *([w] for w in dense_w))
        dense_fn, dense_status, dense_reason = check(c, "dense", build_dense(c), dense_expected_TD, tokens, None)
        if dense_fn is None:
            raise RuntimeError(f"the dense FFN failed at T={tokens}: {dense_reason}")
        del dense_expected_TD

        for fraction in args.fractions:
            start = time.perf_counter()
            # Dense ignores the routing but is timed with every case (interleaved with the others on CPU), so
            # that a burst of load on a shared machine skews a case's ratios less.
            jobs = [("dense", dense_fn, dense_status, dense_reason)]
            mask_T, spans = visual_layout(tokens, fraction, args.span, args.seed)
            num_visual = int(mask_T.sum())
            ids_T = torch.from_numpy(mask_T).to(device)
            counts = (tokens - num_visual, num_visual)
            routing_time = bench(lambda: kernels.build_routing(ids_T, 2, counts_host=counts), device,
                                 args.warmup, args.rep)
            c.routing = kernels.build_routing(ids_T, 2, counts_host=counts)
            c.mask_T1 = ids_T.to(dtype).unsqueeze(1)
            c.rows_text = torch.from_numpy(np.flatnonzero(~mask_T)).to(device)
            c.rows_vis = torch.from_numpy(np.flatnonzero(mask_T)).to(device)
            with torch.no_grad():
                expected_TD = kernels.moe_ffn_reference(x_TD, ids_T, w1, w3, w2)
            cases.append({"tokens": tokens, "vis_fraction": fraction, "num_visual": num_visual,
                          "vis_fraction_actual": num_visual / tokens, "span_tokens": args.span,
                          "num_spans": len(spans), "spans": spans, "build_routing": routing_time})
            for impl in args.impls:
                if impl == "dense":
                    continue
                try:
                    fn = BUILDERS[impl](c)
                except Unavailable as exc:
                    unavailable.setdefault(impl, str(exc))
                    fn, status, reason = None, "unavailable", str(exc)
                else:
                    fn, status, reason = check(c, impl, fn, expected_TD, tokens, fraction)
                if fn is None:
                    records.extend({"tokens": tokens, "vis_fraction": fraction, "mode": m, "impl": impl,
                                    "status": status, "reason": reason} for m in measured)
                else:
                    jobs.append((impl, fn, status, reason))
            measure(c, jobs, tokens, fraction)
            log(f"T={tokens} vis {fraction:.2f} ({len(spans)} image spans): {time.perf_counter() - start:.1f} s")
            del expected_TD
    return {"records": records, "checks": checks, "cases": cases, "unavailable": unavailable}


def finish(records: list[dict], modes: list[str], args: argparse.Namespace, cases: list[dict]) -> list[dict]:
    """Adds the derived modes, dense's frozen rows, FLOPs, TFLOP/s and ratios; keeps only the requested modes."""
    key = {(r["tokens"], r["vis_fraction"], r["mode"], r["impl"]): r for r in records}
    out = list(records)
    for r in records:
        if r["impl"] == "dense" and r["mode"] == "fwdbwd":
            out.append({**r, "mode": "frozen", "note": "= dense fwdbwd: dense weights stay trainable"})
    for r in list(out):
        if r["mode"] not in DERIVED.values():
            continue
        fwd = key.get((r["tokens"], r["vis_fraction"], "fwd", r["impl"]))
        derived_mode = next(m for m, base in DERIVED.items() if base == r["mode"])
        d = {k: r[k] for k in ("tokens", "vis_fraction", "impl", "status", "reason")}
        d.update(mode=derived_mode, derived=f"ms({r['mode']}) - ms(fwd)")
        if fwd is None or r.get("ms") is None or fwd.get("ms") is None:
            d["ms"] = None
            if fwd is not None and fwd["status"] not in ("ok", "WRONG") and d["status"] in ("ok", "WRONG"):
                d.update(status=fwd["status"], reason=fwd["reason"])
        else:
            d["ms"] = r["ms"] - fwd["ms"]
        out.append(d)
    visual = {(c["tokens"], c["vis_fraction"]): c["vis_fraction_actual"] for c in cases}
    dense = {(r["tokens"], r["vis_fraction"], r["mode"]): r.get("ms") for r in out if r["impl"] == "dense"}
    tdf = args.d * args.f
    for r in out:
        mode = DENSE_FROZEN.get(r["mode"], r["mode"]) if r["impl"] == "dense" else r["mode"]
        base, per_vis = FLOPS_TDF[mode]
        f_vis = 0.0 if r["impl"] == "dense" else visual[(r["tokens"], r["vis_fraction"])]
        r["flops"] = (base + per_vis * f_vis) * r["tokens"] * tdf
        ms, ref = r.get("ms"), dense.get((r["tokens"], r["vis_fraction"], r["mode"]))
        r["tflops"] = r["flops"] / (ms * 1e9) if ms and ms > 0 else None
        r["ratio_to_dense"] = ms / ref if ms is not None and ref else None
    return [r for r in out if r["mode"] in modes]


# ----------------------------------------------------------------------------------------------- targets

def evaluate_targets(rows: list[dict], device: torch.device, tokens: list[int], fractions: list[float]) -> dict:
    """PASS/FAIL of the targets at the T closest to 16k and the fraction closest to 0.5 (never an exit status)."""
    at_t, at_f = closest(tokens, TARGET_TOKENS, log_scale=True), closest(fractions, TARGET_FRACTION)
    by = {(r["impl"], r["mode"]): r for r in rows if r["tokens"] == at_t and r["vis_fraction"] == at_f}
    targets = []

    def add(name: str, num: tuple[str, str], den: tuple[str, str] | None, op: str, threshold: float,
            value_of: Callable[[float, float], float] = lambda a, b: a / b) -> None:
        """``value_of(ms of num, ms of den)`` against ``threshold``; n/a when an input was not measured or a
        comparator is unavailable, FAIL when ours itself is WRONG, failed or unavailable."""
        values, whys, verdict = [], [], None
        for impl, mode in filter(None, (num, den)):
            r = by.get((impl, mode))
            if r is None or (r["status"] != "ok" and impl != "ours"):
                whys.append(f"{impl} {mode} " + ("not measured" if r is None else r["status"]))
                verdict = verdict or "n/a"
            elif r["status"] != "ok" or r["ms"] is None:
                whys.append(f"{impl} {mode} {r['status']}")
                verdict = "FAIL"
            values.append(None if r is None else r["ms"])
        why = "; ".join(whys) or None
        value = value_of(*values) if verdict is None else None
        if verdict is None:
            verdict = "PASS" if (value <= threshold if op == "<=" else value >= threshold) else "FAIL"
        targets.append({"name": name, "value": value, "op": op, "threshold": threshold, "verdict": verdict,
                        "reason": why})

    label = "ours (torch backend)" if device.type == "cpu" else "ours"
    for mode in ("fwd", "fwdbwd"):
        add(f"{label} {mode} / dense {mode}", ("ours", mode), ("dense", mode), "<=",
            OURS_VS_DENSE_MAX[("cuda" if device.type == "cuda" else "cpu", mode)])
    ideal = (1 - at_f) / 2
    add(f"ours frozen-text bwd saving vs full bwd (FLOP ideal {ideal:.0%})", ("ours", "frozen_bwd"), ("ours", "bwd"),
        ">=", FROZEN_SAVING_MIN, lambda frozen, full: 1 - frozen / full)
    for mode in ("fwd", "fwdbwd"):
        add(f"speedup of ours over blend, {mode}", ("blend", mode), ("ours", mode), ">=", BLEND_SPEEDUP_MIN)
    for other in ("index_select", "grouped_mm", "megablocks"):
        for mode in ("fwd", "fwdbwd"):
            add(f"ours / {other}, {mode}", ("ours", mode), (other, mode), "<=", OURS_VS_OTHER_MAX)
    return {"tokens": at_t, "vis_fraction": at_f, "targets": targets}


# ------------------------------------------------------------------------------------------------ output

def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def _note(r: dict, ours_backend: str) -> str:
    parts = []
    if r["status"] == "unavailable":
        parts.append("unavailable (reason below)")
    elif r["status"] != "ok":
        parts.append(r["status"] + (f": {r['reason']}" if r.get("reason") else ""))
    elif r["impl"] == "ours":
        parts.append(f"backend={ours_backend}")
    if r.get("note"):
        parts.append(r["note"])
    text = "; ".join(parts)
    return text if len(text) <= 90 else text[:87] + "..."


def print_report(result: dict) -> None:
    rows, impl_order = result["measurements"], {name: i for i, name in enumerate(IMPLS)}
    header = f"{'T':>7}  {'vis':>5}  {'impl':<13} {'ms':>10} {'TFLOP/s':>8} {'x dense':>8}  note"
    for mode in result["args"]["modes"]:
        mode_rows = sorted((r for r in rows if r["mode"] == mode),
                           key=lambda r: (r["tokens"], r["vis_fraction"], impl_order[r["impl"]]))
        print(f"\n== {mode}: {MODE_TITLES[mode]}")
        print(header)
        for r in mode_rows:
            print(f"{r['tokens']:>7}  {r['vis_fraction']:>5.2f}  {r['impl']:<13} {_fmt(r.get('ms')):>10} {_fmt(r.get('tflops')):>8} "
                  f"{_fmt(r.get('ratio_to_dense')):>8}  {_note(r, result['ours_backend'])}")
    if result["unavailable"]:
        print("\n== unavailable")
        for impl, reason in result["unavailable"].items():
            print(f"  {impl}: {reason}")
    print("\n== build_routing alone (once per step, shared by all layers)")
    print(f"{'T':>7}  {'vis':>5}  {'spans':>5}  {'ms':>10}")
    for c in result["cases"]:
        ms = _fmt(c["build_routing"]["ms"], 4)
        print(f"{c['tokens']:>7}  {c['vis_fraction']:>5.2f}  {c['num_spans']:>5}  {ms:>10}")
    t = result["targets"]
    print(f"\n== targets at T={t['tokens']} (closest to {TARGET_TOKENS}), vis fraction {t['vis_fraction']:.2f}")
    for target in t["targets"]:
        value = "-" if target["value"] is None else f"{target['value']:.3f}"
        why = f"  ({target['reason']})" if target["reason"] else ""
        limit = f"{target['op']} {target['threshold']:.3f}"
        print(f"  {target['verdict']:<4}  {target['name']:<58} {value:>7}  {limit}{why}")


MODE_TITLES = {
    "fwd": "forward under no_grad; FLOPs 6*T*D*F",
    "fwdbwd": "forward + backward, everything trainable; FLOPs 18*T*D*F",
    "bwd": "fwdbwd - fwd (of the reported times); FLOPs 12*T*D*F",
    "frozen": "fwdbwd with expert 0 frozen (dense stays fully trainable); FLOPs 12*T*D*F + 6*T*D*F*f",
    "frozen_bwd": "frozen - fwd (of the reported times); FLOPs 6*T*D*F + 6*T*D*F*f (dense: 12*T*D*F)",
}
IDEAL_RATIO = {"frozen": lambda f: (2 + f) / 3, "frozen_bwd": lambda f: (1 + f) / 2}


def plot(result: dict, path: Path) -> None:
    """Ratio to dense per mode: against the visual fraction at the largest T (top), against T (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, modes = result["measurements"], result["args"]["modes"]
    tokens, fractions = result["args"]["tokens"], result["args"]["fractions"]
    big_t, mid_f = max(tokens), closest(fractions, TARGET_FRACTION)
    colors = dict(zip(IMPLS[1:], plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, len(modes), figsize=(4.2 * len(modes), 7.6), squeeze=False)
    for col, mode in enumerate(modes):
        top, bottom = axes[0][col], axes[1][col]
        for impl in IMPLS[1:]:
            sel = [r for r in rows if r["mode"] == mode and r["impl"] == impl and r.get("ratio_to_dense") is not None]
            wrong = any(r["status"] == "WRONG" for r in sel)
            style = {"color": colors[impl], "marker": "x" if wrong else "o", "linestyle": ":" if wrong else "-",
                     "label": impl + (" (WRONG)" if wrong else "")}
            pts = sorted((r["vis_fraction"], r["ratio_to_dense"]) for r in sel if r["tokens"] == big_t)
            if pts:
                top.plot(*zip(*pts), **style)
            pts = sorted((r["tokens"], r["ratio_to_dense"]) for r in sel if r["vis_fraction"] == mid_f)
            if pts:
                bottom.plot(*zip(*pts), **style)
        for ax in (top, bottom):
            ax.axhline(1.0, color="black", linewidth=0.9, linestyle="--", label="dense")
            ax.grid(True, alpha=0.3)
            ax.set_ylabel("time / dense time")
        if mode in IDEAL_RATIO:
            xs = np.linspace(0, 1, 21)
            top.plot(xs, IDEAL_RATIO[mode](xs), color="grey", linestyle=":", label="FLOP ideal")
            bottom.axhline(IDEAL_RATIO[mode](mid_f), color="grey", linestyle=":", label="FLOP ideal")
        top.set_title(f"{mode}, T={big_t}")
        top.set_xlabel("visual fraction")
        bottom.set_title(f"{mode}, vis fraction {mid_f:.2f}")
        bottom.set_xscale("log", base=2)
        bottom.set_xlabel("tokens T")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), frameon=False)
    env, args = result["env"], result["args"]
    fig.suptitle(f"routed SwiGLU FFN on {env['device_name']} ({args['dtype']}, D={args['d']}, F={args['f']}), "
                 f"ours = {result['ours_backend']}, git {str(result['git']['sha'])[:10]}"
                 + (" (dirty)" if result["git"]["dirty"] else ""))
    if result["unavailable"]:
        fig.text(0.01, 0.005, "not shown (unavailable): " + ", ".join(result["unavailable"]), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- CLI

def parse_fractions(text: str) -> list[float]:
    try:
        out = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"fractions must be numbers: {exc}") from None
    if not out or any(not 0 <= f <= 1 for f in out):
        raise argparse.ArgumentTypeError(f"fractions must lie in [0, 1], got {text!r}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_ffn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cuda[:N] or cpu (default: cuda if available)")
    p.add_argument("--d", type=int, help="model width D (CUDA 2048, CPU 512)")
    p.add_argument("--f", type=int, help="FFN width F (CUDA 8192, CPU 2048)")
    p.add_argument("--dtype", choices=list(DTYPES), help="CUDA bf16, CPU fp32")
    p.add_argument("--tokens", type=parse_tokens, help="token counts T, k = 1024 (CUDA 1k,4k,16k,64k; CPU 256,1k,4k)")
    p.add_argument("--fractions", type=parse_fractions, help="visual fractions (default 0,0.25,0.5,0.9,1)")
    p.add_argument("--modes", type=choice_list(MODES), default=list(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--impls", type=choice_list(IMPLS), default=list(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--warmup", type=float, help="warm-up time per measurement in ms (CUDA 25, CPU 1: one call)")
    p.add_argument("--rep", type=float, help=f"timing time per measurement in ms (CUDA 100, CPU 1000; CPU at least "
                                             f"{CPU_MIN_REPS} reps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--span", type=int, help="tokens per image span (default 256)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (D 64, F 128, T 64,256)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type not in DEVICE_DEFAULTS:
        p.error(f"--device {args.device}: only cuda and cpu are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    defaults = {**DEVICE_DEFAULTS[device.type], "fractions": FRACTIONS, **(QUICK if args.quick else {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("d", "f", "span"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if "dense" not in args.impls:
        print("note: dense added to --impls (every ratio is against it)", file=sys.stderr)
        args.impls = ["dense", *args.impls]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # do_bench times on the current device
    start = time.perf_counter()
    env = environment(device)
    env.update({kernels.BACKEND_ENV: os.environ.get(kernels.BACKEND_ENV),
                "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")})
    ours_backend = kernels.select_backend(device)
    print(f"moe_ffn benchmark on {env['device_name']} ({device}, {env['num_threads']} threads): D={args.d} "
          f"F={args.f} {args.dtype}, T={args.tokens}, vis fractions={args.fractions}, ours -> {ours_backend}",
          file=sys.stderr)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    raw = sweep(args, device, dtype, log)
    rows = finish(raw["records"], args.modes, args, raw["cases"])
    for r in rows:
        for k in ("ms", "p20_ms", "p80_ms", "reps"):
            r.setdefault(k, None)
    stamp = datetime.datetime.now()
    result = {
        "benchmark": "moe_ffn",
        "created": stamp.isoformat(timespec="seconds"),
        "git": git_state(),
        "env": env,
        "args": {**vars(args), "out": str(args.out)},
        "ours_backend": ours_backend,
        "conventions": {
            "time": "ms; CUDA: median of triton.testing.do_bench (L2 flushed before every rep); CPU: minimum over "
                    "rounds of time.perf_counter that time all implementations of a case interleaved",
            "flops": "useful FLOPs of one routed FFN: fwd 6TDF, fwdbwd 18TDF, bwd 12TDF, frozen 12TDF + 6TDF*f, "
                     "frozen_bwd 6TDF + 6TDF*f, f = actual visual fraction; blend is charged the same (its "
                     "TFLOP/s shows the waste); dense is charged its own work (18TDF / 12TDF in frozen modes)",
            "bwd": "derived: ms(fwdbwd) - ms(fwd); frozen_bwd = ms(frozen) - ms(fwd)",
            "frozen": "expert 0 (text) weights requires_grad=False, expert 1 and x trainable; dense keeps all its "
                      "weights trainable, so its frozen rows are its fwdbwd rows and frozen ratios compare with "
                      "the full dense fwdbwd (FLOP ideal (2+f)/3, frozen_bwd (1+f)/2)",
            "ratio_to_dense": "ms / dense ms at the same T, f and mode; dense ignores the routing but is timed "
                              "with every case",
            "check": "forward vs kernels.moe_ffn_reference (fp32), relative Frobenius error <= tol before timing; "
                     "an impl over tol is still timed and marked WRONG",
            "routing": "built once per (T, f) outside the timed region, with host counts (as the model does)",
        },
        "measurements": rows,
        "cases": raw["cases"],
        "checks": raw["checks"],
        "unavailable": raw["unavailable"],
        "errors": [r for r in rows if r["status"] == "error"],
    }
    result["targets"] = evaluate_targets(rows, device, args.tokens, args.fractions)
    result["wall_s"] = time.perf_counter() - start
    print_report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"moe_ffn_{device_tag(env, device)}_{stamp:%Y%m%d-%H%M%S}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    plot(result, png_path)
    print(f"\nwrote {json_path}\nwrote {png_path}\n(wall {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
