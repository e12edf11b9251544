"""The records that flow through the data pipeline, and the skip accounting shared by all its parts.

Legend: ``L`` tokens of one sample, ``B`` rows of a micro-batch, ``T`` tokens of a row, ``N`` tiles, ``S`` tile size.

Flow: a *source* (webdataset shards, JSONL pairs, InternVL meta JSON + LLaVA conversations) yields
:class:`RawSample` records; the *preprocessor* turns one into an :class:`Example` (tokens, labels, tiles) or raises
:class:`SkipSample`; the *collator* packs or pads examples into a :class:`Batch` for the model. Every bad sample
is skipped deterministically, counted per reason in a :class:`SkipCounter`, and logged with its file and sample id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from mono.internlm2 import PackedSequences

__all__ = ["Batch", "Example", "ImageRef", "RawSample", "SKIP_REASONS", "SkipCounter", "SkipSample"]

SKIP_REASONS: dict[str, str] = {
    "malformed_json": "a JSON line or record that does not parse or lacks the required fields",
    "missing_image": "an image file or shard member that does not exist",
    "corrupt_image": "image bytes that cannot be decoded",
    "too_long": "more tokens than the stage's max_seq_len (a sample is never cut)",
    "truncated_image_span": "an <img> ... </img> span cut short or not matching its image's tiles",
    "token_mismatch": "a different number of <IMG_CONTEXT> tokens than visual tokens, or a conversation that "
    "supervises nothing",
    "bad_conversation": "roles that do not alternate user/assistant, an empty turn, or <image> placeholders that "
    "do not match the images",
}


class SkipSample(Exception):
    """Raised for a sample that cannot be used; the pipeline catches it, counts ``reason`` and logs ``where``.

    Attributes:
        reason: a key of :data:`SKIP_REASONS`.
        sample_id: ``"file:line"`` or ``"shard.tar:key"``, enough to find the sample by hand.
        detail: what exactly was wrong.
    """

    def __init__(self, reason: str, sample_id: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(SKIP_REASONS)}")
        super().__init__(f"{sample_id}: {reason}: {detail}")
        self.reason = reason
        self.sample_id = sample_id
        self.detail = detail


class SkipCounter:
    """Skipped samples per reason (plus ``seen``/``used``), with ``state_dict`` for checkpoints and merging."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    def update(self, other: "SkipCounter | dict[str, int]") -> None:
        self.counts.update(other.counts if isinstance(other, SkipCounter) else other)

    def reasons(self) -> dict[str, int]:
        """Skip counts by reason (only the reasons of :data:`SKIP_REASONS`, not ``seen``/``used``)."""
        return {k: v for k, v in self.counts.items() if k in SKIP_REASONS}

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.counts.items() if k in SKIP_REASONS)

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = Counter({str(k): int(v) for k, v in state.items()})

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.counts)})"


@dataclass
class ImageRef:
    """Where one image's bytes come from: a file path, or bytes already read (a shard member)."""

    path: Optional[str] = None
    data: Optional[bytes] = None


@dataclass
class RawSample:
    """One sample as a source yields it, before tokenization.

    Attributes:
        sample_id: ``"file:line"`` (JSONL, 1-based line) or ``"shard.tar:key"``; unique within a run's data.
        dataset: name of the dataset it came from (the meta JSON key, or the source's name).
        kind: ``pair`` (caption supervised) or ``conversation`` (assistant answers supervised).
        images: the sample's images, in placeholder order (may be empty: text-only).
        caption: the caption text of a pair.
        conversation: ``[(role, text), ...]`` with roles ``user``/``assistant`` (``<image>`` placeholders inside).
        max_tiles: this dataset's dynamic-tiling cap (split between the images of a multi-image sample).
        augment: whether the random JPEG re-encode applies.
        index: position in the global sample order of the epoch (seeds per-sample randomness).
    """

    sample_id: str
    dataset: str
    kind: str
    images: list[ImageRef] = field(default_factory=list)
    caption: Optional[str] = None
    conversation: Optional[list[tuple[str, str]]] = None
    max_tiles: int = 6
    augment: bool = False
    index: int = 0


@dataclass
class Example:
    """One tokenized sample.

    Attributes:
        sample_id: as in :class:`RawSample`.
        input_ids_L: token ids (``<IMG_CONTEXT>`` rows are where visual tokens go).
        labels_L: the token itself where it is supervised, -100 elsewhere (aligned with ``input_ids``; the
            collator shifts).
        pixel_values_N: ``(N, 3, S, S)`` float32 tiles of all images in order, or None for text-only samples.
        num_tiles: tiles per image (thumbnail included).
        num_visual_tokens: ``<IMG_CONTEXT>`` tokens in ``input_ids``.
    """

    sample_id: str
    input_ids_L: torch.Tensor
    labels_L: torch.Tensor
    pixel_values_N: Optional[torch.Tensor] = None
    num_tiles: list[int] = field(default_factory=list)
    num_visual_tokens: int = 0

    def __len__(self) -> int:
        return int(self.input_ids_L.numel())

    @property
    def num_targets(self) -> int:
        """Supervised next-token targets (labels at positions 1..L-1 that are not -100)."""
        return int((self.labels_L[1:] != -100).sum())


@dataclass
class Batch:
    """A micro-batch, padded or packed, ready for ``MonoInternVL.forward``.

    In a pack, several examples share one row: ``attention_mask_BTT`` keeps attention inside each sample
    (block-diagonal causal), ``position_ids_BT`` restart at 0 for each sample, and targets never cross a sample
    boundary. A pack never splits an example (so never an image span).

    Attributes:
        input_ids_BT: token ids (pad id in padding).
        position_ids_BT: positions, restarting per sample.
        segment_BT: each token's example index within its row (-1 = padding), or None when each row is one
            sample and there is no padding (plain causal).
        targets_BT: next-token targets already shifted (``targets[t]`` is predicted at ``t``), -100 = none.
        weights_BT: loss weight of each target (0 where no target), from the stage's loss weighting.
        pixel_values_N: all tiles of the batch in order, or None.
        image_flags_N: 1 for real tiles, 0 for a dummy tile (added so the visual parameters always take part).
        sample_ids: the examples in the batch, in order.
        num_text_tokens, num_visual_tokens: non-padding tokens by modality (for tokens/s and FLOPs).
        seq_lens: token count of each sample, in order (padding excluded; for the attention FLOPs).
        packed: the per-sample attention as :class:`mono.internlm2.PackedSequences` (computed per sample instead
            of over whole rows; the trainer passes it as ``attention_mask``), or None when ``segment_BT`` is.
        data_state: the producer's position after this batch (the loader's business; opaque to the trainer).
        skips: skip counts since the previous batch of the same producer, by reason.
    """

    input_ids_BT: torch.Tensor
    position_ids_BT: torch.Tensor
    segment_BT: Optional[torch.Tensor]
    targets_BT: torch.Tensor
    weights_BT: torch.Tensor
    pixel_values_N: Optional[torch.Tensor]
    image_flags_N: Optional[torch.Tensor]
    sample_ids: list[str]
    num_text_tokens: int
    num_visual_tokens: int
    seq_lens: list[int] = field(default_factory=list)
    packed: Any = None
    data_state: Any = None
    skips: dict[str, int] = field(default_factory=dict)

    @property
    def attention_mask_BTT(self) -> Optional[torch.Tensor]:
        """The same attention as a ``(B, 1, T, T)`` boolean mask (True = may attend): a real token sees earlier
        and same tokens of its own example, a padding token only itself; None when plain causal. Built on
        request (T^2 per row: 64 MiB at 8k tokens), for code that needs a dense mask."""
        if self.segment_BT is None:
            return None
        seg = self.segment_BT
        num_cols = seg.shape[1]
        causal_TT = torch.ones(num_cols, num_cols, dtype=torch.bool, device=seg.device).tril()
        eye_TT = torch.eye(num_cols, dtype=torch.bool, device=seg.device)
        same_BTT = seg[:, :, None] == seg[:, None, :]
        return ((same_BTT & causal_TT & (seg >= 0)[:, :, None]) | eye_TT)[:, None]

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch with its tensors on ``device``."""

        def move(t):
            if isinstance(t, torch.Tensor):
                return t.to(device, non_blocking=True)
            return t.to(device, non_blocking=True) if isinstance(t, PackedSequences) else t

        return Batch(**{k: move(v) for k, v in self.__dict__.items()})
