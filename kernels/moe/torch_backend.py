"""Sort + matmul backend of the routed SwiGLU FFN (plain PyTorch, autograd through ordinary ops).

Legend: T tokens, D model width, F FFN width, E experts.

Algorithm: gather the tokens into expert order (one ``index_select``), run each expert's SwiGLU on its own
contiguous rows, scatter back with the inverse permutation. Each token is computed by exactly one expert, so
the FLOPs are those of one dense FFN over the T tokens.

How an expert's rows are found without a host sync:
- CPU tokens: the counts are already Python ints (``Routing.counts_host``), so each expert is a ``narrow``.
- accelerator tokens: ``torch._grouped_mm`` takes the device-side offsets directly (no ``.item()``); the
  per-expert weights are stacked for the call (a copy of E x D x F per projection; the Triton kernels of
  ``kernels.moe`` read the expert weights in place instead).

Frozen experts cost no weight gradient: a weight with ``requires_grad=False`` is a constant to autograd.
An expert with zero tokens contributes a length-0 ``narrow`` and gets an exact zero weight gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .routing import Routing


def _swiglu(x_ND: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_ND, w1_FD)) * F.linear(x_ND, w3_FD), w2_DF)


def _grouped_mm_ok(x_TD: torch.Tensor, w1: Sequence[torch.Tensor]) -> bool:
    # torch._grouped_mm needs 16-byte aligned row strides on both operands.
    align = 16 // x_TD.element_size()
    d, f = x_TD.shape[1], w1[0].shape[0]
    return hasattr(torch, "_grouped_mm") and d % align == 0 and f % align == 0


def moe_ffn_torch(
    x_TD: torch.Tensor,
    routing: Routing,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Routed SwiGLU FFN; see :func:`kernels.moe_ffn` for the contract."""
    xs_TD = x_TD.index_select(0, routing.perm_T)
    if routing.counts_host is not None:
        parts = []
        start = 0
        for e, count in enumerate(routing.counts_host):
            parts.append(_swiglu(xs_TD.narrow(0, start, count), w1[e], w3[e], w2[e]))
            start += count
        ys_TD = torch.cat(parts) if len(parts) > 1 else parts[0]
    elif _grouped_mm_ok(x_TD, w1):
        offs_E = routing.offsets_E1[1:].to(torch.int32)
        w1_EDF = torch.stack(list(w1)).transpose(1, 2)
        w3_EDF = torch.stack(list(w3)).transpose(1, 2)
        w2_EFD = torch.stack(list(w2)).transpose(1, 2)
        h_TF = F.silu(torch._grouped_mm(xs_TD, w1_EDF, offs=offs_E)) * torch._grouped_mm(xs_TD, w3_EDF, offs=offs_E)
        ys_TD = torch._grouped_mm(h_TF, w2_EFD, offs=offs_E)
    else:
        raise ValueError(
            "the torch MoE backend on an accelerator needs D and F to be multiples of "
            f"{16 // x_TD.element_size()} elements (got D={x_TD.shape[1]}, F={w1[0].shape[0]}) for "
            "torch._grouped_mm, or host-side counts in Routing.counts_host"
        )
    return ys_TD.index_select(0, routing.inv_perm_T)
