"""Release checkpoint layout <-> the layout of this project's LMDeploy model; pure torch, no LMDeploy import.

Legend: H query heads, K kv heads, r = H / K query heads per kv group, Dh head dim, D width, F FFN width,
T tokens of one engine step.

The release stores (SPEC section 3), per decoder layer:

- ``attention.wqkv.weight`` ``((H + 2K) * Dh, D)`` laid out per kv group: for each group g the rows are
  ``[q_{g*r}, .., q_{g*r+r-1}, k_g, v_g]``, ``Dh`` rows each;
- ``feed_forward{,_ve}.{w1,w3}.weight`` ``(F, D)`` and ``w2`` ``(D, F)``.

LMDeploy's fused projections want ``wqkv`` as ``[all q rows; all k rows; all v rows]`` (loaded shard by shard,
``q``/``k``/``v``) and ``w1``/``w3`` packed into one ``gate_up_proj`` ``(2F, D)`` (shards 0 and 1). Every other
tensor keeps its name and shape. :func:`expected_internal_state` applies the whole mapping to a release state
dict, so a test can compare it with the parameters of the model LMDeploy built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = [
    "LLM_PREFIX",
    "expected_internal_state",
    "internal_name",
    "merge_qkv",
    "pack_gate_up",
    "routing_rows",
    "split_wqkv",
    "unpack_gate_up",
]

LLM_PREFIX = "language_model."
_GATE_UP = re.compile(r"^(?P<head>.*\.feed_forward(?:_ve)?)\.(?P<which>w1|w3)\.weight$")
_WQKV = re.compile(r"^.*\.attention\.wqkv\.(?:weight|bias)$")


def _check_heads(rows: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if rows != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(
            f"wqkv has {rows} rows but (num_heads {num_heads} + 2 * num_kv_heads {num_kv_heads}) * head_dim "
            f"{head_dim} = {(num_heads + 2 * num_kv_heads) * head_dim}"
        )
    return num_heads // num_kv_heads


def split_wqkv(
    wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped ``wqkv`` ``((H + 2K) Dh, ...)`` -> ``q (H Dh, ...)``, ``k (K Dh, ...)``, ``v (K Dh, ...)``.

    Works for a weight ``(rows, D)`` and for a bias ``(rows,)``; query head ``g*r + j`` keeps its index.
    """
    r = _check_heads(wqkv.shape[0], num_heads, num_kv_heads, head_dim)
    grouped = wqkv.reshape(num_kv_heads, r + 2, head_dim, *wqkv.shape[1:])
    q = grouped[:, :r].reshape(num_heads * head_dim, *wqkv.shape[1:])
    k = grouped[:, r].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    v = grouped[:, r + 1].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    return q, k, v


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """Inverse of :func:`split_wqkv`: ``q, k, v`` -> the release's grouped ``wqkv``."""
    rest = tuple(q.shape[1:])
    rows = q.shape[0] + k.shape[0] + v.shape[0]
    r = _check_heads(rows, num_heads, num_kv_heads, head_dim)
    if q.shape[0] != num_heads * head_dim or k.shape != v.shape or k.shape[0] != num_kv_heads * head_dim:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         f"{num_heads} query / {num_kv_heads} kv heads of {head_dim}")
    q_g = q.reshape(num_kv_heads, r, head_dim, *rest)
    k_g = k.reshape(num_kv_heads, 1, head_dim, *rest)
    v_g = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(rows, *rest)


def pack_gate_up(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """``w1 (F, D)``, ``w3 (F, D)`` -> ``gate_up_proj (2F, D)``: gate rows first (LMDeploy's SiluAndMul order)."""
    if w1.shape != w3.shape:
        raise ValueError(f"w1 {tuple(w1.shape)} and w3 {tuple(w3.shape)} must have the same shape")
    return torch.cat([w1, w3], dim=0)


def unpack_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_gate_up`."""
    if gate_up.shape[0] % 2:
        raise ValueError(f"gate_up has an odd number of rows ({gate_up.shape[0]})")
    w1, w3 = gate_up.chunk(2, dim=0)
    return w1, w3


def internal_name(release_name: str) -> tuple[str, int | str | None]:
    """Where a release tensor goes in the LMDeploy model: ``(parameter name, shard)``.

    ``shard`` is 0 / 1 for ``w1`` / ``w3`` (halves of ``gate_up_proj``), ``"qkv"`` for a ``wqkv`` weight or bias
    that is split into the q, k, v shards, and None for a tensor copied as it is.
    """
    m = _GATE_UP.match(release_name)
    if m:
        return f"{m['head']}.gate_up_proj.weight", 0 if m["which"] == "w1" else 1
    if _WQKV.match(release_name):
        return release_name, "qkv"
    return release_name, None


def expected_internal_state(
    release_state: Mapping[str, torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int
) -> dict[str, torch.Tensor]:
    """The LMDeploy model's parameters (single GPU, no tensor parallelism) for a release state dict."""
    out: dict[str, torch.Tensor] = {}
    halves: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in release_state.items():
        target, shard = internal_name(name)
        if shard == "qkv":
            out[target] = torch.cat(split_wqkv(tensor, num_heads, num_kv_heads, head_dim), dim=0)
        elif shard in (0, 1):
            halves.setdefault(target, {})[shard] = tensor
        else:
            out[target] = tensor
    for target, parts in halves.items():
        if set(parts) != {0, 1}:
            missing = "w3" if 0 in parts else "w1"
            raise ValueError(f"{target}: the release state has no {missing} for it")
        out[target] = pack_gate_up(parts[0], parts[1])
    return out


def routing_rows(visual_mask_T: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Row indices of the visual and the text tokens of one packed step, None where a side is empty.

    ``visual_mask_T`` is a bool ``(T,)`` (True at ``<IMG_CONTEXT>``); None means every row is text. The decoder
    layers send visual rows to ``feed_forward_ve`` and the rest to ``feed_forward``. ``nonzero`` syncs with
    the device once per prefill step that carries an image, never while decoding.
    """
    if visual_mask_T is None:
        return None, None
    visual = visual_mask_T.nonzero().reshape(-1)
    if visual.numel() == 0:
        return None, None
    text = (~visual_mask_T).nonzero().reshape(-1)
    return visual, (text if text.numel() else None)

