"""The preprocessor: one :class:`RawSample` into one :class:`Example` (tokens, labels, tiles), or a counted skip.

Legend: ``L`` tokens of the sample, ``N`` tiles of all its images, ``S`` tile size.

A pair is trained as a one-turn conversation in the model's chat template (user ``<image>\\n{caption_prompt}``,
assistant = the caption); a conversation keeps its LLaVA turns. Exactly the assistant answers and the ``turn_end``
token closing each (``<|im_end|>``) are supervised: not the system block, not user turns, not the assistant
prefix, not the separator after ``turn_end``.

Tokenization is that of inference: the whole conversation is rendered with :meth:`ChatTemplate.render` and
tokenized in one call with the tokenizer adding BOS, as ``MonoInternVL.chat`` does with its prompt; labels come
from the character spans of the answers through the fast tokenizer's offset mapping. So the ids of every prompt
prefix (up to an assistant turn) equal the ids inference builds for that prompt, provided no token crosses the
start of an answer, which is checked per sample.

Bad samples raise :class:`SkipSample` (reasons in :data:`~evip.data.types.SKIP_REASONS`); nothing is truncated or
silently replaced.
"""

from __future__ import annotations

import io
import numbers
import os
import re
from typing import Optional

import numpy as np
import torch
from PIL import Image

from mono.internlm2 import max_context_length
from mono.processing import ImageError, dynamic_tiles, open_image, tiles_to_tensor
from mono.templates import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    ChatTemplate,
    get_template,
)
from mono.tokenization import check_tokenizer

from ..job import DataConfig
from .types import Example, RawSample, SkipSample

__all__ = ["IGNORE_INDEX", "Preprocessor", "jpeg_reencode", "tokens_per_tile"]

IGNORE_INDEX = -100
"""Label of a position that is not supervised."""

JPEG_QUALITY = (75, 100)
"""Inclusive range of the random JPEG re-encode quality (InternVL's training augmentation)."""


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float = 0.5) -> int:
    """``<IMG_CONTEXT>`` tokens per tile: ``(image_size / patch_size)^2 * downsample_ratio^2`` (256 at 448/14/0.5)."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    grid = image_size // patch_size
    count = grid * grid * downsample_ratio**2
    if count < 1 or count != int(count):
        raise ValueError(
            f"a {grid}x{grid} patch grid with downsample_ratio {downsample_ratio} gives {count} tokens per tile; "
            "it must be a positive integer"
        )
    return int(count)


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    """``image`` saved as JPEG at ``quality`` and decoded again (RGB): the compression artefacts of web images."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


class Preprocessor:
    """Turns raw samples into examples for one model (template, tile size, tokens per tile) and token budget.

    Args:
        tokenizer: a fast (Rust) tokenizer with the nine Mono special tokens (offsets are needed for labels).
        template: the model's chat template.
        num_image_token: ``<IMG_CONTEXT>`` tokens per tile.
        image_size: tile size S in pixels.
        max_seq_len: samples with more tokens are skipped (``too_long``), never cut.
        min_tiles: minimum tiles of dynamic tiling (lowered to a multi-image sample's per-image budget).
        use_thumbnail: append a whole-image tile when an image has more than one tile.
        caption_prompt: the user turn of an image-text pair (after ``<image>\\n``).
        system_message: system text of every sample (default: the template's); a sample's own first system turn
            wins.
        seed: with the epoch and the sample's ``index``, seeds the sample's augmentation.
        context: the model's context length (``for_model`` sets it): samples longer are skipped too. A pack of
            ``max_seq_len`` tokens may exceed it, since positions restart at every sample.

    Raises:
        ValueError: a slow tokenizer, a missing or split special token, or a ``turn_end`` that is not one token.
    """

    def __init__(
        self,
        tokenizer,
        template: ChatTemplate,
        num_image_token: int,
        image_size: int,
        max_seq_len: int,
        *,
        min_tiles: int = 1,
        use_thumbnail: bool = True,
        caption_prompt: str = DataConfig.caption_prompt,
        system_message: Optional[str] = None,
        seed: int = 0,
        context: Optional[int] = None,
    ) -> None:
        for name, value in (("num_image_token", num_image_token), ("image_size", image_size),
                            ("max_seq_len", max_seq_len), ("min_tiles", min_tiles), ("context", context or 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"Preprocessor: {name} must be a positive integer, got {value!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"Preprocessor needs a fast tokenizer (labels come from its offset mapping), got "
                f"{type(tokenizer).__name__}; load it with AutoTokenizer(..., use_fast=True) or convert it"
            )
        check_tokenizer(tokenizer)
        vocab = tokenizer.get_vocab()
        if template.turn_end not in vocab or tokenizer.encode(template.turn_end, add_special_tokens=False) != [
            vocab[template.turn_end]
        ]:
            raise ValueError(
                f"template {template.name!r} closes turns with {template.turn_end!r}, which this tokenizer does not "
                "encode as one token; add it as a special token or choose the template that matches the tokenizer"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.num_image_token = int(num_image_token)
        self.image_size = int(image_size)
        self.max_seq_len = int(max_seq_len)
        self.context = None if context is None else int(context)
        self.min_tiles = int(min_tiles)
        self.use_thumbnail = bool(use_thumbnail)
        self.caption_prompt = caption_prompt
        self.system_message = template.system_message if system_message is None else system_message
        self.seed = int(seed)
        self.img_start_id = vocab[IMG_START_TOKEN]
        self.img_end_id = vocab[IMG_END_TOKEN]
        self.img_context_id = vocab[IMG_CONTEXT_TOKEN]

    @classmethod
    def for_model(
        cls, model_config, tokenizer, data_cfg: DataConfig, max_seq_len: int, *, system_message: Optional[str] = None
    ) -> "Preprocessor":
        """The preprocessor of a :class:`mono.MonoInternVLConfig` model: its template, tile size and tokens per
        tile; tiling, caption prompt and seed from ``data_cfg``. ``system_message`` defaults to the model's.

        Raises:
            ValueError: the tokenizer lacks the special tokens, has ids beyond the model's vocabulary, or its
                ``<IMG_CONTEXT>`` id differs from the model config's.
        """
        check_tokenizer(tokenizer, vocab_size=model_config.llm_config.vocab_size)
        context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if model_config.img_context_token_id is not None and model_config.img_context_token_id != context_id:
            raise ValueError(
                f"the tokenizer maps {IMG_CONTEXT_TOKEN} to {context_id} but the model config says "
                f"img_context_token_id={model_config.img_context_token_id}; use the tokenizer saved with the model"
            )
        return cls(
            tokenizer,
            get_template(model_config.template),
            model_config.tokens_per_tile,
            model_config.image_size,
            max_seq_len,
            min_tiles=data_cfg.min_tiles,
            use_thumbnail=data_cfg.use_thumbnail,
            caption_prompt=data_cfg.caption_prompt,
            system_message=system_message if system_message is not None else model_config.system_message,
            seed=data_cfg.seed,
            context=max_context_length(model_config.llm_config),
        )

    # ------------------------------------------------------------------------------------------------ turns
    def turns(self, raw: RawSample) -> tuple[list[tuple[str, str]], str]:
        """``(turns, system_message)`` of a sample, validated, with the ``<image>`` prefix added where needed.

        ``<image>`` placeholders may only be in user turns; when no turn has one but the sample has images, one
        ``<image>\\n`` per image is put before the first user turn (as ``MonoInternVL.chat`` does).

        Raises:
            SkipSample: ``bad_conversation`` for roles that do not alternate user/assistant (starting with user,
                ending with an assistant answer), an empty answer, or placeholders that do not match the images.
        """
        sid = raw.sample_id
        if raw.kind == "pair":
            if raw.caption is None:
                raise SkipSample("bad_conversation", sid, "a pair without a caption")
            turns = [("user", IMAGE_PLACEHOLDER + "\n" + self.caption_prompt), ("assistant", raw.caption)]
        elif raw.kind == "conversation":
            turns = list(raw.conversation or [])
        else:
            raise ValueError(f"{sid}: unknown sample kind {raw.kind!r}; expected 'pair' or 'conversation'")
        system = self.system_message
        if turns and turns[0][0] == "system":
            system = turns.pop(0)[1]
            if IMAGE_PLACEHOLDER in system:
                raise SkipSample("bad_conversation", sid, f"the system turn holds {IMAGE_PLACEHOLDER}")
        if len(turns) < 2:
            raise SkipSample("bad_conversation", sid, f"{len(turns)} turn(s); a sample needs a user turn and an answer")
        for j, (role, text) in enumerate(turns):
            expected = "user" if j % 2 == 0 else "assistant"
            if role != expected:
                raise SkipSample(
                    "bad_conversation", sid, f"turn {j} is {role!r} where {expected!r} was expected (roles alternate "
                    "user/assistant starting with user)"
                )
            if role == "assistant":
                if not text.strip():
                    raise SkipSample("bad_conversation", sid, f"turn {j} is an empty answer")
                if IMAGE_PLACEHOLDER in text:
                    raise SkipSample("bad_conversation", sid, f"turn {j} (an answer) holds {IMAGE_PLACEHOLDER}")
        if turns[-1][0] != "assistant":
            raise SkipSample("bad_conversation", sid, "the last turn is a question without an answer")
        found = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if found == 0 and raw.images:
            turns[0] = ("user", (IMAGE_PLACEHOLDER + "\n") * len(raw.images) + turns[0][1])
            found = len(raw.images)
        if found != len(raw.images):
            raise SkipSample(
                "bad_conversation", sid, f"{found} {IMAGE_PLACEHOLDER} placeholder(s) for {len(raw.images)} image(s)"
            )
        return turns, system

    # ------------------------------------------------------------------------------------------------ pixels
    def sample_rng(self, raw: RawSample, epoch: int) -> np.random.Generator:
        """The sample's own random generator, a function of ``(seed, epoch, raw.index)`` only, so augmentation
        does not depend on worker count, order, or any global random state."""
        return np.random.default_rng([self.seed, int(epoch), int(raw.index)])

    def pixels(self, raw: RawSample, epoch: int = 0) -> tuple[Optional[torch.Tensor], list[int]]:
        """``(pixel_values_N, tiles per image)`` of the sample's images; ``(None, [])`` for a text-only sample.

        The tile cap ``raw.max_tiles`` is split between the images (``max(1, max_tiles // images)`` each). With
        ``raw.augment`` each image is first re-encoded as JPEG at a quality drawn from the sample's generator.

        Raises:
            SkipSample: ``corrupt_image`` for bytes that do not decode, ``missing_image`` for a file gone since
                indexing.
        """
        if not raw.images:
            return None, []
        budget = max(1, raw.max_tiles // len(raw.images))
        min_num = min(self.min_tiles, budget)
        rng = self.sample_rng(raw, epoch) if raw.augment else None
        tensors, num_tiles = [], []
        for k, ref in enumerate(raw.images):
            source = ref.data if ref.data is not None else ref.path
            if source is None:
                raise ValueError(f"{raw.sample_id}: image {k} has neither a path nor bytes")
            try:
                image = open_image(source)
            except ImageError as exc:
                # PIL names in-memory files by object address; drop it so reports are reproducible.
                detail = f"image {k}: " + re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))
                if ref.data is None and not os.path.exists(ref.path):
                    raise SkipSample("missing_image", raw.sample_id, detail) from None
                raise SkipSample("corrupt_image", raw.sample_id, detail) from None
            if rng is not None:
                image = jpeg_reencode(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
            tiles = dynamic_tiles(image, min_num, budget, self.image_size, self.use_thumbnail)
            tensors.append(tiles_to_tensor(tiles, self.image_size))
            num_tiles.append(len(tiles))
        return torch.cat(tensors), num_tiles

    # ------------------------------------------------------------------------------------------------ tokens
    def render(
        self, turns: list[tuple[str, str]], system: str, num_tiles: list[int], *, image_context: bool = False
    ) -> tuple[str, list[tuple[int, int]], list[int]]:
        """``(text, supervised character spans, character position of each image's <img>)``.

        Placeholders are expanded left to right into ``<img></img>`` (``image_context=False``: the context tokens
        are inserted as ids later) or full spans with ``<IMG_CONTEXT>`` x tiles x tokens per tile. A supervised
        span is an answer plus the ``turn_end`` after it.
        """
        expanded, image_offsets, remaining = [], [], list(num_tiles)
        for role, text in turns:
            if role == "user" and IMAGE_PLACEHOLDER in text:
                pieces = text.split(IMAGE_PLACEHOLDER)
                out, positions = [pieces[0]], []
                for piece in pieces[1:]:
                    positions.append(sum(len(p) for p in out))
                    n = remaining.pop(0) * self.num_image_token if image_context else 0
                    out += [IMG_START_TOKEN + IMG_CONTEXT_TOKEN * n + IMG_END_TOKEN, piece]
                text = "".join(out)
            else:
                positions = []
            expanded.append((role, text, positions))
        # The template is the single source of truth for the text: render every prefix ending in a turn and read
        # each turn's position off the prefix's length (prefix = ... + text + turn_end + turn_sep).
        tail = len(self.template.turn_end) + len(self.template.turn_sep)
        spans = []
        text = ""
        for j, (role, turn_text, positions) in enumerate(expanded):
            text = self.template.render([(r, t) for r, t, _ in expanded[: j + 1]], system, add_generation_prompt=False)
            start = len(text) - tail - len(turn_text)
            if text[start:start + len(turn_text)] != turn_text:
                raise RuntimeError(f"template {self.template.name!r} does not render turn {j} verbatim")
            image_offsets += [start + p for p in positions]
            if role == "assistant":
                spans.append((start, start + len(turn_text) + len(self.template.turn_end)))
        return text, spans, image_offsets

    def tokenize(
        self, raw: RawSample, turns: list[tuple[str, str]], system: str, num_tiles: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids_L, labels_L)`` int64 of the rendered sample, validated.

        Raises:
            SkipSample: ``too_long``, ``token_mismatch`` (context count, nothing supervised, or a token crossing an
                answer's start), ``truncated_image_span`` (an ``<img>``...``</img>`` span broken, e.g. by those
                token strings written literally in the text).
        """
        sid = raw.sample_id
        text, spans, image_offsets = self.render(turns, system, num_tiles)
        # The spans are rendered as bare "<img></img>" and the num_image_token * tiles context ids are inserted
        # after each <img> id: tokenizing 256 * tiles added tokens costs ~20x more (2.5 ms vs 0.12 ms for 7 tiles)
        # and gives the same ids, since added special tokens split the text around them either way (tested).
        encoding = self.tokenizer(text, return_offsets_mapping=True)
        ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        num_context = self.num_image_token * sum(num_tiles)
        length = len(ids) + num_context
        if length > self.max_seq_len or self.context is not None and length > self.context:
            bound = (f"max_seq_len {self.max_seq_len}" if self.context is None or self.max_seq_len <= self.context
                     else f"the model's context of {self.context} tokens")
            raise SkipSample("too_long", sid, f"{length} tokens ({num_context} visual) > {bound}")
        starts, ends = offsets[:, 0], offsets[:, 1]
        labels = np.full_like(ids, IGNORE_INDEX)
        for lo, hi in spans:
            crossing = np.flatnonzero((starts < lo) & (ends > lo))
            if crossing.size:
                t = int(crossing[0])
                raise SkipSample(
                    "token_mismatch", sid, f"token {self.tokenizer.convert_ids_to_tokens(int(ids[t]))!r} spans the "
                    f"start of an answer (characters {starts[t]}..{ends[t]}, answer at {lo}); its prompt would "
                    "tokenize differently at inference"
                )
            inside = (starts >= lo) & (ends <= hi) & (ends > starts)
            labels[inside] = ids[inside]
        if not (labels != IGNORE_INDEX).any():
            raise SkipSample("token_mismatch", sid, "nothing is supervised")
        # Insert the context ids after the <img> id that starts at each image's character position (an <img>
        # written literally in the text is elsewhere and is left for the span check below).
        insert_at = []
        for k, pos in enumerate(image_offsets):
            hit = np.flatnonzero((ids == self.img_start_id) & (starts <= pos) & (ends > pos))
            if hit.size != 1:
                raise RuntimeError(f"{sid}: image {k}'s <img> token not found at character {pos}")
            insert_at.append(int(hit[0]) + 1)
        if insert_at:
            pieces_ids, pieces_labels, prev = [], [], 0
            for at, tiles in zip(insert_at, num_tiles):
                n = tiles * self.num_image_token
                pieces_ids += [ids[prev:at], np.full(n, self.img_context_id, dtype=np.int64)]
                pieces_labels += [labels[prev:at], np.full(n, IGNORE_INDEX, dtype=np.int64)]
                prev = at
            ids = np.concatenate(pieces_ids + [ids[prev:]])
            labels = np.concatenate(pieces_labels + [labels[prev:]])
        self.check_image_spans(ids, num_tiles, sid)
        return ids, labels

    def check_image_spans(self, ids: np.ndarray, num_tiles: list[int], sample_id: str) -> None:
        """Check that ``ids`` hold exactly one ``<img>`` + context x (tiles x tokens per tile) + ``</img>`` per image.

        Raises:
            SkipSample: ``token_mismatch`` when the total ``<IMG_CONTEXT>`` count is not tokens per tile x tiles;
                ``truncated_image_span`` when the spans are cut, extra, or hold the wrong count.
        """
        context = ids == self.img_context_id
        expected = self.num_image_token * sum(num_tiles)
        if int(context.sum()) != expected:
            raise SkipSample(
                "token_mismatch", sample_id, f"{int(context.sum())} {IMG_CONTEXT_TOKEN} tokens for {sum(num_tiles)} "
                f"tile(s) x {self.num_image_token} = {expected} visual tokens (is {IMG_CONTEXT_TOKEN} in the text?)"
            )
        opens = np.flatnonzero(ids == self.img_start_id)
        closes = np.flatnonzero(ids == self.img_end_id)
        if len(opens) != len(num_tiles) or len(closes) != len(num_tiles):
            raise SkipSample(
                "truncated_image_span", sample_id, f"{len(opens)} {IMG_START_TOKEN} and {len(closes)} {IMG_END_TOKEN} "
                f"token(s) for {len(num_tiles)} image(s) (are these token strings written in the text?)"
            )
        for k, (lo, hi, tiles) in enumerate(zip(opens, closes, num_tiles)):
            n = tiles * self.num_image_token
            if hi != lo + n + 1 or not context[lo + 1:hi].all():
                raise SkipSample(
                    "truncated_image_span", sample_id, f"image {k}'s span at token {lo} holds {hi - lo - 1} tokens, "
                    f"expected {n} {IMG_CONTEXT_TOKEN}"
                )

    # ------------------------------------------------------------------------------------------------ all
    def __call__(self, raw: RawSample, epoch: int = 0) -> Example:
        """The example of ``raw`` in ``epoch`` (the epoch only changes the augmentation).

        Raises:
            SkipSample: with a reason of :data:`~evip.data.types.SKIP_REASONS`; see :meth:`turns`, :meth:`pixels`,
                :meth:`tokenize`.
        """
        turns, system = self.turns(raw)
        pixel_values, num_tiles = self.pixels(raw, epoch)
        ids, labels = self.tokenize(raw, turns, system, num_tiles)
        return Example(
            sample_id=raw.sample_id,
            input_ids_L=torch.from_numpy(ids),
            labels_L=torch.from_numpy(labels),
            pixel_values_N=pixel_values,
            num_tiles=num_tiles,
            num_visual_tokens=self.num_image_token * sum(num_tiles),
        )
