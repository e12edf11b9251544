"""Weighted next-token cross entropy, and the normalisation that makes a step's loss independent of batching.

Legend: ``B`` rows, ``T`` tokens of a row, ``V`` vocabulary, ``N`` = ``B * T`` flattened tokens.

Convention. Each target carries a weight (``Batch.weights_BT``: 1, 1/n or 1/sqrt(n) for a sample with n targets,
see :func:`evip.data.collate.loss_weights`). The loss of an optimizer step is

    sum over every target of every micro-batch on every rank of  weight * CE  /  sum of those weights

which depends only on the samples of the step, not on how they are split into micro-batches or ranks. The trainer
computes it as:

1. before the step's first backward, ``denom = step_denominator(micro_batches)``: the weight sum of this rank's
   micro-batches of the step, all-reduced (SUM) over the data-parallel group;
2. per micro-batch, ``loss_sum, _ = weighted_ce(logits, batch.targets_BT, batch.weights_BT)`` and
   ``scale_loss(loss_sum, denom, world_size).backward()``, i.e. ``loss_sum * world_size / denom``.

The ``* world_size`` undoes the mean that data-parallel gradient reduction (FSDP's reduce-scatter, DDP's
all-reduce) takes over ranks, so the accumulated gradient is exactly the gradient of the step loss above. The
value to report is the sum over micro-batches and ranks of ``loss_sum`` divided by ``denom``.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data.types import Batch

__all__ = ["scale_loss", "step_denominator", "weighted_ce"]

IGNORE = -100


def _ce_sum(logits_NV: torch.Tensor, targets_N: torch.Tensor, weights_N: torch.Tensor) -> torch.Tensor:
    ce_N = F.cross_entropy(logits_NV.float(), targets_N, ignore_index=IGNORE, reduction="none")
    return (ce_N * weights_N).sum()


def weighted_ce(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, weights_BT: torch.Tensor, *, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of weight * CE, sum of weights)`` over all targets, both fp32 scalars.

    ``targets_BT`` are already shifted (``targets[t]`` is predicted at ``t``; -100 = none) and ``weights_BT`` is 0
    wherever there is no target. The log-softmax is taken in fp32 over ``chunk_tokens`` tokens at a time; under
    autograd each chunk is recomputed in the backward pass (activation checkpointing), so the fp32 copy of the
    logits never exists for more than one chunk: about ``chunk_tokens * V * 8`` bytes instead of ``B * T * V * 8``
    (92k vocab, 1024 tokens: 0.7 GiB). The chunked result equals the unchunked one up to summation order.
    """
    if logits_BTV.dim() != 3 or targets_BT.shape != logits_BTV.shape[:2] or weights_BT.shape != targets_BT.shape:
        raise ValueError(
            f"weighted_ce needs logits (B, T, V) and targets, weights (B, T); got {tuple(logits_BTV.shape)}, "
            f"{tuple(targets_BT.shape)}, {tuple(weights_BT.shape)}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device = logits_BTV.device
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    targets_N = targets_BT.reshape(-1).to(device, torch.long)
    weights_N = weights_BT.reshape(-1).to(device, torch.float32)
    weight_sum = weights_N.sum()
    num_tokens = logits_NV.shape[0]
    if num_tokens <= chunk_tokens:
        return _ce_sum(logits_NV, targets_N, weights_N), weight_sum
    recompute = torch.is_grad_enabled() and logits_NV.requires_grad
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, num_tokens, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if recompute:
            part_sum = checkpoint(_ce_sum, logits_NV[part], targets_N[part], weights_N[part], use_reentrant=False)
            loss_sum = loss_sum + part_sum
        else:
            loss_sum = loss_sum + _ce_sum(logits_NV[part], targets_N[part], weights_N[part])
    return loss_sum, weight_sum


def step_denominator(
    batches: Iterable[Batch], group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
) -> float:
    """The step's global weight sum: this rank's ``weights_BT`` of ``batches`` summed, then all-reduced (SUM)
    over ``group`` when ``torch.distributed`` is initialised.

    Call it once per optimizer step, with all of this rank's micro-batches of the step, before the first
    backward. The local sum is taken in fp64 (batches are usually still on the host); ``device`` is where the
    all-reduce runs (default: the current CUDA device under NCCL, else the CPU).

    Raises:
        ValueError: when the whole step has no target anywhere (every sample must supervise something; the
            preprocessor skips those that do not), since its loss would be 0/0.
    """
    local = sum(float(b.weights_BT.to(torch.float64).sum()) for b in batches)
    total = local
    if dist.is_available() and dist.is_initialized():
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        t = torch.tensor([local], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        total = float(t.item())
    if not total > 0:
        raise ValueError(
            f"the optimizer step has a total loss weight of {total} (this rank: {local}): no supervised target in any "
            "micro-batch of any rank"
        )
    return total


def scale_loss(loss_sum: torch.Tensor, denominator: float, world_size: int | None = None) -> torch.Tensor:
    """``loss_sum * world_size / denominator``: the micro-batch's share of the step loss, scaled for gradient
    averaging over ranks (``world_size`` defaults to the default group's size, or 1 without torch.distributed)."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return loss_sum * (world_size / denominator)
