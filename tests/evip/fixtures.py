"""Tiny, deterministic data for the data-pipeline tests: a byte-level BPE tokenizer, small images, and datasets in
every source format (webdataset shards, JSONL pairs, meta JSON + LLaVA conversations) with optional bad samples.

Each writer returns a :class:`FixtureData` that says what a correct pipeline must see: the samples a source indexes,
what each should contain, and the skips per reason that the injected bad samples cause. ``bad`` names the cases to
inject, one sample each, by the skip reason they must produce:

- ``malformed_json``: a JSON line / ``.json`` member that does not parse (raised by the source),
- ``missing_image``: an image file or shard member that is not there (raised by the source),
- ``corrupt_image``: image bytes that are not an image,
- ``too_long``: a text of ~3000 words (assumes ``max_seq_len`` < 3000),
- ``truncated_image_span``: an answer that writes ``<img>`` literally,
- ``token_mismatch``: a text that writes ``<IMG_CONTEXT>`` literally,
- ``bad_conversation``: an empty caption (pairs) or two user turns in a row (conversations).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

from PIL import Image, ImageDraw
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from evip.data.types import SKIP_REASONS
from evip.job import DatasetConfig
from mono.templates import get_template
from mono.tokenization import add_special_tokens, train_bpe_tokenizer

__all__ = [
    "BAD_CASES", "COLOURS", "FixtureData", "FixtureImage", "SHAPES", "make_images", "tiny_bpe_tokenizer",
    "tiny_preprocessor", "write_conversations", "write_pairs_jsonl", "write_pairs_webdataset",
]

BAD_CASES = tuple(SKIP_REASONS)
"""Every injectable bad case (named by the skip reason it causes)."""

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
SHAPES = ("circle", "square", "triangle")
_RGB = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
    "black": (10, 10, 10), "white": (245, 245, 245), "orange": (250, 140, 20), "purple": (130, 40, 160),
}
# Sizes between 20x30 and 90x40 px (wide, tall, square), so tiling at 28 or 56 px stays cheap.
_SIZES = ((20, 30), (30, 20), (40, 40), (90, 40), (40, 90), (64, 32), (56, 56), (28, 84), (84, 28), (45, 60))

_CORPUS = (
    "a red circle on a blue background. a green square on a white background. a yellow triangle on a black "
    "background. an orange circle and a purple square. what colour is the shape? the shape is red. which image "
    "shows a circle? the first image shows a circle. describe the image in one sentence. there is one shape in "
    "the picture. provide a one-sentence caption for the provided image. what is two plus two? four. and three "
    "plus one? also four. you are a helpful assistant. hello, how are you? fine, thanks. the second image shows "
    "a triangle. image 1: image 2: the shapes are different colours. system user assistant 0 1 2 3 4 5 6 7 8 9."
)


# ---------------------------------------------------------------------------------------------------- tokenizer
@lru_cache(maxsize=8)
def _trained(corpus: tuple[str, ...]) -> str:
    return train_bpe_tokenizer(corpus).backend_tokenizer.to_str()


def tiny_bpe_tokenizer(words_or_corpus: Optional[str | Sequence[str]] = None) -> PreTrainedTokenizerFast:
    """:func:`mono.tokenization.train_bpe_tokenizer` on a fixed English corpus (cached; a new object each call, safe
    to mutate): byte-level BPE, ``<s>`` BOS, ``</s>`` EOS, ``<pad>``, the chat tokens and the nine Mono tokens."""
    if words_or_corpus is None:
        corpus: tuple[str, ...] = (_CORPUS,)
    elif isinstance(words_or_corpus, str):
        corpus = (words_or_corpus,)
    else:
        corpus = tuple(words_or_corpus)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(corpus)), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)
    add_special_tokens(fast)
    return fast


def tiny_preprocessor(tokenizer=None, *, image_size: int = 56, max_seq_len: int = 1024, **kwargs):
    """A :class:`~evip.data.preprocess.Preprocessor` for ``internlm2-chat`` with 14-px patches (4 tokens per tile at
    56 px) and the tiny tokenizer; ``kwargs`` go to the constructor."""
    from evip.data.preprocess import Preprocessor, tokens_per_tile

    return Preprocessor(
        tokenizer if tokenizer is not None else tiny_bpe_tokenizer(), get_template("internlm2-chat"),
        tokens_per_tile(image_size, 14), image_size, max_seq_len, **kwargs,
    )


# ---------------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class FixtureImage:
    """A written image and what it shows; usable as a path (``os.fspath``, ``str``)."""

    path: Path
    caption: str

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def _draw(rng: random.Random) -> tuple[Image.Image, str]:
    width, height = rng.choice(_SIZES)
    bg, fg = rng.sample(COLOURS, 2)
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (width, height), _RGB[bg])
    draw = ImageDraw.Draw(image)
    box = (width // 5, height // 5, width - width // 5, height - height // 5)
    if shape == "circle":
        draw.ellipse(box, fill=_RGB[fg])
    elif shape == "square":
        draw.rectangle(box, fill=_RGB[fg])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=_RGB[fg])
    return image, f"a {fg} {shape} on a {bg} background"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if fmt == "jpg" else "PNG")
    return buffer.getvalue()


def make_images(folder: str | Path, n: int, seed: int) -> list[FixtureImage]:
    """``n`` small RGB images (a coloured shape on a background, 20..90 px a side), alternately ``.jpg``/``.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        image, caption = _draw(rng)
        ext = "jpg" if i % 2 == 0 else "png"
        path = folder / f"img_{seed}_{i:04d}.{ext}"
        path.write_bytes(_encode(image, ext))
        out.append(FixtureImage(path, caption))
    return out


# ---------------------------------------------------------------------------------------------------- datasets
@dataclass
class FixtureData:
    """What a writer produced and what a correct pipeline must make of it.

    Attributes:
        path: what ``DatasetConfig.path`` takes.
        format: ``webdataset``, ``jsonl`` or ``meta``.
        num_samples: samples a source indexes (bad ones included).
        expected_skips: skips per reason over the whole pipeline (source + preprocessor).
        bad_ids: reason -> sample id of the bad sample injected for it.
        samples: sample id -> ``{"kind", "images": [path or bytes], "caption" | "conversation"}`` of good samples.
        problems: source problems expected (a truncated shard).
    """

    path: Path
    format: str
    num_samples: int
    expected_skips: dict[str, int] = field(default_factory=dict)
    bad_ids: dict[str, str] = field(default_factory=dict)
    samples: dict[str, dict] = field(default_factory=dict)
    problems: int = 0

    def dataset_config(self, **kwargs) -> DatasetConfig:
        return DatasetConfig(path=self.path, format=self.format, **kwargs)


def _check_bad(bad: Iterable[str]) -> list[str]:
    bad = list(bad)
    unknown = [b for b in bad if b not in BAD_CASES]
    if unknown or len(set(bad)) != len(bad):
        raise ValueError(f"bad cases must be distinct names from {BAD_CASES}, got {bad}")
    return bad


def _long_text(rng: random.Random) -> str:
    return " ".join(rng.choice(COLOURS + SHAPES) for _ in range(3000))


def _pair_specs(n: int, seed: int, bad: list[str]) -> list[tuple[Optional[str], Image.Image, str]]:
    """``(bad case or None, image, caption)`` for n good and one per bad case, in a seeded order."""
    rng = random.Random(seed)
    specs = []
    for case in [None] * n + bad:
        image, caption = _draw(rng)
        caption = {
            "too_long": _long_text(rng), "truncated_image_span": f"{caption} <img> inside",
            "token_mismatch": f"{caption} <IMG_CONTEXT>", "bad_conversation": "",
        }.get(case, caption)
        specs.append((case, image, caption))
    rng.shuffle(specs)
    return specs


_GARBAGE = b"this is not an image, whatever its name says"


def write_pairs_webdataset(
    folder: str | Path, n: int, seed: int, shards: int = 2, bad: Iterable[str] = (), truncated_shard: bool = False
) -> FixtureData:
    """Image-caption pairs in ``shards`` tar files ``pairs-00000k.tar`` (``.jpg``/``.png`` + ``.txt``, every third
    caption as ``.json`` ``{"caption": ...}``), keys ``000000``, ``000001``, ...

    With ``truncated_shard`` one more shard holds three pairs and is cut inside the last image: a source must index
    the first two and record one problem.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bad = _check_bad(bad)
    data = FixtureData(path=folder, format="webdataset", num_samples=0)
    specs = _pair_specs(n, seed, bad)
    per_shard = [specs[k::shards] for k in range(shards)]
    key = 0
    for k, shard_specs in enumerate(per_shard):
        name = f"pairs-{k:06d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for case, image, caption in shard_specs:
                sid = f"{name}:{key:06d}"
                ext = "jpg" if key % 2 == 0 else "png"
                image_bytes = _GARBAGE if case == "corrupt_image" else _encode(image, ext)
                members = [] if case == "missing_image" else [(f"{key:06d}.{ext}", image_bytes)]
                if case == "malformed_json":
                    members.append((f"{key:06d}.json", b'{"caption": "a red'))
                elif key % 3 == 0:
                    members.append((f"{key:06d}.json", json.dumps({"caption": caption}).encode()))
                else:
                    members.append((f"{key:06d}.txt", caption.encode() + b"\n"))
                for member, payload in members:
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(payload), 0
                    tf.addfile(info, io.BytesIO(payload))
                if case is None:
                    data.samples[sid] = {"kind": "pair", "caption": caption, "images": [image_bytes]}
                else:
                    data.bad_ids[case] = sid
                    data.expected_skips[case] = 1
                key += 1
    data.num_samples = key
    if truncated_shard:
        rng = random.Random(seed + 1)
        buffer = io.BytesIO()
        name = f"pairs-{shards:06d}.tar"
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for j in range(3):
                image, caption = _draw(rng)
                image_bytes = _encode(image, "png")
                for member, payload in ((f"{key:06d}.png", image_bytes), (f"{key:06d}.txt", caption.encode())):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(payload), 0
                    tf.addfile(info, io.BytesIO(payload))
                if j < 2:
                    data.samples[f"{name}:{key:06d}"] = {"kind": "pair", "caption": caption, "images": [image_bytes]}
                    end_of_complete = buffer.tell()
                key += 1
        # Cut 100 bytes into the last image's data (its header block is 512 bytes).
        (folder / name).write_bytes(buffer.getvalue()[: end_of_complete + 512 + 100])
        data.num_samples += 2
        data.problems = 1
    return data


def write_pairs_jsonl(folder: str | Path, n: int, seed: int, bad: Iterable[str] = ()) -> FixtureData:
    """Pairs in ``pairs.jsonl`` (``{"image": "images/...", "caption": ...}``, every third with ``text`` instead),
    images under ``images/``; line 3 is blank, so sample ids skip it."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    bad = _check_bad(bad)
    data = FixtureData(path=folder / "pairs.jsonl", format="jsonl", num_samples=0)
    lines = []
    for i, (case, image, caption) in enumerate(_pair_specs(n, seed, bad)):
        ext = "jpg" if i % 2 == 0 else "png"
        rel = f"images/pair_{i:04d}.{ext}"
        if case == "corrupt_image":
            (folder / rel).write_bytes(_GARBAGE)
        elif case != "missing_image":
            (folder / rel).write_bytes(_encode(image, ext))
        if case == "malformed_json":
            line = '{"image": "' + rel + '", "caption": "a red'
        else:
            line = json.dumps({"image": rel, ("text" if i % 3 == 2 else "caption"): caption})
        if len(lines) == 2:
            lines.append("")
        lines.append(line)
        sid = f"pairs.jsonl:{len(lines)}"
        if case is None:
            data.samples[sid] = {"kind": "pair", "caption": caption, "images": [folder / rel]}
        else:
            data.bad_ids[case] = sid
            data.expected_skips[case] = 1
        data.num_samples += 1
    data.path.write_text("\n".join(lines) + "\n")
    return data


def _conversation(i: int, rng: random.Random, images: list[FixtureImage], case: Optional[str]) -> tuple[list, int]:
    """``(LLaVA turns, number of images used)`` of conversation ``i`` (4 shapes of sample, in turn)."""
    style = i % 4
    if style == 0:  # one image, placeholder first
        turns = [("human", "<image>\nWhat colour is the shape?"), ("gpt", f"It is {images[0].caption}.")]
        used = 1
    elif style == 1:  # two or three images, placeholders inline
        used = 2 + i % 2
        question = "".join(f"Image {k + 1}: <image>\n" for k in range(used)) + "Describe the images."
        answer = " ".join(f"Image {k + 1} shows {images[k].caption}." for k in range(used))
        turns = [("human", question), ("gpt", answer)]
    elif style == 2:  # text only, two rounds
        turns = [("human", "What is two plus two?"), ("gpt", "Four."), ("human", "And three plus one?"),
                 ("gpt", "Also four.")]
        used = 0
    else:  # one image without placeholder (prefixed by the pipeline), a system turn, two rounds
        turns = [("system", "You are a helpful assistant."), ("human", "Describe the image in one sentence."),
                 ("gpt", f"There is {images[0].caption}."), ("human", "What colour is the shape?"),
                 ("gpt", images[0].caption.split()[1].capitalize() + ".")]
        used = 1
    if case == "too_long":
        turns[-1] = ("gpt", _long_text(rng))
    elif case == "truncated_image_span":
        turns[-1] = ("gpt", turns[-1][1] + " <img> is a tag.")
    elif case == "token_mismatch":
        j = 1 if turns[0][0] == "system" else 0
        turns[j] = ("human", turns[j][1] + " <IMG_CONTEXT>")
    elif case == "bad_conversation":
        turns.insert(len(turns) - 1, ("human", "One more question?"))
    return turns, used


def write_conversations(
    folder: str | Path, n: int, seed: int, bad: Iterable[str] = (), *, name: str = "convs",
    max_dynamic_patch: Optional[int] = None, repeat_time: float = 1.0, data_augment: Optional[bool] = None,
) -> FixtureData:
    """An InternVL meta JSON ``meta.json`` with one entry ``name`` -> ``convs.jsonl`` (LLaVA conversations: one
    image, two or three images, text-only two-round, and image without placeholder + system turn, in turn) and
    images under ``images/``; ``root``/``annotation`` are written relative to the meta file's folder."""
    folder = Path(folder)
    bad = _check_bad(bad)
    rng = random.Random(seed)
    pool = make_images(folder / "images", 3 * (n + len(bad)), seed)
    cases: list[Optional[str]] = [None] * n + bad
    rng.shuffle(cases)
    data = FixtureData(path=folder / "meta.json", format="meta", num_samples=len(cases))
    lines = []
    for i, case in enumerate(cases):
        if case in ("corrupt_image", "missing_image") and i % 4 == 2:
            i += 1  # needs an image: not the text-only style
        images = pool[3 * len(lines): 3 * len(lines) + 3]
        turns, used = _conversation(i, rng, images, case)
        rels = [img.path.relative_to(folder / "images").as_posix() for img in images[:used]]
        if case == "corrupt_image":
            images[0].path.write_bytes(_GARBAGE)
        elif case == "missing_image":
            images[0].path.unlink()
        record: dict = {"id": f"conv-{len(lines)}", "conversations": [{"from": r, "value": v} for r, v in turns]}
        if used == 1:
            record["image"] = rels[0]
        elif used > 1:
            record["image"] = rels
        line = json.dumps(record, ensure_ascii=False)
        lines.append(line[: len(line) // 2] if case == "malformed_json" else line)
        sid = f"convs.jsonl:{len(lines)}"
        if case is None:
            roles = {"human": "user", "gpt": "assistant", "system": "system"}
            data.samples[sid] = {
                "kind": "conversation", "images": [img.path for img in images[:used]],
                "conversation": [(roles[r], v) for r, v in turns],
            }
        else:
            data.bad_ids[case] = sid
            data.expected_skips[case] = 1
    (folder / "convs.jsonl").write_text("\n".join(lines) + "\n")
    entry: dict = {"root": "images", "annotation": "convs.jsonl", "repeat_time": repeat_time, "length": len(lines)}
    if max_dynamic_patch is not None:
        entry["max_dynamic_patch"] = max_dynamic_patch
    if data_augment is not None:
        entry["data_augment"] = data_augment
    data.path.write_text(json.dumps({name: entry}, indent=2))
    return data
