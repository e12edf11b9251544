"""Examples -> micro-batches: per-sample loss weights, padding and packing into rows, and greedy packing.

Legend: ``B`` rows of a micro-batch, ``T`` tokens of a row, ``L`` tokens of one example, ``N`` tiles, ``S`` tile size.

A micro-batch is a list of *rows*; each row is a list of examples laid end to end (one example per row when
packing is off). Within a row every example keeps to itself:

- ``position_ids`` restart at 0 for each example, so a packed sample sees the same rotary positions as alone;
- attention stays within each example: ``packed`` (:class:`mono.internlm2.PackedSequences`) runs it per example,
  bucketed by length, which the trainer uses; ``segment_BT`` gives the same as the dense block-diagonal causal
  ``Batch.attention_mask_BTT`` on request (a padding position attends only to itself there: a query row with no
  allowed key would give NaN in the softmax);
- ``targets_BT[t] = labels[t + 1]`` of the same example, -100 at each example's last token and in padding, so
  no target crosses a sample boundary;
- ``weights_BT`` carries the example's loss weight (see :func:`loss_weights`) at each of its targets, 0 elsewhere.

With these three, the weighted loss of a packed row equals the sum of the weighted losses of its examples run
one by one (``tests/evip/test_collate.py`` checks it on a real model, gradients included).

Tiles of all examples are concatenated in row-major order, which is the order in which the model fills the
``<IMG_CONTEXT>`` slots of ``input_ids_BT``. A batch without any image gets one zero dummy tile with
``image_flags_N = [0]``: the model drops its features, but the patch embedding and projector still take part in
the graph, so every FSDP rank produces gradients for the same parameters (a rank whose batch is text-only would
otherwise skip the visual parameters and hang the gradient reduce-scatter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mono.internlm2 import PackedSequences

from .types import Batch, Example

__all__ = ["WEIGHTINGS", "Pack", "Packer", "collate", "loss_weights", "pad_id_of"]

WEIGHTINGS = ("token", "sample", "square")
IGNORE = -100


def loss_weights(num_targets: int, weighting: str) -> float:
    """Weight of each target of a sample with ``num_targets`` supervised targets (InternVL2.5's ``len2weight``).

    ``token``: 1 (long answers count more), ``sample``: 1/n (every sample counts the same), ``square``: 1/sqrt(n)
    (in between). A sample without targets gets 0: it has nowhere to carry a weight.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    if num_targets <= 0:
        return 0.0
    if weighting == "token":
        return 1.0
    if weighting == "sample":
        return 1.0 / num_targets
    return 1.0 / math.sqrt(num_targets)


def pad_id_of(tokenizer) -> int:
    """The id to pad rows with: the tokenizer's pad token, else its end-of-sequence token, else 0.

    Any id in the vocabulary would do: padding positions carry no target, and no real token attends to them.
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def collate(
    rows: Sequence[Sequence[Example]], *, max_seq_len: int, weighting: str, pad_id: int, image_size: int
) -> Batch:
    """One :class:`Batch` with a row per entry of ``rows`` (each a list of examples packed end to end).

    Rows are right-padded with ``pad_id`` to the longest row. ``segment_BT`` and ``packed`` are None (plain causal)
    when every row is a single example and no row is padded; otherwise they describe the per-example attention of
    the module docstring.

    Raises:
        ValueError: an empty row, a row longer than ``max_seq_len``, labels not aligned with the ids, or tiles
            that are not ``(N, 3, image_size, image_size)``; the message names the sample.
    """
    if not rows or any(len(row) == 0 for row in rows):
        sizes = [len(r) for r in rows]
        raise ValueError(f"collate needs at least one row and one example per row, got row sizes {sizes}")
    lengths = [sum(len(ex) for ex in row) for row in rows]
    for b, (row, num_tokens) in enumerate(zip(rows, lengths)):
        if num_tokens > max_seq_len:
            raise ValueError(
                f"row {b} holds {num_tokens} tokens > max_seq_len {max_seq_len} "
                f"(samples {[ex.sample_id for ex in row]}); the packer or preprocessor must keep rows within it"
            )
    num_rows, num_cols = len(rows), max(lengths)
    input_ids_BT = torch.full((num_rows, num_cols), pad_id, dtype=torch.long)
    position_ids_BT = torch.zeros(num_rows, num_cols, dtype=torch.long)
    targets_BT = torch.full((num_rows, num_cols), IGNORE, dtype=torch.long)
    weights_BT = torch.zeros(num_rows, num_cols, dtype=torch.float32)
    segment_BT = torch.full((num_rows, num_cols), -1, dtype=torch.long)  # example index in its row; -1 = padding
    tiles: list[torch.Tensor] = []
    sample_ids: list[str] = []
    num_visual = 0
    for b, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            _check_example(ex, image_size)
            end = start + len(ex)
            labels_L = ex.labels_L.to(torch.long)
            input_ids_BT[b, start:end] = ex.input_ids_L
            position_ids_BT[b, start:end] = torch.arange(len(ex))
            # The target of position t is the label of t + 1 of the same example; the example's last token
            # predicts nothing (the next token in the row belongs to another sample).
            targets_BT[b, start : end - 1] = labels_L[1:]
            weight = loss_weights(ex.num_targets, weighting)
            weights_BT[b, start : end - 1] = (labels_L[1:] != IGNORE).float() * weight
            segment_BT[b, start:end] = s
            if ex.pixel_values_N is not None and ex.pixel_values_N.shape[0] > 0:
                tiles.append(ex.pixel_values_N)
            sample_ids.append(ex.sample_id)
            num_visual += ex.num_visual_tokens
            start = end

    plain_causal = all(len(row) == 1 for row in rows) and all(n == num_cols for n in lengths)
    packed = None if plain_causal else PackedSequences.from_lengths([[len(ex) for ex in row] for row in rows], num_cols)
    if tiles:
        pixel_values_N = torch.cat([t.to(torch.float32) for t in tiles])
        image_flags_N = torch.ones(pixel_values_N.shape[0], dtype=torch.long)
    else:
        pixel_values_N = torch.zeros(1, 3, image_size, image_size)
        image_flags_N = torch.zeros(1, dtype=torch.long)
    return Batch(
        input_ids_BT=input_ids_BT,
        position_ids_BT=position_ids_BT,
        segment_BT=None if plain_causal else segment_BT,
        targets_BT=targets_BT,
        weights_BT=weights_BT,
        pixel_values_N=pixel_values_N,
        image_flags_N=image_flags_N,
        sample_ids=sample_ids,
        num_text_tokens=sum(lengths) - num_visual,
        num_visual_tokens=num_visual,
        seq_lens=[len(ex) for row in rows for ex in row],
        packed=packed,
    )



def _check_example(ex: Example, image_size: int) -> None:
    if ex.input_ids_L.dim() != 1 or ex.labels_L.shape != ex.input_ids_L.shape:
        raise ValueError(
            f"sample {ex.sample_id}: input_ids {tuple(ex.input_ids_L.shape)} and labels {tuple(ex.labels_L.shape)} "
            "must be 1-D and of the same length"
        )
    if len(ex) == 0:
        raise ValueError(f"sample {ex.sample_id} has no tokens")
    pv = ex.pixel_values_N
    if pv is not None and (pv.dim() != 4 or tuple(pv.shape[1:]) != (3, image_size, image_size)):
        raise ValueError(
            f"sample {ex.sample_id}: tiles must be (N, 3, {image_size}, {image_size}), got {tuple(pv.shape)}"
        )


# ---------------------------------------------------------------------------------------------------- packing


@dataclass
class Pack:
    """Examples that will share one row, each with the opaque key its producer uses to find it again."""

    items: list[tuple[Any, Example]] = field(default_factory=list)
    num_tokens: int = 0

    @property
    def keys(self) -> list[Any]:
        return [key for key, _ in self.items]

    @property
    def examples(self) -> list[Example]:
        return [ex for _, ex in self.items]

    def append(self, key: Any, example: Example) -> None:
        self.items.append((key, example))
        self.num_tokens += len(example)


class Packer:
    """Greedy, deterministic first-fit packing of an example stream into rows of at most ``max_seq_len`` tokens.

    Up to ``buffer_size`` packs stay open. Each new example goes into the first open pack (oldest first) with
    room for it, else into a new pack. A pack is closed when it is exactly full, or, when more than
    ``buffer_size`` packs are open, the fullest one is (the oldest among equals). :meth:`flush` closes the rest.
    An example is never split, so an image span never is.

    The whole state is the open packs; a producer that checkpoints their keys can rebuild the packer exactly
    with :meth:`restore` (re-reading those examples), which is what :mod:`evip.data.loader` does.
    """

    def __init__(self, max_seq_len: int, buffer_size: int = 16):
        if max_seq_len < 1 or buffer_size < 1:
            raise ValueError(f"max_seq_len and buffer_size must be >= 1, got {max_seq_len} and {buffer_size}")
        self.max_seq_len = max_seq_len
        self.buffer_size = buffer_size
        self.open: list[Pack] = []
        self.num_packs = 0  # closed so far
        self.num_packed_tokens = 0  # in closed packs

    def add(self, key: Any, example: Example) -> list[Pack]:
        """Put ``example`` into a pack; returns the packs this closed (possibly none)."""
        n = len(example)
        if n > self.max_seq_len:
            raise ValueError(
                f"sample {example.sample_id} has {n} tokens > max_seq_len {self.max_seq_len}; over-long samples "
                "must be skipped by the preprocessor (reason 'too_long'), never packed or cut"
            )
        target = next((p for p in self.open if p.num_tokens + n <= self.max_seq_len), None)
        if target is None:
            target = Pack()
            self.open.append(target)
        target.append(key, example)
        closed = []
        if target.num_tokens == self.max_seq_len:
            closed.append(self._close(self.open.index(target)))
        if len(self.open) > self.buffer_size:
            fullest = max(range(len(self.open)), key=lambda i: (self.open[i].num_tokens, -i))
            closed.append(self._close(fullest))
        return closed

    def flush(self) -> list[Pack]:
        """Close every open pack (oldest first)."""
        closed = []
        while self.open:
            closed.append(self._close(0))
        return closed

    def restore(self, packs: list[Pack]) -> None:
        """Re-open ``packs`` (rebuilt from checkpointed keys) in their saved order."""
        for pack in packs:
            if pack.num_tokens > self.max_seq_len:
                raise ValueError(f"a restored pack holds {pack.num_tokens} tokens > max_seq_len {self.max_seq_len}")
        self.open = list(packs)

    @property
    def fill_ratio(self) -> float:
        """Tokens over capacity (``packs * max_seq_len``) of the packs closed so far; 0 before the first."""
        return self.num_packed_tokens / (self.num_packs * self.max_seq_len) if self.num_packs else 0.0

    def _close(self, i: int) -> Pack:
        pack = self.open.pop(i)
        self.num_packs += 1
        self.num_packed_tokens += pack.num_tokens
        return pack
