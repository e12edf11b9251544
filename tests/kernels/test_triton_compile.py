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


def _check(compiled):
    ptx = compiled.asm["ptx"]
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


@pytest.mark.parametrize("mode", list(GEMM_MODES))
def test_routed_gemm_compiles_for_h100(mode):
    number, gather, scatter, unit = GEMM_MODES[mode]
    cfg = tb.DEFAULT_GPU_CONFIG
    constexprs = dict(
        E=2, B_ALIGN=16, MODE=number, GATHER_A=gather, SCATTER_C=scatter, SAVE_PRE=True, DOT_PRECISION="ieee",
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        **{name: 1 for name in unit},
    )
    _check(_compile(tk.routed_gemm_kernel, constexprs, "bf16", cfg["num_warps"], cfg["num_stages"]))


@pytest.mark.parametrize("mode", ["down", "gate_up"])
def test_routed_wgrad_compiles_for_h100(mode):
    number = {"down": tk.WGRAD_DOWN, "gate_up": tk.WGRAD_GATE_UP}[mode]
    unit = ("stride_pm", "stride_qn", "stride_on")
    cfg = tb.DEFAULT_GPU_WGRAD_CONFIG
    constexprs = dict(
        OUT_ALIGN=16, MODE=number, DOT_PRECISION="ieee",
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **{name: 1 for name in unit},
    )
    _check(_compile(tk.routed_wgrad_kernel, constexprs, "bf16", cfg["num_warps"], cfg["num_stages"]))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(GEMM_MODES))
def test_every_autotune_config_that_survives_pruning_compiles(mode):
    number, gather, scatter, unit = GEMM_MODES[mode]
    import torch

    a = torch.empty(0, dtype=torch.bfloat16)
    for bucket in (256, 16384):
        kept = tb._prune_gemm(tb._gemm_configs(), dict(a_ptr=a, M_BUCKET=bucket, MODE=number))
        assert kept
        for cfg in kept:
            constexprs = dict(
                E=2, B_ALIGN=16, MODE=number, GATHER_A=gather, SCATTER_C=scatter, SAVE_PRE=True,
                DOT_PRECISION="ieee", **cfg.kwargs, **{name: 1 for name in unit},
            )
            _check(_compile(tk.routed_gemm_kernel, constexprs, "bf16", cfg.num_warps, cfg.num_stages))
