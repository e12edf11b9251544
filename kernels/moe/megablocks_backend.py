"""MegaBlocks backend of the routed SwiGLU FFN: the grouped GEMM ``gmm`` of ``grouped_gemm`` (the kernel behind
MegaBlocks' ``mlp_impl="grouped"``), for comparison and for users who already have it built.

Legend: T tokens, D model width, F FFN width, E experts.

Algorithm (MegaBlocks' grouped GLU): gather ``x`` into expert order, ``g = gmm(xs, W1, sizes, trans_b=True)``,
``u = gmm(xs, W3, ...)``, ``ys = gmm(silu(g) * u, W2, ...)``, scatter back. ``W1`` is ``stack(w1)`` ``(E, F, D)``
(a copy of the per-expert weights each call: ``gmm`` wants one 3-D tensor), so a frozen expert's weight
gradient is still computed by ``gmm``'s backward and then dropped by ``stack``'s. ``sizes`` are the per-expert
counts: ``Routing.counts_host`` as a CPU tensor when known, otherwise the device counts (grouped_gemm >= 0.1.5
accepts them on the GPU; older builds need host counts).

Needs ``grouped_gemm`` (``pip install grouped_gemm --no-build-isolation``; CUDA and bf16 only). Not installable
on the CPU machines, where :func:`megablocks_unavailable_reason` says so.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .routing import Routing

__all__ = ["load_gmm", "megablocks_unavailable_reason", "moe_ffn_megablocks"]


def load_gmm():
    """``grouped_gemm.ops.gmm``, or ``ImportError`` saying what is missing."""
    errors = []
    for module in ("grouped_gemm.ops", "megablocks.grouped_gemm_util"):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # also covers a broken CUDA extension
            errors.append(f"{module}: {exc}")
            continue
        ops = getattr(mod, "ops", mod)
        gmm = getattr(ops, "gmm", None)
        if gmm is not None:
            return gmm
        errors.append(f"{module}: no gmm (grouped_gemm not built into megablocks)")
    raise ImportError("grouped_gemm's gmm is not importable (" + "; ".join(errors) + ")")


def megablocks_unavailable_reason(device: torch.device) -> str | None:
    """Why the megablocks backend cannot run on ``device``, or ``None`` when it can."""
    try:
        load_gmm()
    except ImportError as exc:
        return f"the megablocks backend needs grouped_gemm (MegaBlocks' grouped GEMM): {exc}"
    if device.type == "meta":
        return "the megablocks backend does not run on the meta device"
    return None


def moe_ffn_megablocks(
    x_TD: torch.Tensor,
    routing: Routing,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Routed SwiGLU FFN through ``gmm``; see :func:`kernels.moe_ffn` for the contract."""
    gmm = load_gmm()
    if routing.counts_host is not None:
        sizes_E = torch.tensor(routing.counts_host, dtype=torch.int64)
    else:
        sizes_E = torch.diff(routing.offsets_E1)
    xs_TD = x_TD.index_select(0, routing.perm_T)
    g_TF = gmm(xs_TD, torch.stack(list(w1)), sizes_E, trans_b=True)
    u_TF = gmm(xs_TD, torch.stack(list(w3)), sizes_E, trans_b=True)
    ys_TD = gmm(F.silu(g_TF) * u_TF, torch.stack(list(w2)), sizes_E, trans_b=True)
    return ys_TD.index_select(0, routing.inv_perm_T)
