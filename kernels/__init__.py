"""Kernels for Mono-InternVL-style models.

Public API (stable): :func:`build_routing` and :class:`Routing` (per-step routing metadata), :func:`moe_ffn`
(the modality-routed SwiGLU FFN; backends ``torch``, ``triton``, ``megablocks``, see :func:`select_backend`) and
:func:`routed_linear` (a per-modality projection). See ``kernels/README.md`` for layouts and tolerances.
"""

from .moe import (
    BACKEND_ENV,
    BACKENDS,
    BackendUnavailable,
    Routing,
    build_routing,
    moe_ffn,
    moe_ffn_reference,
    routed_linear,
    select_backend,
)

__all__ = [
    "BACKEND_ENV", "BACKENDS", "BackendUnavailable", "Routing", "build_routing", "moe_ffn", "moe_ffn_reference",
    "routed_linear", "select_backend",
]
