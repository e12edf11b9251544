"""Sort + matmul backend of the routed SwiGLU FFN (plain PyTorch).

Legend: T tokens, D model width, F FFN width, E experts.

Algorithm: gather the tokens into expert order (one ``index_select``), run each expert's SwiGLU on its own
contiguous rows, scatter back with the inverse permutation. Each token is computed by exactly one expert, so
the FLOPs are those of one dense FFN over the T tokens.

How an expert's rows are found without a host sync:
- ``Routing.counts_host`` known (CPU ids, or counts from the data loader): each expert is a ``narrow``;
  autograd goes through ordinary ops.
- otherwise (any device, CPU included): ``torch._grouped_mm`` takes the device-side offsets directly (no
  ``.item()``); the per-expert weights are stacked for the call (a copy of E x D x F per projection). Its
  backward is our own (:class:`_GroupedMM`): the built-in one rejects stride-0 output gradients (e.g. from
  ``y.sum()``: "Invalid strides/sizes") and some builds return garbage weight gradients for empty groups
  (pytorch/pytorch#172439 on Blackwell, #174314 on ROCm), so we make the gradient contiguous and zero empty
  groups with a ``torch.where`` on the device counts.

Frozen experts cost no weight gradient on the slice path: a weight with ``requires_grad=False`` is a constant
to autograd. On the grouped path the stacked weight gradient is computed when any expert trains and autograd
drops the frozen experts' share. An expert with zero tokens gets an exact zero weight gradient on both paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .routing import Routing


def _swiglu(x_ND: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_ND, w1_FD)) * F.linear(x_ND, w3_FD), w2_DF)


class _GroupedMM(torch.autograd.Function):
    """``y_TN[rows of group e] = a_TK[rows of group e] @ b_EKN[e]`` with group ends ``offs_E`` (int32, on device).

    Backward without host syncs: ``da = grouped_mm(g, b^T)`` and the K-grouped ``db[e] = a[rows e]^T g[rows e]``;
    ``db`` of an empty group is forced to exact zeros.
    """

    @staticmethod
    def forward(ctx, a_TK: torch.Tensor, b_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a_TK, b_EKN, offs_E)
        return torch._grouped_mm(a_TK, b_EKN, offs=offs_E)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TN: torch.Tensor):
        a_TK, b_EKN, offs_E = ctx.saved_tensors
        # _grouped_mm needs 16-byte aligned strides; autograd may hand us an expanded (stride-0) gradient.
        g_TN = g_TN.contiguous()
        da_TK = db_EKN = None
        if ctx.needs_input_grad[0]:
            da_TK = torch._grouped_mm(g_TN, b_EKN.transpose(1, 2), offs=offs_E)
        if ctx.needs_input_grad[1]:
            db_EKN = torch._grouped_mm(a_TK.t(), g_TN, offs=offs_E)
            counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
            db_EKN = torch.where((counts_E > 0).view(-1, 1, 1), db_EKN, 0)
        return da_TK, db_EKN, None


def _per_expert_slices(xs_TD: torch.Tensor, counts: Sequence[int], fn) -> torch.Tensor:
    """``cat([fn(e, rows of expert e) for e])`` over expert-sorted rows, with host-side counts."""
    parts, start = [], 0
    for e, count in enumerate(counts):
        parts.append(fn(e, xs_TD.narrow(0, start, count)))
        start += count
    return torch.cat(parts) if len(parts) > 1 else parts[0]


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
        ys_TD = _per_expert_slices(xs_TD, routing.counts_host, lambda e, rows: _swiglu(rows, w1[e], w3[e], w2[e]))
    elif _grouped_mm_ok(x_TD, w1):
        offs_E = routing.offsets_E1[1:].to(torch.int32)
        w1_EDF = torch.stack(list(w1)).transpose(1, 2)
        w3_EDF = torch.stack(list(w3)).transpose(1, 2)
        w2_EFD = torch.stack(list(w2)).transpose(1, 2)
        h_TF = F.silu(_GroupedMM.apply(xs_TD, w1_EDF, offs_E)) * _GroupedMM.apply(xs_TD, w3_EDF, offs_E)
        ys_TD = _GroupedMM.apply(h_TF, w2_EFD, offs_E)
    else:
        raise ValueError(
            "the torch MoE backend without Routing.counts_host needs D and F to be multiples of "
            f"{16 // x_TD.element_size()} elements (got D={x_TD.shape[1]}, F={w1[0].shape[0]}) for "
            "torch._grouped_mm, or host-side counts in Routing.counts_host"
        )
    return ys_TD.index_select(0, routing.inv_perm_T)


def routed_linear_torch(x_TD: torch.Tensor, routing: Routing, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-expert linear map ``y[t] = W[e(t)] @ x[t]`` (no bias); see :func:`kernels.routed_linear`."""
    xs_TD = x_TD.index_select(0, routing.perm_T)
    if routing.counts_host is not None:
        ys_TN = _per_expert_slices(xs_TD, routing.counts_host, lambda e, rows: F.linear(rows, weights[e]))
    elif _grouped_mm_ok(x_TD, weights):
        offs_E = routing.offsets_E1[1:].to(torch.int32)
        ys_TN = _GroupedMM.apply(xs_TD, torch.stack(list(weights)).transpose(1, 2), offs_E)
    else:
        raise ValueError(
            "routed_linear without Routing.counts_host needs in/out widths that are multiples of "
            f"{16 // x_TD.element_size()} elements (got in {x_TD.shape[1]}, out {weights[0].shape[0]})"
        )
    return ys_TN.index_select(0, routing.inv_perm_T)
