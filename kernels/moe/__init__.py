"""The modality-routed SwiGLU FFN: routing metadata, backends, and the public :func:`moe_ffn`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .reference import moe_ffn_reference
from .routing import Routing, build_routing
from .torch_backend import moe_ffn_torch, routed_linear_torch

BACKEND_ENV = "MONO_MOE_BACKEND"
BACKENDS = ("torch",)

__all__ = [
    "BACKENDS", "BACKEND_ENV", "Routing", "build_routing", "moe_ffn", "moe_ffn_reference", "routed_linear",
    "select_backend",
]


def select_backend(device: torch.device) -> str:
    """The backend :func:`moe_ffn` uses on ``device``: ``$MONO_MOE_BACKEND`` when set, else the default."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced != "auto":
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not a backend; choose one of {('auto',) + BACKENDS}")
        return forced
    return "torch"


def moe_ffn(
    x_TD: torch.Tensor,
    routing: Routing,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Routed SwiGLU FFN: token ``t`` goes through expert ``e(t)`` only.

    ``y[t] = w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t]))``.

    Args:
        x_TD: ``(T, D)`` activations (fp32, bf16 or fp16), in original token order.
        routing: from :func:`build_routing`, built once per step and shared by all layers.
        w1, w3: per-expert ``(F, D)`` gate and up projections (``nn.Linear.weight`` layout), one tensor per expert.
        w2: per-expert ``(D, F)`` down projections.

    Returns:
        ``(T, D)`` in ``x_TD``'s dtype and token order. Differentiable in ``x_TD`` and in every expert weight
        that requires grad; frozen experts get no weight-gradient work on the slice path. No ``.item()`` or
        boolean-mask indexing here; with ``routing.counts_host`` unset on an accelerator the grouped GEMM is
        sync-free only where torch has a native one (bf16, sm90/sm100), see ``kernels/README.md``.
    """
    num_experts = routing.num_experts
    if not (len(w1) == len(w3) == len(w2) == num_experts):
        raise ValueError(
            f"need one weight per expert ({num_experts}); got w1 {len(w1)}, w3 {len(w3)}, w2 {len(w2)}"
        )
    if x_TD.dim() != 2 or x_TD.shape[0] != routing.num_tokens:
        raise ValueError(f"x_TD must be (T, D) with T = {routing.num_tokens} routed tokens, got {tuple(x_TD.shape)}")
    d = x_TD.shape[1]
    f = w1[0].shape[0]
    shapes_ok = all(
        tuple(w1[e].shape) == (f, d) and tuple(w3[e].shape) == (f, d) and tuple(w2[e].shape) == (d, f)
        for e in range(num_experts)
    )
    if not shapes_ok:
        listing = "; ".join(
            f"expert {e}: w1 {tuple(w1[e].shape)}, w3 {tuple(w3[e].shape)}, w2 {tuple(w2[e].shape)}"
            for e in range(num_experts)
        )
        raise ValueError(f"expert weights must be w1, w3: (F, D) and w2: (D, F) with D = {d} and one F; got {listing}")
    dtypes = {w.dtype for w in (*w1, *w3, *w2)}
    if dtypes != {x_TD.dtype}:
        raise ValueError(f"x_TD is {x_TD.dtype} but the expert weights are {sorted(map(str, dtypes))}; cast them to match")
    backend = select_backend(x_TD.device)
    if backend == "torch":
        return moe_ffn_torch(x_TD, routing, w1, w3, w2)
    raise AssertionError(backend)  # select_backend only returns known names


def routed_linear(x_TD: torch.Tensor, routing: Routing, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-modality projection: ``y[t] = weights[e(t)] @ x[t]`` (used by the visual attention experts).

    Args:
        x_TD: ``(T, D)`` activations in original token order.
        routing: from :func:`build_routing`.
        weights: one ``(N, D)`` weight per expert (``nn.Linear.weight`` layout), all the same shape and dtype.

    Returns:
        ``(T, N)``; each token is multiplied by its own expert's weight only. No host synchronisation.
    """
    if len(weights) != routing.num_experts:
        raise ValueError(f"need one weight per expert ({routing.num_experts}); got {len(weights)}")
    if x_TD.dim() != 2 or x_TD.shape[0] != routing.num_tokens:
        raise ValueError(f"x_TD must be (T, D) with T = {routing.num_tokens} routed tokens, got {tuple(x_TD.shape)}")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1 or next(iter(shapes))[1] != x_TD.shape[1]:
        raise ValueError(f"weights must all be (N, {x_TD.shape[1]}); got {[tuple(w.shape) for w in weights]}")
    return routed_linear_torch(x_TD, routing, weights)
