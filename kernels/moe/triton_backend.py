"""Triton backend of the routed SwiGLU FFN: launchers, autotuning, the ``torch.library`` custom ops and autograd.

Legend: T tokens, D model width, F FFN width, E experts; "sorted" = expert order (``Routing.perm_T``).

Forward (2 launches): ``gate_up`` reads ``x`` rows through ``perm`` and writes ``h = silu(x W1^T) * (x W3^T)`` in
sorted order (plus the pre-activations ``g = x W1^T``, ``u = x W3^T`` when a backward will follow); ``down``
computes ``h W2^T`` and stores each row straight to its original position. No separate gather or scatter pass.

Backward (up to 4 launches, each skipped when nothing needs it):
1. ``dW2[e] = dy[rows e]^T h[rows e]`` for experts whose ``w2`` trains (``h`` recomputed from ``g``, ``u`` on load);
2. ``dh = dy W2`` with the SwiGLU derivative fused in the epilogue: ``dg``, ``du`` in sorted order;
3. ``dW1[e] = dg[rows e]^T x[rows e]``, ``dW3[e] = du[rows e]^T x[rows e]`` for experts whose ``w1``/``w3`` train;
4. ``dx = dg W1 + du W3``, each row stored to its original position.
Weight gradients are computed only for experts (and matrices) that require grad: a frozen expert's weight
gradients launch nothing. Every weight-gradient tile is reduced inside one program: deterministic, no atomics.

The ops are ``torch.ops.mono.moe_ffn_fwd`` / ``torch.ops.mono.moe_ffn_bwd`` with fake (meta) implementations
and autograd registered, so ``torch.compile`` traces through them without a graph break.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton

from . import triton_kernels as tk
from .routing import Routing

__all__ = ["interpreting", "moe_ffn_triton", "triton_unavailable_reason"]

# Fixed configuration for TRITON_INTERPRET=1 runs (the interpreter costs ~2 ms per program and k-step, so
# few, big tiles). On GPUs without autotuning (MONO_MOE_AUTOTUNE=0) the first config of the pruned list is used.
INTERPRET_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
AUTOTUNE_ENV = "MONO_MOE_AUTOTUNE"
# Debugging aid used by the tests: fill every buffer the ops allocate with NaN first, so an element a kernel
# forgets to write shows up instead of hiding behind whatever the allocator handed back.
POISON_ENV = "MONO_MOE_POISON"
# Hopper has 227 KiB of shared memory per block; keep some headroom for the epilogue.
SMEM_LIMIT = 220 * 1024


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` at import time of triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or ``None`` when they can."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    if device.type == "cpu":
        return "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported (CPU)"
    return f"the triton backend does not support {device.type} tensors"


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU): token count bucketed to a power of two in the key, configs pruned by shared memory.


def _bucket(num_rows: int) -> int:
    return max(256, triton.next_power_of_2(max(num_rows, 1)))


def _gemm_configs() -> list[triton.Config]:
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; the first that fits is the fixed default
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),  # small footprints for fp32 operands and the dual-operand kernel
        (64, 64, 32, 4, 2),
    ]
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _wgrad_configs() -> list[triton.Config]:
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 5),  # deeper prefetch: each row step also loads its perm indices
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 5),
        (64, 128, 64, 4, 5),
        (64, 64, 64, 4, 3),
        (64, 64, 32, 4, 3),
        (64, 64, 32, 4, 2),
    ]
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes
    ]


def _fits(cfg: triton.Config, *, a_tiles: int, b_tiles: int, live_tiles: int, elsize: int) -> bool:
    """Shared memory of the pipelined operand tiles within the limit (fp32 operands need ~1.5x more with TF32
    conversion buffers: measured with ptxas for sm_90), and at most 128 fp32 registers per thread for the live
    ``BLOCK_M x BLOCK_N`` tiles (accumulators, epilogue operands) so the kernel does not spill."""
    k = cfg.kwargs
    per_stage = a_tiles * k["BLOCK_M"] * k["BLOCK_K"] + b_tiles * k["BLOCK_N"] * k["BLOCK_K"]
    smem = cfg.num_stages * elsize * per_stage * (1.5 if elsize == 4 else 1.0)
    regs = live_tiles * k["BLOCK_M"] * k["BLOCK_N"] / (32 * cfg.num_warps)
    return smem <= SMEM_LIMIT and regs <= 128


def _no_config(kind: str, named_args) -> RuntimeError:
    return RuntimeError(f"no {kind} kernel configuration fits this GPU's shared memory and registers for {named_args}")


def _prune_gemm(configs, named_args, **kwargs):
    mode = kwargs.get("MODE", named_args.get("MODE"))
    shape = dict(
        a_tiles=2 if mode == tk.MODE_DUAL else 1,
        b_tiles=2 if mode in (tk.MODE_GATE_UP, tk.MODE_DUAL) else 1,
        live_tiles=2 if mode in (tk.MODE_GATE_UP, tk.MODE_DSWIGLU) else 1,
        elsize=named_args["a_ptr"].element_size(),
    )
    kept = [cfg for cfg in configs if _fits(cfg, **shape)]
    if named_args["M_BUCKET"] <= 1024 and any(c.kwargs["BLOCK_M"] == 64 for c in kept):
        kept = [c for c in kept if c.kwargs["BLOCK_M"] == 64]  # few tokens: small row tiles fill the SMs
    if not kept:
        raise _no_config("gemm", {k: named_args.get(k, kwargs.get(k)) for k in ("N", "K", "M_BUCKET", "MODE")})
    return kept


def _prune_wgrad(configs, named_args, **kwargs):
    mode = kwargs.get("MODE", named_args.get("MODE"))
    shape = dict(
        a_tiles=2 if mode == tk.WGRAD_GATE_UP else 1,
        b_tiles=2 if mode == tk.WGRAD_DOWN else 1,  # g and u loaded for h
        live_tiles=2 if mode == tk.WGRAD_GATE_UP else 1,
        elsize=named_args["p_ptr"].element_size(),
    )
    kept = [cfg for cfg in configs if _fits(cfg, **shape)]
    if not kept:
        raise _no_config("wgrad", {k: named_args.get(k, kwargs.get(k)) for k in ("M", "N", "M_BUCKET", "MODE")})
    return kept


def _fixed_config(kind: str, named_args: dict, mode: int) -> dict:
    """The config used without autotuning: the first of the kernel's list that fits (meta-parameters and
    ``num_warps`` / ``num_stages`` as launch keyword arguments)."""
    configs, prune = (_gemm_configs(), _prune_gemm) if kind == "gemm" else (_wgrad_configs(), _prune_wgrad)
    cfg = prune(configs, named_args, MODE=mode)[0]
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def build_autotuner(kind: str, configs: list[triton.Config] | None = None, do_bench=None):
    """``triton.autotune`` around the ``kind`` ("gemm" or "wgrad") kernel, keyed on the sizes, the token-count
    bucket and the mode, with the shared-memory / register pruning. ``configs`` and ``do_bench`` default to the
    Hopper list and Triton's GPU timer (the interpreter tests pass small configs and a CPU timer)."""
    kernel, default_configs, key, prune = {
        "gemm": (tk.routed_gemm_kernel, _gemm_configs, ["N", "K", "M_BUCKET", "MODE"], _prune_gemm),
        "wgrad": (tk.routed_wgrad_kernel, _wgrad_configs, ["M", "N", "M_BUCKET", "MODE"], _prune_wgrad),
    }[kind]
    return triton.autotune(
        configs=configs or default_configs(), key=key, prune_configs_by={"early_config_prune": prune},
        do_bench=do_bench,
    )(kernel)


@functools.cache
def _tuned(kind: str):
    """The autotuned ``kind`` kernel, built on first use (GPU only)."""
    return build_autotuner(kind)


def _autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(AUTOTUNE_ENV, "1") != "0"


# ----------------------------------------------------------------------------------------------------------
# Launchers


def _offset_table(tensors: Sequence[torch.Tensor | None], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(base, table, align)``: the first tensor, the int64 element offsets of every tensor from it (0 for
    ``None``) on ``device`` (copied without blocking the host), and the largest power of two <= 16 dividing
    all offsets (the kernels' alignment hint)."""
    base = next(t for t in tensors if t is not None)
    elsize = base.element_size()
    offsets = []
    for t in tensors:
        delta = 0 if t is None else t.data_ptr() - base.data_ptr()
        if delta % elsize:
            raise ValueError("expert tensors must be aligned to their element size")
        offsets.append(delta // elsize)
    align = 16
    while align > 1 and any(o % align for o in offsets):
        align //= 2
    return base, _int64_table(offsets, device), align


def _int64_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on ``device`` (read-only for the kernels), cached by its values and the current
    stream: the weights of a step sit where they sat the step before, so in steady state no copy is made."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (tuple(int(v) for v in values), device, stream)
    table = _TABLES.get(key)
    if table is None:
        table = _new_table(key)
    return table


_TABLES: dict = {}
_TABLES_MAX = 1024


def _new_table(key) -> torch.Tensor:
    values, device, _ = key
    table = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "kernels.moe_ffn (triton) met new weights while a CUDA graph was being captured; run one step "
                "with the same weights before capturing"
            )
        # From pinned memory, without blocking the host, on the stream the kernels that read it run on (the
        # stream is part of the cache key; the allocator orders the eventual free after its use there).
        table = table.pin_memory().to(device, non_blocking=True)
    else:
        table = table.to(device)
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.pop(next(iter(_TABLES)))  # oldest first
    _TABLES[key] = table
    return table


def _alloc(shape, like: torch.Tensor) -> torch.Tensor:
    """``torch.empty`` in ``like``'s dtype and device (NaN-filled under ``MONO_MOE_POISON=1``)."""
    if os.environ.get(POISON_ENV, "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32 (the newer ``fp32_precision`` flag first: with it set, reading
    the older ``allow_tf32`` raises in recent torch)."""
    try:
        precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    except RuntimeError:
        precision = None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and _tf32_allowed():
        return "tf32"
    return "ieee"


def _same_layout(ws: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """All experts' weights with one stride pattern (the kernels read expert 0's strides)."""
    if all(w.stride() == ws[0].stride() for w in ws) and all(s > 0 for s in ws[0].stride()):
        return list(ws)
    return [w.contiguous() for w in ws]


def _weights_layout(w1, w3, w2):
    """``w1`` and ``w3`` are read with one stride pattern (one kernel loads both), ``w2`` with its own."""
    w13 = _same_layout([*w1, *w3])
    return w13[: len(w1)], w13[len(w1):], _same_layout(w2)


def _gemm(
    mode: int, *, a, rows, offsets, num_experts, b, b_transposed, c, n, k,
    a2=None, b2=None, c2=None, c3=None, aux1=None, aux2=None,
    gather_a=False, scatter_c=False, save_pre=False,
):
    """Launch :func:`routed_gemm_kernel`. ``b``/``b2``: per-expert weights; ``b_transposed``: use ``W^T`` (``W`` is
    ``(N, K)``, the ``nn.Linear`` layout) instead of ``W`` (``(K, N)``)."""
    num_rows = rows.numel()
    device = a.device
    w0 = b[0]
    stride_bk, stride_bn = (w0.stride(1), w0.stride(0)) if b_transposed else (w0.stride(0), w0.stride(1))
    # The kernel reads A2 with A's strides, B2 with B's, and C2, C3, aux with C's (sorted) strides.
    if a2 is not None and a2.stride() != a.stride():
        raise AssertionError("a2 must have a's strides")
    if b2 is not None and b2[0].stride() != w0.stride():
        raise AssertionError("b2 must have b's strides")
    stride_cm, stride_cn = c.stride()
    for t in (c2, c3, aux1, aux2):
        if t is not None and t.stride() != (stride_cm, stride_cn):
            raise AssertionError(f"sorted outputs must share strides {(stride_cm, stride_cn)}, got {t.stride()}")
    b_base, b_tab, b_align = _offset_table(b, device)
    b2_base, b2_tab, b2_align = _offset_table(b if b2 is None else b2, device)
    args = (
        a, a if a2 is None else a2, rows,
        b_base, b_tab, b2_base, b2_tab,
        c, c if c2 is None else c2, c if c3 is None else c3,
        c if aux1 is None else aux1, c if aux2 is None else aux2,
        offsets, n, k, _bucket(num_rows),
        a.stride(0), a.stride(1), stride_bk, stride_bn, stride_cm, stride_cn,
    )
    flags = dict(
        E=num_experts, B_ALIGN=min(b_align, b2_align), MODE=mode, GATHER_A=gather_a, SCATTER_C=scatter_c, SAVE_PRE=save_pre,
        DOT_PRECISION=_dot_precision(a.dtype, device),
    )

    def grid(meta):
        return ((triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts - 1) * triton.cdiv(n, meta["BLOCK_N"]),)

    if _autotune_enabled(device):
        _tuned("gemm")[grid](*args, **flags)
    else:
        named = {"a_ptr": a, "M_BUCKET": _bucket(num_rows), "N": n, "K": k}
        cfg = INTERPRET_CONFIG if device.type == "cpu" else _fixed_config("gemm", named, mode)
        tk.routed_gemm_kernel[grid(cfg)](*args, **flags, **cfg)


def _wgrad(mode: int, *, p, q, rows, offsets, experts, outs, m, n, p2=None, q2=None, outs2=None):
    """Launch :func:`routed_wgrad_kernel` for the experts listed in ``experts`` (a host list of ints)."""
    device = p.device
    if not experts:
        return
    out_base, out_tab, out_align = _offset_table(outs, device)
    out2_base, out2_tab, out2_align = _offset_table(outs if outs2 is None else outs2, device)
    like = out_base
    args = (
        p, p if p2 is None else p2, q, q if q2 is None else q2, rows,
        out_base, out_tab, out2_base, out2_tab,
        _int64_table(experts, device), offsets,
        m, n, _bucket(rows.numel()),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), like.stride(0), like.stride(1),
    )
    flags = dict(OUT_ALIGN=min(out_align, out2_align), MODE=mode, DOT_PRECISION=_dot_precision(p.dtype, device))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), len(experts))

    if _autotune_enabled(device):
        _tuned("wgrad")[grid](*args, **flags)
    else:
        named = {"p_ptr": p, "M_BUCKET": _bucket(rows.numel()), "M": m, "N": n}
        if device.type == "cpu":
            cfg = {key: val for key, val in INTERPRET_CONFIG.items() if key != "GROUP_M"}
        else:
            cfg = _fixed_config("wgrad", named, mode)
        tk.routed_wgrad_kernel[grid(cfg)](*args, **flags, **cfg)


# ----------------------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("mono::moe_ffn_fwd", mutates_args=())
def moe_ffn_fwd(
    x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor,
    w1: list[torch.Tensor], w3: list[torch.Tensor], w2: list[torch.Tensor], save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, g, u)``: the routed SwiGLU FFN output ``(T, D)`` in token order and, when ``save``, the sorted
    pre-activations ``g = x W1^T``, ``u = x W3^T`` ``(T, F)`` for the backward (empty ``(0,)`` otherwise)."""
    t, d = x.shape
    f = w1[0].shape[0]
    e = len(w1)
    w1, w3, w2 = _weights_layout(w1, w3, w2)
    y = _alloc((t, d), x)
    h = _alloc((t, f), x)
    g = _alloc((t, f), x) if save else x.new_empty(0)
    u = _alloc((t, f), x) if save else x.new_empty(0)
    if t == 0:
        return y, g, u
    _gemm(
        tk.MODE_GATE_UP, a=x, rows=perm, offsets=offsets, num_experts=e, b=w1, b2=w3, b_transposed=True,
        c=h, c2=g if save else None, c3=u if save else None, n=f, k=d, gather_a=True, save_pre=save,
    )
    _gemm(
        tk.MODE_PLAIN, a=h, rows=perm, offsets=offsets, num_experts=e, b=w2, b_transposed=True,
        c=y, n=d, k=f, scatter_c=True,
    )
    return y, g, u


@moe_ffn_fwd.register_fake
def _moe_ffn_fwd_fake(x, perm, offsets, w1, w3, w2, save):
    t, d = x.shape
    f = w1[0].shape[0]
    pre = (lambda: x.new_empty(t, f)) if save else (lambda: x.new_empty(0))
    return x.new_empty(t, d), pre(), pre()


@torch.library.custom_op("mono::moe_ffn_bwd", mutates_args=())
def moe_ffn_bwd(
    dy: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor,
    w1: list[torch.Tensor], w3: list[torch.Tensor], w2: list[torch.Tensor],
    g: torch.Tensor, u: torch.Tensor,
    need_dx: bool, need_w1: list[bool], need_w3: list[bool], need_w2: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``(dx, dw1, dw3, dw2)``; ``dx`` is empty unless ``need_dx``; each list holds the gradients of the experts
    whose flag is set, in expert order (frozen experts cost nothing)."""
    t, d = x.shape
    f = w1[0].shape[0]
    e = len(w1)
    w1, w3, w2 = _weights_layout(w1, w3, w2)
    dw1 = [_alloc(w1[i].shape, w1[i]) if need_w1[i] else None for i in range(e)]
    dw3 = [_alloc(w3[i].shape, w3[i]) if need_w3[i] else None for i in range(e)]
    dw2 = [_alloc(w2[i].shape, w2[i]) if need_w2[i] else None for i in range(e)]
    dx = _alloc((t, d), x) if need_dx else x.new_empty(0)
    if t == 0:
        for grads in (dw1, dw3, dw2):
            for grad in grads:
                if grad is not None:
                    grad.zero_()
    else:
        train2 = [i for i in range(e) if need_w2[i]]
        _wgrad(
            tk.WGRAD_DOWN, p=dy, q=g, q2=u, rows=perm, offsets=offsets, experts=train2, outs=dw2, m=d, n=f,
        )
        train13 = [i for i in range(e) if need_w1[i] or need_w3[i]]
        if need_dx or train13:
            dg = _alloc((t, f), x)
            du = _alloc((t, f), x)
            _gemm(
                tk.MODE_DSWIGLU, a=dy, rows=perm, offsets=offsets, num_experts=e, b=w2, b_transposed=False,
                c=dg, c2=du, aux1=g, aux2=u, n=f, k=d, gather_a=True,
            )
            if train13:
                # dW1 and dW3 come out of one kernel; a frozen partner gets a scratch output that is dropped.
                out1 = [dw1[i] if need_w1[i] else (_alloc(w1[i].shape, w1[i]) if i in train13 else None) for i in range(e)]
                out3 = [dw3[i] if need_w3[i] else (_alloc(w3[i].shape, w3[i]) if i in train13 else None) for i in range(e)]
                _wgrad(
                    tk.WGRAD_GATE_UP, p=dg, p2=du, q=x, rows=perm, offsets=offsets, experts=train13,
                    outs=out1, outs2=out3, m=f, n=d,
                )
            if need_dx:
                _gemm(
                    tk.MODE_DUAL, a=dg, a2=du, rows=perm, offsets=offsets, num_experts=e, b=w1, b2=w3,
                    b_transposed=False, c=dx, n=d, k=f, scatter_c=True,
                )
    keep = lambda grads: [grad for grad in grads if grad is not None]  # noqa: E731
    return dx, keep(dw1), keep(dw3), keep(dw2)


@moe_ffn_bwd.register_fake
def _moe_ffn_bwd_fake(dy, x, perm, offsets, w1, w3, w2, g, u, need_dx, need_w1, need_w3, need_w2):
    def grads(ws, flags):
        return [w.new_empty(w.shape) for w, flag in zip(ws, flags) if flag]

    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, grads(w1, need_w1), grads(w3, need_w3), grads(w2, need_w2)


def _setup_context(ctx, inputs, output):
    x, perm, offsets, w1, w3, w2, save = inputs
    _, g, u = output
    if not save:
        ctx.saved = False
        return
    ctx.saved = True
    ctx.num_experts = len(w1)
    ctx.need_dx = x.requires_grad
    ctx.need_w = [[w.requires_grad for w in ws] for ws in (w1, w3, w2)]
    ctx.save_for_backward(x, perm, offsets, g, u, *w1, *w3, *w2)


def _expand(grads: list[torch.Tensor], flags: list[bool]) -> list[torch.Tensor | None]:
    it = iter(grads)
    return [next(it) if flag else None for flag in flags]


def _backward(ctx, dy, dg_unused, du_unused):
    if not ctx.saved:
        raise RuntimeError(
            "mono::moe_ffn_fwd ran with save=False (no pre-activations kept) but a backward was requested; "
            "call kernels.moe_ffn, which sets save from the autograd state"
        )
    x, perm, offsets, g, u, *ws = ctx.saved_tensors
    e = ctx.num_experts
    w1, w3, w2 = ws[:e], ws[e:2 * e], ws[2 * e:]
    need_w1, need_w3, need_w2 = ctx.need_w
    dx, dw1, dw3, dw2 = moe_ffn_bwd(dy, x, perm, offsets, w1, w3, w2, g, u, ctx.need_dx, need_w1, need_w3, need_w2)
    return (
        dx if ctx.need_dx else None, None, None,
        _expand(dw1, need_w1), _expand(dw3, need_w3), _expand(dw2, need_w2), None,
    )


moe_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


def moe_ffn_triton(
    x_TD: torch.Tensor,
    routing: Routing,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Routed SwiGLU FFN with the Triton kernels; see :func:`kernels.moe_ffn` for the contract."""
    weights = (*w1, *w3, *w2)
    save = torch.is_grad_enabled() and (x_TD.requires_grad or any(w.requires_grad for w in weights))
    y, _, _ = moe_ffn_fwd(x_TD, routing.perm_T, routing.offsets_E1, list(w1), list(w3), list(w2), save)
    return y
