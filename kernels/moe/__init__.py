"""The modality-routed SwiGLU FFN: routing metadata, backends, and the public :func:`moe_ffn`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .reference import moe_ffn_reference
from .routing import Routing, build_routing
from .torch_backend import moe_ffn_torch, routed_linear_torch

BACKEND_ENV = "MONO_MOE_BACKEND"
BACKENDS = ("torch", "triton", "megablocks")

__all__ = [
    "BACKENDS", "BACKEND_ENV", "BackendUnavailable", "Routing", "build_routing", "moe_ffn", "moe_ffn_reference",
    "routed_linear", "select_backend",
]


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here (not installed, or not on this device); the message says why."""


def select_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend :func:`moe_ffn` uses on ``device``.

    ``backend`` (an argument) wins, then ``$MONO_MOE_BACKEND``; unset or ``"auto"`` picks ``triton`` for CUDA
    tensors and ``torch`` otherwise. An unknown name raises ``ValueError``; whether a named backend can
    actually run is checked when it is called (:class:`BackendUnavailable`), never silently replaced.
    """
    device = torch.device(device)
    for source, value in (("backend", backend), (BACKEND_ENV, os.environ.get(BACKEND_ENV))):
        name = (value or "").strip().lower()
        if name and name != "auto":
            if name not in BACKENDS:
                raise ValueError(f"{source}={value!r} is not a backend; choose one of {('auto',) + BACKENDS}")
            return name
    return "triton" if device.type == "cuda" else "torch"


def moe_ffn(
    x_TD: torch.Tensor,
    routing: Routing,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Routed SwiGLU FFN: token ``t`` goes through expert ``e(t)`` only.

    ``y[t] = w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t]))``.

    Args:
        x_TD: ``(T, D)`` activations (fp32, bf16 or fp16), in original token order.
        routing: from :func:`build_routing`, built once per step and shared by all layers.
        w1, w3: per-expert ``(F, D)`` gate and up projections (``nn.Linear.weight`` layout), one tensor per expert.
        w2: per-expert ``(D, F)`` down projections.
        backend: ``"torch"``, ``"triton"``, ``"megablocks"`` or ``None``/``"auto"`` (see :func:`select_backend`).

    Returns:
        ``(T, D)`` in ``x_TD``'s dtype and token order. Differentiable in ``x_TD`` and in every expert weight
        that requires grad; a frozen expert's weights get no gradient work (triton backend, torch slice path).
        An expert with no tokens gets exact zero weight gradients. The triton backend never synchronises with
        the host; see ``kernels/README.md`` for the other backends.

    Raises:
        ValueError: shapes, dtypes or expert counts that do not fit together (the message lists them).
        BackendUnavailable: the chosen backend cannot run here (e.g. triton on CPU without TRITON_INTERPRET=1,
            megablocks not installed).
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
    name = select_backend(x_TD.device, backend)
    if name == "torch":
        return moe_ffn_torch(x_TD, routing, w1, w3, w2)
    if name == "triton":
        from .triton_backend import moe_ffn_triton, triton_unavailable_reason

        reason = triton_unavailable_reason(x_TD.device)
        if reason is not None:
            raise BackendUnavailable(reason)
        return moe_ffn_triton(x_TD, routing, w1, w3, w2)
    if name == "megablocks":
        from .megablocks_backend import megablocks_unavailable_reason, moe_ffn_megablocks

        reason = megablocks_unavailable_reason(x_TD.device)
        if reason is not None:
            raise BackendUnavailable(reason)
        return moe_ffn_megablocks(x_TD, routing, w1, w3, w2)
    raise AssertionError(name)  # select_backend only returns known names


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
