"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The interpreter runs the kernels' arithmetic but not Triton's GPU compiler, which rejects things the interpreter
accepts (non-constexpr globals, type mismatches in branches, ...). Here every kernel variant the backend
launches goes through the real compiler and ``ptxas`` (shipped in the triton wheel) for an H100 target, with the
argument specialisations a launch on contiguous bf16 tensors gets (16-divisible pointers and sizes, unit
strides as constants), and the result must use Hopper's tensor-core instructions (``wgmma``), software
pipelining (``cp.async``) and fit the 227 KiB of shared memory.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.moe import triton_backend as tb
from kernels.moe import triton_kernels as tk

pytestmark = pytest.mark.skipif(tb.interpreting(), reason="compiles real GPU code; not under TRITON_INTERPRET=1")

H100 = GPUTarget("cuda", 90, 32)
INDEX_ARGS = ("rows_ptr", "offsets_ptr", "experts_ptr")
HOPPER_SMEM = 227 * 1024


def _compile(kernel, constexprs: dict, dtype: str, num_warps: int, num_stages: int):
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INDEX_ARGS or name.endswith("_tab"):
            signature[name], attrs[(i,)] = "*i64", [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            signature[name], attrs[(i,)] = f"*{dtype}", [["tt.divisibility", 16]]
        else:  # sizes and strides of large contiguous tensors
            signature[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=H100, options=dict(num_warps=num_warps, num_stages=num_stages))


def _check(compiled, dtype: str):
    ptx = compiled.asm["ptx"]
    if dtype == "bf16":
        assert "wgmma" in ptx, "no Hopper tensor-core MMA in the PTX"
    assert "cp.async" in ptx, "loads are not pipelined"
    assert compiled.metadata.shared <= HOPPER_SMEM, compiled.metadata.shared


GEMM_MODES = {
    # mode: (gather A, scatter C, unit-stride args) as the backend launches it
    "gate_up": (tk.MODE_GATE_UP, True, False, ("stride_ak", "stride_bk", "stride_cn")),
    "down": (tk.MODE_PLAIN, False, True, ("stride_ak", "stride_bk", "stride_cn")),
    "dswiglu": (tk.MODE_DSWIGLU, True, False, ("stride_ak", "stride_bn", "stride_cn")),
    "dx_dual": (tk.MODE_DUAL, False, True, ("stride_ak", "stride_bn", "stride_cn")),
}
WGRAD_MODES = {"down": tk.WGRAD_DOWN, "gate_up": tk.WGRAD_GATE_UP}
# (dtype name for the signature, torch dtype, dot precision): bf16, and fp32 with IEEE and TF32 dots.
DTYPES = {
    "bf16": ("bf16", torch.bfloat16, "ieee"),
    "fp32_ieee": ("fp32", torch.float32, "ieee"),
    "fp32_tf32": ("fp32", torch.float32, "tf32"),
}


def _gemm(mode, dtype_id, cfg):
    number, gather, scatter, unit = GEMM_MODES[mode]
    dtype, _, precision = DTYPES[dtype_id]
    constexprs = dict(
        E=2, B_ALIGN=16, MODE=number, GATHER_A=gather, SCATTER_C=scatter, SAVE_PRE=True, DOT_PRECISION=precision,
        **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}, **{name: 1 for name in unit},
    )
    _check(_compile(tk.routed_gemm_kernel, constexprs, dtype, cfg["num_warps"], cfg["num_stages"]), dtype)


def _wgrad(mode, dtype_id, cfg):
    dtype, _, precision = DTYPES[dtype_id]
    constexprs = dict(
        OUT_ALIGN=16, MODE=WGRAD_MODES[mode], DOT_PRECISION=precision,
        **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")},
        **{name: 1 for name in ("stride_pm", "stride_qn", "stride_on")},
    )
    _check(_compile(tk.routed_wgrad_kernel, constexprs, dtype, cfg["num_warps"], cfg["num_stages"]), dtype)


def _named(kind, dtype_id, bucket):
    like = torch.empty(0, dtype=DTYPES[dtype_id][1])
    return {("a_ptr" if kind == "gemm" else "p_ptr"): like, "M_BUCKET": bucket}


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("mode", list(GEMM_MODES))
def test_routed_gemm_default_config_compiles_for_h100(mode, dtype_id):
    """The config used without autotuning (MONO_MOE_AUTOTUNE=0) for 16k tokens."""
    cfg = tb._fixed_config("gemm", _named("gemm", dtype_id, 16384), GEMM_MODES[mode][0])
    _gemm(mode, dtype_id, cfg)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("mode", list(WGRAD_MODES))
def test_routed_wgrad_default_config_compiles_for_h100(mode, dtype_id):
    cfg = tb._fixed_config("wgrad", _named("wgrad", dtype_id, 16384), WGRAD_MODES[mode])
    _wgrad(mode, dtype_id, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("kind_mode", [("gemm", m) for m in GEMM_MODES] + [("wgrad", m) for m in WGRAD_MODES])
def test_every_autotune_config_that_survives_pruning_compiles(kind_mode, dtype_id):
    kind, mode = kind_mode
    number = GEMM_MODES[mode][0] if kind == "gemm" else WGRAD_MODES[mode]
    configs, prune = (tb._gemm_configs(), tb._prune_gemm) if kind == "gemm" else (tb._wgrad_configs(), tb._prune_wgrad)
    seen = set()
    for bucket in (256, 16384):
        for cfg in prune(configs, _named(kind, dtype_id, bucket), MODE=number):
            key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)
            if key in seen:
                continue
            seen.add(key)
            launch = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            (_gemm if kind == "gemm" else _wgrad)(mode, dtype_id, launch)
