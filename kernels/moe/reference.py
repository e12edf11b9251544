"""Plain-PyTorch fp32 reference of the routed SwiGLU FFN: an obvious per-expert loop over boolean masks.

Slow and host-syncing on purpose (boolean-mask indexing); tests and benchmarks compare every backend with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def moe_ffn_reference(
    x_TD: torch.Tensor,
    expert_ids_T: torch.Tensor,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``y[t] = w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t]))`` with ``e = expert_ids_T[t]``, computed in fp32.

    Shapes: ``x_TD (T, D)``, ``w1[e], w3[e]: (F, D)``, ``w2[e]: (D, F)`` (``nn.Linear`` layout). Returns fp32 ``(T, D)``.
    Differentiable with respect to every input.
    """
    ids_T = expert_ids_T.reshape(-1).long()
    x32_TD = x_TD.float()
    y_TD = x32_TD.new_zeros(x_TD.shape)
    for e in range(len(w1)):
        rows = ids_T == e
        xe = x32_TD[rows]
        h = F.silu(xe @ w1[e].float().t()) * (xe @ w3[e].float().t())
        y_TD = y_TD.index_put((rows.nonzero(as_tuple=True)[0],), h @ w2[e].float().t())
    return y_TD
