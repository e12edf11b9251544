"""Shared cases and helpers of the routed-FFN tests: fresh seeded inputs, autograd runs, the fp32 reference.

Legend: T tokens, D model width, F FFN width, E experts.
"""

from __future__ import annotations

import zlib

import torch

import kernels

# fp32 backend vs fp32 reference: same math, different summation order (grouped GEMM, slices).
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16 backend (bf16 matmuls, bf16 intermediates) vs the fp32 reference on the same bf16-rounded inputs:
# relative Frobenius error ||got - ref|| / ||ref||.
BF16_REL_TOL = 2e-2

# name: (T, D, F, E, kind). D and F are multiples of 16 unless a case says otherwise.
CASES = {
    "T1": (1, 16, 32, 2, "random"),
    "T7_below_tile": (7, 32, 48, 2, "random"),
    "odd_D33_F47": (13, 33, 47, 2, "random"),
    "all_text": (20, 32, 64, 2, "all_text"),
    "all_visual": (20, 32, 64, 2, "all_visual"),
    "empty_expert0": (9, 16, 32, 2, "empty_expert0"),
    "random_split": (64, 48, 80, 2, "random"),
    "three_experts": (40, 32, 48, 3, "random"),
    "T0": (0, 16, 32, 2, "random"),
}


def case_ids(T: int, E: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "all_text":
        return torch.zeros(T, dtype=torch.long)
    if kind == "all_visual":
        return torch.full((T,), E - 1, dtype=torch.long)
    if kind == "empty_expert0":
        return torch.randint(1, E, (T,), generator=gen)
    return torch.randint(0, E, (T,), generator=gen)


def make_inputs(case: str, T: int, D: int, F: int, E: int, kind: str, dtype=torch.float32):
    """Fresh random inputs seeded by the case id: ids, x, and per-expert w1, w3, w2 (values of order 1)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    ids_T = case_ids(T, E, kind, gen)
    x_TD = torch.randn(T, D, generator=gen).to(dtype)
    w1 = [(torch.randn(F, D, generator=gen) / D**0.5).to(dtype) for _ in range(E)]
    w3 = [(torch.randn(F, D, generator=gen) / D**0.5).to(dtype) for _ in range(E)]
    w2 = [(torch.randn(D, F, generator=gen) / F**0.5).to(dtype) for _ in range(E)]
    dy_TD = torch.randn(T, D, generator=gen)
    return ids_T, x_TD, w1, w3, w2, dy_TD


def leaves(x_TD, w1, w3, w2, frozen=()):
    """Detached copies that require grad, except the experts in ``frozen``."""
    x = x_TD.detach().clone().requires_grad_(True)
    ws = [[w.detach().clone().requires_grad_(e not in frozen) for e, w in enumerate(group)] for group in (w1, w3, w2)]
    return x, *ws


def run_fwd_bwd(fn, x, w1, w3, w2, dy_TD):
    """Forward with ``fn(x, w1, w3, w2)``, backward with ``dy_TD``; returns y and {name: grad}."""
    y = fn(x, w1, w3, w2)
    (y.float() * dy_TD).sum().backward()
    grads = {"x": x.grad}
    for name, group in (("w1", w1), ("w3", w3), ("w2", w2)):
        for e, w in enumerate(group):
            grads[f"{name}[{e}]"] = w.grad
    return y, grads


def reference(ids_T, x_TD, w1, w3, w2, dy_TD, frozen=()):
    """The fp32 reference's output and gradients on fp32 copies of the inputs."""
    args = leaves(x_TD.float(), *([w.float() for w in ws] for ws in (w1, w3, w2)), frozen=frozen)
    return run_fwd_bwd(lambda x, a, b, c: kernels.moe_ffn_reference(x, ids_T, a, b, c), *args, dy_TD)
