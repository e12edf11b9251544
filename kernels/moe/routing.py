"""Routing metadata for the modality-routed FFN, built once per step and shared by every layer.

Legend: T tokens, E experts. ``expert_ids_T`` holds each token's expert (0 = text, 1 = visual for
Mono-InternVL). Tokens are put in expert order by a stable sort, so each expert owns one contiguous
range ``[offsets_E1[e], offsets_E1[e + 1])`` of the sorted order and, with two experts, there is a single
group boundary.

Nothing here synchronises with the device: the sort, the counts (a ``scatter_add``, not ``bincount``, whose
output size depends on the data) and the prefix sum stay on the device. When the ids live on the CPU the
counts are also kept as Python ints (``counts_host``); reading them there costs nothing and lets the
CPU backend slice without a grouped GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """Token -> expert assignment in sorted form.

    Attributes:
        perm_T: int64 ``(T,)``; ``perm_T[s]`` is the original index of the token at sorted position ``s``.
        inv_perm_T: int64 ``(T,)``; ``inv_perm_T[t]`` is the sorted position of original token ``t``.
        offsets_E1: int64 ``(E + 1,)`` on the tokens' device; expert ``e`` owns sorted rows
            ``offsets_E1[e]:offsets_E1[e + 1]``; ``offsets_E1[0] == 0`` and ``offsets_E1[E] == T``.
        num_experts: E.
        counts_host: per-expert token counts as Python ints when known without a device sync (CPU ids, or
            counts the data loader already knows); ``None`` otherwise.
    """

    perm_T: torch.Tensor
    inv_perm_T: torch.Tensor
    offsets_E1: torch.Tensor
    num_experts: int
    counts_host: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.perm_T.numel()


def build_routing(
    expert_ids_T: torch.Tensor,
    num_experts: int = 2,
    *,
    counts_host: tuple[int, ...] | list[int] | None = None,
) -> Routing:
    """Build the sorted routing for a flat token sequence.

    Args:
        expert_ids_T: ``(T,)`` integer expert ids in ``[0, num_experts)``, or a bool mask (``True`` = expert 1,
            e.g. the ``<IMG_CONTEXT>`` mask). Any leading shape is flattened.
        num_experts: E (2 for Mono-InternVL: text, visual).
        counts_host: optional per-expert counts the caller already knows on the host (e.g. from the data
            loader); checked against the ids when those are on the CPU.

    Returns:
        :class:`Routing`. Ids outside ``[0, E)`` raise ``ValueError`` when the ids are on the CPU (checking
        on an accelerator would need a sync; there the result is undefined, as for any index op).
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    ids_T = expert_ids_T.reshape(-1)
    if ids_T.dtype == torch.bool:
        ids_T = ids_T.long()
    elif ids_T.dtype.is_floating_point or ids_T.dtype.is_complex:
        raise ValueError(f"expert_ids_T must be an integer or bool tensor, got {ids_T.dtype}")
    else:
        ids_T = ids_T.long()
    device = ids_T.device
    on_host = device.type == "cpu"
    if on_host and ids_T.numel() and (int(ids_T.min()) < 0 or int(ids_T.max()) >= num_experts):
        raise ValueError(
            f"expert ids must lie in [0, {num_experts}); got min {int(ids_T.min())}, max {int(ids_T.max())}"
        )
    perm_T = torch.argsort(ids_T, stable=True)
    inv_perm_T = torch.empty_like(perm_T)
    inv_perm_T.scatter_(0, perm_T, torch.arange(perm_T.numel(), device=device))
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts_E.scatter_add_(0, ids_T, torch.ones_like(ids_T))
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    torch.cumsum(counts_E, 0, out=offsets_E1[1:])
    if on_host:
        measured = tuple(int(c) for c in counts_E.tolist())
        if counts_host is not None and tuple(counts_host) != measured:
            raise ValueError(f"counts_host {tuple(counts_host)} disagree with the expert ids {measured}")
        counts_host = measured
    elif counts_host is not None:
        counts_host = tuple(int(c) for c in counts_host)
        if len(counts_host) != num_experts:
            raise ValueError(f"counts_host needs {num_experts} entries, got {len(counts_host)}")
    return Routing(perm_T, inv_perm_T, offsets_E1, num_experts, counts_host)
