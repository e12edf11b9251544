"""The EViP demo's bundled data: every stage's dataset and the held-out evaluation splits, written from a seed in
the formats users bring (webdataset shards for S1.1/S1.2, InternVL meta JSON + LLaVA JSONL for S1.3/S2).

Layout written under ``root`` (paths in ``manifest.json`` are relative to it)::

    manifest.json          seed, sizes, noise share, counts per stage and task (written last: its presence with
                           the same settings means the data is complete, and a second call returns at once)
    s1_1/shard-*.tar       S1.1 pairs: key.jpg + key.txt (alt-text caption, a stated share wrong or irrelevant)
                           + key.json (ground truth and ``caption_kind``: accurate / wrong / irrelevant)
    s1_2/shard-*.tar       S1.2 pairs: key.jpg + key.txt (dense caption) + key.json (ground truth)
    s1_3_shapes/meta.json  S1.3's first phase (the recipe's run ``s1.3-shapes``): close-up object scenes, each asked
                           its shape alone -> s1_3_shapes/shapes.jsonl, images in s1_3_shapes/images/
    s1_3/meta.json         S1.3: meta entries objects, grounding, groups, digit -> <entry>.jsonl, images in s1_3/images/
    s2/meta.json           S2: entries scenes (2-3 turn conversations), digits, text (text-only) -> s2/*.jsonl,
                           images in s2/images/
    eval/<task>.jsonl      held out: {"id", "task", "image", "question", "answer"[, "box"]} (digits add
                           "digit_index"), image paths relative to eval/, images in eval/images/
    */_ground_truth.jsonl   s1_3_shapes, s1_3, s2, eval: the full ground truth of each scene image (training never
                           reads it);
                           digit records carry their load_digits() index as "digit_index"

Scenes come in two kinds, so that every question has one visual answer a 3-layer demo model can learn on a CPU in
minutes: an *object* scene is a single-tile (1:1) close-up of one shape (and sometimes a word) and answers colour,
shape, grounding and OCR questions; a *group* scene holds 1..5 shapes (and sometimes a word) at any of the aspect
ratios and answers counting, OCR and caption questions. S1.1/S1.2 captions describe both kinds and real digits (:data:`_PAIR_SHAPES`), so the concepts are learnt
before the task formats of S1.3.

Answers are exact strings, the same in every stage and in the evaluation: colour and shape a lowercase word
(``red``, ``circle``), count and digit a numeral (``3``, ``7``), OCR the word (``moon``), grounding
``<ref>red circle</ref><box>[[x1, y1, x2, y2]]</box>`` with integers in 0..1000 (:func:`grounding_answer`), caption
the dense caption of :meth:`Scene.caption`. Training questions are drawn from :data:`QUESTIONS`; the evaluation
asks the first (canonical) form. No training conversation states an answer before it is asked (a colour question
names the shape, a caption gives the count): the questions of a scene are split over as few samples as that allows
(:func:`_leak_free`).

Each part is drawn from its own random stream of ``(seed, part)``, so changing one size leaves the other parts
byte-identical, and the evaluation scenes and the held-out digits never meet training.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import re
import shutil
import tarfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from PIL import Image

from ..answers import normalize_answer
from .scenes import (
    COLOURS, SHAPES, Box, Scene, digit_indices, digit_label, position_phrase, render_digit, render_scene,
    sample_scene,
)

if TYPE_CHECKING:
    from ..job import DatasetConfig

__all__ = [
    "DemoData", "DemoDataSizes", "EVAL_TASKS", "QUESTIONS", "SCENE_KINDS", "STAGE_DIRS", "StageData", "grounding_answer",
    "load_demo_data", "parse_grounding", "scene_question", "text_corpus", "write_demo_data",
]

FORMAT_VERSION = 8
"""Bumped whenever what is written changes, so old demo data is rewritten rather than reused."""

STAGE_DIRS = {"s1.1": "s1_1", "s1.2": "s1_2", "s1.3-shapes": "s1_3_shapes", "s1.3": "s1_3", "s2": "s2"}
"""Recipe run name -> folder under the data root (``s1.3-shapes`` is the first phase of S1.3)."""

EVAL_TASKS = ("colour", "shape", "count", "digit", "grounding", "ocr", "caption")
"""Tasks of the held-out evaluation, one ``eval/<task>.jsonl`` each."""

QUESTIONS: dict[str, tuple[str, ...]] = {
    "caption": ("Describe the image.", "What is in the picture?", "Describe every shape in the image."),
    "grounding": ("Where is the {ref}?", "Give the bounding box of the {ref}.",
                  "Please provide the bounding box coordinate of the region this sentence describes: {ref}"),
    "count": ("How many shapes are there?", "Count the shapes in the image.", "How many shapes can you see?"),
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "ocr": ("What word is written in the image?", "Read the word in the image.", "What does the text say?"),
    "digit": ("What digit is this?", "Which digit is written here?", "Read the handwritten digit."),
    "exists": ("Is there a {ref}?", "Can you see a {ref}?"),
}
"""Question forms per task; the first is the canonical one the evaluation asks (``{ref}`` is ``colour shape``)."""

_SCENE_TASKS = ("caption", "grounding", "count", "colour", "shape", "ocr")
SCENE_KINDS: dict[str, tuple[str, ...]] = {
    "object": ("colour", "shape", "grounding", "ocr"),
    "group": ("count", "ocr", "caption"),
}
"""Scene kind -> the tasks it is asked (S1.3 and the evaluation); S2 adds ``exists`` to both."""
# Object scenes are close-ups (shapes 2.5x the size) in one tile: the demo model reads a colour or a shape, or a
# box, off several visual tokens instead of one or two among sixteen, which it learnt several times faster, and a
# 1:1 image keeps the sample at 16 visual tokens (no second tile, no thumbnail). Group scenes enlarge their shapes
# less (1.6x), so five still fit, and keep every aspect ratio, so dynamic tiling matters.
_KIND_SCENES = {
    "object": {"num_objects": 1, "word_prob": 0.3, "scale": 2.5, "aspect": "1:1"},
    "group": {"word_prob": 0.4, "scale": 1.6},
}
_COLOUR_LEAD_SHARE = 0.25
"""Share of S1.3 object scenes asked their colour instead of their shape (:func:`_s1_3_samples`)."""
_GROUNDING_REPEAT = 1.5
"""``repeat_time`` of S1.3's ``grounding`` entry (the object scenes' grounding and OCR samples): a box needs more
examples than a one-word answer; with 2-rank training at 1.0 grounding came out at 48% on held-out close-ups, at 2.0
at 62% (real digits then 76%)."""
_CAPTION_SHARE = 1 / 3
"""Share of S1.3 group scenes whose sample ends with the dense caption."""
_WORD = re.compile(r"[A-Za-z0-9]+")
_STREAMS = {"s1.1": 11, "s1.2": 12, "s1.3-shapes": 14, "s1.3": 13, "s2": 20, "eval": 99, "corpus": 7}
_JPEG_QUALITY = 90
_IRRELEVANT = (
    "click here to enlarge", "IMG_{n}.JPG", "free shipping on all orders", "untitled", "stock photo {n}",
    "best price guaranteed", "download now", "image not available", "thumbnail", "copyright {n} all rights reserved",
    "see more on our website", "photo by user{n}", "new arrivals", "page {n} of 12",
)
_GROUNDING = re.compile(
    r"<ref>(.*?)</ref>\s*<box>\s*\[\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]\]\s*</box>", re.S
)


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DemoDataSizes:
    """How much of each part is written (the defaults take a few seconds on a 2-core CPU)."""

    s1_1: int = 1600
    """S1.1 image-caption pairs (alt-text captions, ``noise_share`` of them wrong or irrelevant); a quarter of them
    (``s1_1 // 4``) show a training digit, the rest scenes (object and group kinds alternating)."""
    s1_2: int = 1600
    """S1.2 image-caption pairs (dense captions), the same mix as S1.1."""
    s1_3_shapes: int = 10000
    """Close-up object scenes of S1.3's first phase (recipe run ``s1.3-shapes``), each one sample: its shape
    question alone. Shape is the one concept the demo model learns slowly (it must combine several visual tokens'
    edges); on shape questions alone it learns it from about 20,000 answers, spread through the full mixture it
    did not learn it in the same time (see ``configs/evip/demo/s1_3_shapes.yaml``)."""
    s1_3_scenes: int = 12000
    """S1.3 scene images, object and group kinds alternating. An object scene gives two samples (its shape or
    colour question alone, in ``objects.jsonl``; grounding and, with a word, OCR, in ``grounding.jsonl``, listed
    :data:`_GROUNDING_REPEAT` times), a group scene one (count, OCR, sometimes the caption; ``groups.jsonl``): see
    :func:`_s1_3_samples`."""
    s1_3_digits: int = 3000
    """S1.3 digit samples, cycling through the 1,500 training digits in a seeded order, each drawn anew (ink, size,
    offset), listed twice in meta.json (``repeat_time`` 2): an epoch shows every training digit four times."""
    s2_scenes: int = 600
    """S2 conversations of 2-3 turns about one scene."""
    s2_digits: int = 300
    """S2 conversations of 2-3 turns about one training digit."""
    s2_text: int = 300
    """S2 text-only conversations of 2-3 turns (arithmetic, shape and colour facts)."""
    eval_per_task: int = 100
    """Held-out questions per evaluation task (digits: at most the 297 held-out digits)."""
    shard_size: int = 500
    """Pairs per webdataset shard."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            minimum = 1 if f.name in ("s1_1", "s1_2", "eval_per_task", "shard_size") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"DemoDataSizes.{f.name} must be an integer >= {minimum}, got {value!r}")
        if self.s1_3_scenes + self.s1_3_digits < 1 or self.s2_scenes + self.s2_digits + self.s2_text < 1:
            raise ValueError("DemoDataSizes: S1.3 and S2 need at least one sample each")


@dataclass(frozen=True)
class StageData:
    """One stage's dataset: what :class:`~evip.job.DatasetConfig` takes, and its number of samples."""

    path: Path
    format: str
    samples: int

    def dataset_config(self, **kwargs) -> DatasetConfig:
        """The stage's :class:`DatasetConfig` (``kwargs``: ``repeat``, ``max_tiles``, ``augment``)."""
        from ..job import DatasetConfig  # here: evip.job imports torch, which the data writers never need

        return DatasetConfig(path=self.path, format=self.format, **kwargs)


@dataclass(frozen=True)
class DemoData:
    """What :func:`write_demo_data` wrote.

    Attributes:
        root: the data folder.
        stages: ``s1.1``, ``s1.2``, ``s1.3``, ``s2`` -> :class:`StageData`.
        eval_dir: the held-out folder; image paths in its files are relative to it.
        eval_files: evaluation task -> its JSONL file.
        counts: samples per stage and task, as in the manifest.
        manifest: the ``manifest.json`` path.
    """

    root: Path
    stages: dict[str, StageData]
    eval_dir: Path
    eval_files: dict[str, Path]
    counts: dict[str, dict[str, int]]
    manifest: Path

    def datasets(self, stage: str) -> list[DatasetConfig]:
        """The ``data.datasets`` list of ``stage``."""
        if stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r}; the demo has {', '.join(self.stages)}")
        return [self.stages[stage].dataset_config()]


# ---------------------------------------------------------------------------------------------------- answers
def grounding_answer(ref: str, box: Sequence[int]) -> str:
    """``<ref>{ref}</ref><box>[[x1, y1, x2, y2]]</box>`` (InternVL's grounding format, box in 0..1000)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"<ref>{ref}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>"


def parse_grounding(text: str) -> Optional[tuple[str, Box]]:
    """``(ref, (x1, y1, x2, y2))`` of the first grounding answer in ``text`` (spaces optional), or ``None``."""
    match = _GROUNDING.search(text)
    if match is None:
        return None
    return match.group(1), tuple(int(match.group(k)) for k in range(2, 6))


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def scene_question(
    task: str, scene: Scene, rng: np.random.Generator, *, canonical: bool = False
) -> Optional[tuple[str, str, Optional[Box]]]:
    """``(question, answer, box)`` of ``task`` about ``scene``, or ``None`` when the pixels cannot answer it.

    ``box`` is the 0..1000 box of a grounding answer (else ``None``). Colour questions name a shape that occurs
    once, shape questions a colour that occurs once; ``exists`` asks about a present or an absent colour-shape pair
    with even odds. ``canonical`` asks the evaluation's form of the question; ``rng`` still picks the object.
    """
    form = QUESTIONS[task][0] if canonical else _pick(rng, QUESTIONS[task])
    if task == "caption":
        return form, scene.caption(), None
    if task == "count":
        return form, str(scene.count), None
    if task == "grounding":
        obj = _pick(rng, scene.objects)
        box = scene.box_1000(obj.box)
        return form.format(ref=obj.name), grounding_answer(obj.name, box), box
    if task == "colour":
        unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
        if not unique:
            return None
        obj = _pick(rng, unique)
        return form.format(shape=obj.shape), obj.colour, None
    if task == "shape":
        unique = [o for o in scene.objects if sum(p.colour == o.colour for p in scene.objects) == 1]
        if not unique:
            return None
        obj = _pick(rng, unique)
        return form.format(colour=obj.colour), obj.shape, None
    if task == "ocr":
        return (form, scene.word, None) if scene.word is not None else None
    if task == "exists":
        present = {o.name for o in scene.objects}
        if rng.random() < 0.5:
            return form.format(ref=_pick(rng, sorted(present))), "yes", None
        absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
        return form.format(ref=_pick(rng, absent)), "no", None
    raise ValueError(f"unknown task {task!r}; known: {', '.join(QUESTIONS)}")


def _stated(answer: str, context: Sequence[str]) -> bool:
    """Whether a one-word ``answer`` already stands in ``context`` (earlier turns and the question), as a word or,
    for numbers, as a numeral or number word. Longer answers (captions, grounding boxes) count as never stated."""
    if len(answer.split()) != 1:
        return False
    key = normalize_answer(answer, numeric=True)
    return any(normalize_answer(w, numeric=True) == key for text in context for w in _WORD.findall(text))


def _leak_free(qas: Sequence[tuple[str, str]], *, limit: Optional[int] = None) -> list[list[tuple[str, str]]]:
    """``qas`` (question, answer) in order, split into as few conversations as possible in which no answer is
    given away by an earlier turn or its own question: a multi-turn sample that asks "What colour is the square?"
    before "Which shape is purple?" teaches copying "square" from the text instead of reading the image (it
    did: the demo's shape accuracy stayed at chance until samples were split this way). Each question goes to
    the first conversation where its answer is not stated yet; with ``limit`` only the first conversation is
    kept, capped at ``limit`` turns."""
    conversations: list[list[tuple[str, str]]] = []
    for question, answer in qas:
        for conv in conversations:
            if (limit is None or len(conv) < limit) and not _stated(answer, [*(t for qa in conv for t in qa), question]):
                conv.append((question, answer))
                break
        else:
            if limit is None or not conversations:
                conversations.append([(question, answer)])
    return conversations[:1] if limit is not None else conversations


def _image_turns(qas: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The image comes with the first question."""
    return [(("<image>\n" if j == 0 else "") + q, a) for j, (q, a) in enumerate(qas)]


def _alt_text(scene: Scene, rng: np.random.Generator) -> str:
    """A loose but true web-style caption: some of the shapes, or the count, or the word; lowercase, no period."""
    k = int(rng.integers(1, min(3, scene.count) + 1))
    names = [scene.objects[int(j)].name for j in rng.permutation(scene.count)[:k]]
    forms = [" and ".join(names), ", ".join(names) + " on grey background", f"{scene.count} shapes",
             f"image with {scene.count} shapes: " + ", ".join(names), names[0] + " clipart"]
    if scene.word is not None:
        forms.append(f'sign with the word "{scene.word}"')
    return _pick(rng, forms)


def _wrong_text(scene: Scene, rng: np.random.Generator) -> str:
    """A caption in the same style that is false: shapes the scene does not have, or a wrong count."""
    present = {o.name for o in scene.objects}
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    names = [absent[int(j)] for j in rng.permutation(len(absent))[: int(rng.integers(1, 3))]]
    wrong_count = _pick(rng, [n for n in range(1, 7) if n != scene.count])
    return _pick(rng, [" and ".join(names), ", ".join(names) + " on grey background", f"{wrong_count} shapes",
                       names[0] + " clipart"])


def _irrelevant_text(rng: np.random.Generator) -> str:
    return _pick(rng, _IRRELEVANT).format(n=int(rng.integers(1000, 10000)))


# ---------------------------------------------------------------------------------------------------- conversations
def _digit_turns(label: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """2-3 turns: which digit, then one or two questions about it (parity, sums, successor)."""
    follow = [("Is it even or odd?", "even" if label % 2 == 0 else "odd")]
    k = int(rng.integers(1, 6))
    follow.append((f"What is the digit plus {k}?", str(label + k)))
    if label < 9:
        follow.append(("Which digit comes next?", str(label + 1)))
    if label > 0:
        follow.append(("Which digit comes before it?", str(label - 1)))
    chosen = [follow[int(j)] for j in rng.permutation(len(follow))[: int(rng.integers(1, 3))]]
    return [("<image>\n" + _pick(rng, QUESTIONS["digit"]), str(label)), *chosen]


def _text_turn(rng: np.random.Generator) -> tuple[str, str]:
    """One text-only question and its sentence answer."""
    kind = int(rng.integers(6))
    a, b = (int(v) for v in rng.integers(0, 10, 2))
    if kind == 0:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    if kind == 2:
        shape, sides = _pick(rng, (("triangle", 3), ("square", 4)))
        return f"How many sides does a {shape} have?", f"A {shape} has {sides} sides."
    if kind == 3:
        x, y, z = _pick(rng, (("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple")))
        return f"What colour do you get by mixing {x} and {y}?", f"Mixing {x} and {y} gives {z}."
    if kind == 4:
        word = _pick(rng, ("cat", "moon", "tree", "circle", "square", "yellow", "purple", "cross"))
        return f'How many letters are in the word "{word}"?', f'The word "{word}" has {len(word)} letters.'
    if a == b:
        b = (a + 1) % 10
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."


def _llava(record_id: str, turns: list[tuple[str, str]], image: Optional[str] = None, **extra) -> str:
    """A LLaVA JSONL line; ``extra`` keys (``digit_index``) are metadata that training ignores."""
    record: dict = {"id": record_id}
    if image is not None:
        record["image"] = image
    record.update(extra)
    record["conversations"] = [
        {"from": "human" if j % 2 == 0 else "gpt", "value": text} for pair in turns for j, text in enumerate(pair)
    ]
    return json.dumps(record, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------- writing
def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _rng(seed: int, part: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), _STREAMS[part]])


class _ShardWriter:
    """Writes ``shard-NNNNNN.tar`` files of ``shard_size`` keys each, byte-reproducibly (fixed mtime/owner/mode)."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.count = 0
        self._tar: Optional[tarfile.TarFile] = None

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            self._tar = tarfile.open(self.folder / f"shard-{self.count // self.shard_size:06d}.tar", "w",
                                     format=tarfile.USTAR_FORMAT)
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            self._tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _digit_caption(label: int, rng: np.random.Generator, dense: bool) -> str:
    if dense:
        return f"A handwritten digit {label} on white paper."
    return _pick(rng, [f"handwritten {label}", f"digit {label}", f"number {label} handwriting", f"scan of a {label}"])


def _write_pairs(
    folder: Path, n: int, shard_size: int, rng: np.random.Generator, noise_share: Optional[float]
) -> dict:
    """S1.1 (``noise_share`` > 0: alt text) or S1.2 (``noise_share`` None: dense captions) pairs: ``n // 4`` real
    training digits at seeded positions, scenes of both kinds (alternating) elsewhere."""
    folder.mkdir(parents=True)
    is_digit = np.zeros(n, dtype=bool)
    is_digit[rng.permutation(n)[: n // 4]] = True
    digits = iter(_train_digits(int(is_digit.sum()), rng))
    kinds = ["accurate"] * n
    if noise_share is not None:
        # Exactly round(share * n) noisy captions at seeded positions, half wrong, half irrelevant.
        noisy = rng.permutation(n)[: round(noise_share * n)]
        for j, i in enumerate(noisy):
            kinds[int(i)] = "wrong" if j % 2 == 0 else "irrelevant"
    writer = _ShardWriter(folder, shard_size)
    scenes = 0
    for i, kind in enumerate(kinds):
        if is_digit[i]:
            index = next(digits)
            label = digit_label(index)
            image = render_digit(index, rng)
            if noise_share is None or kind == "accurate":
                caption = _digit_caption(label, rng, dense=noise_share is None)
            elif kind == "wrong":
                caption = _digit_caption(_pick(rng, [d for d in range(10) if d != label]), rng, dense=False)
            else:
                caption = _irrelevant_text(rng)
            meta = {"caption_kind": kind, "digit_index": index, "digit": label}
            writer.add([(f"{i:06d}.jpg", _jpeg(image)), (f"{i:06d}.txt", caption.encode() + b"\n"),
                        (f"{i:06d}.json", json.dumps(meta).encode())])
            continue
        scene = sample_scene(rng, **_KIND_SCENES["object" if scenes % 2 == 0 else "group"])
        scenes += 1
        if noise_share is None:
            caption = scene.caption()
        elif kind == "accurate":
            caption = _alt_text(scene, rng)
        elif kind == "wrong":
            caption = _wrong_text(scene, rng)
        else:
            caption = _irrelevant_text(rng)
        meta = {"caption_kind": kind, "scene": scene.to_json()}
        writer.add([(f"{i:06d}.jpg", _jpeg(render_scene(scene))), (f"{i:06d}.txt", caption.encode() + b"\n"),
                    (f"{i:06d}.json", json.dumps(meta).encode())])
    writer.close()
    counts = {"samples": n, "digits": int(is_digit.sum())}
    if noise_share is not None:
        counts.update({k: kinds.count(k) for k in ("accurate", "wrong", "irrelevant")})
    return counts


def _write_meta(folder: Path, lines: dict[str, list[str]], repeats: Optional[dict[str, float]] = None) -> None:
    """One meta entry per non-empty ``lines`` list -> ``<name>.jsonl``, images under ``images/``; ``repeats`` sets
    an entry's ``repeat_time`` (default 1)."""
    meta = {}
    for name, rows in lines.items():
        if rows:
            (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
            meta[name] = {"root": "images", "annotation": f"{name}.jsonl",
                          "repeat_time": (repeats or {}).get(name, 1), "length": len(rows)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _train_digits(n: int, rng: np.random.Generator) -> list[int]:
    """``n`` training digit indices: a seeded order of the training split, cycled (never a held-out digit)."""
    order = rng.permutation(digit_indices("train"))
    return [int(order[i % len(order)]) for i in range(n)]


def _s1_3_samples(kind: str, scene: Scene, rng: np.random.Generator) -> list[list[tuple[str, str]]]:
    """The S1.3 samples of a scene, each a list of (question, answer) turns in which no answer is stated before
    it is asked.

    An object scene gives two samples: its shape question alone (or, in :data:`_COLOUR_LEAD_SHARE` of the scenes,
    its colour question: each names the other's answer), and its grounding question with its OCR question in
    random order. A group scene gives one: its count, then OCR, then in :data:`_CAPTION_SHARE` of the scenes the
    caption (it states the count and the word, so it comes last). One-word answers stand alone or in short
    samples because S1.3 weights samples by the square root of their supervised tokens: in a sample with a
    25-token box or caption a one-token answer gets a fifth of the weight it has alone, and the demo model
    learns shapes from tens of thousands of answers (colour, learnt from a few hundred, is asked less)."""
    def turns(tasks: Sequence[str]) -> list[tuple[str, str]]:
        return [qa[:2] for qa in (scene_question(t, scene, rng) for t in tasks) if qa is not None]

    if kind == "object":
        lead = "colour" if rng.random() < _COLOUR_LEAD_SHARE else "shape"
        rest = ["grounding", "ocr"]
        return [turns([lead]), turns([rest[int(j)] for j in rng.permutation(2)])]
    return [turns(["count", "ocr", *(["caption"] if rng.random() < _CAPTION_SHARE else [])])]


def _write_s1_3(folder: Path, sizes: DemoDataSizes, rng: np.random.Generator) -> dict:
    (folder / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {"objects": [], "grounding": [], "groups": [], "digit": []}
    truth = []
    for i in range(sizes.s1_3_scenes):
        kind = "object" if i % 2 == 0 else "group"
        scene = sample_scene(rng, **_KIND_SCENES[kind])
        image = f"scene-{i:06d}.jpg"
        (folder / "images" / image).write_bytes(_jpeg(render_scene(scene)))
        truth.append(json.dumps({"image": image, "kind": kind, **scene.to_json()}))
        convs = [(j, c) for j, sample in enumerate(_s1_3_samples(kind, scene, rng)) for c in _leak_free(sample)]
        for k, (j, conv) in enumerate(convs):
            suffix = "" if k == 0 else f"-{k}"
            name = "groups" if kind == "group" else ("objects" if j == 0 else "grounding")
            lines[name].append(_llava(f"{kind}-{i:06d}{suffix}", _image_turns(conv), image))
    for i, index in enumerate(_train_digits(sizes.s1_3_digits, rng)):
        image = f"digit-{i:06d}.jpg"
        (folder / "images" / image).write_bytes(_jpeg(render_digit(index, rng)))
        question = "<image>\n" + _pick(rng, QUESTIONS["digit"])
        lines["digit"].append(
            _llava(f"digit-{i:06d}", [(question, str(digit_label(index)))], image, digit_index=index)
        )
    _write_meta(folder, lines, repeats={"digit": 2, "grounding": _GROUNDING_REPEAT})
    (folder / "_ground_truth.jsonl").write_text("".join(t + "\n" for t in truth), encoding="utf-8")
    return {task: len(rows) for task, rows in lines.items()} | {"images": sizes.s1_3_scenes + sizes.s1_3_digits}


def _write_s1_3_shapes(folder: Path, sizes: DemoDataSizes, rng: np.random.Generator) -> dict:
    """Close-up object scenes (the evaluation's kind), each asked its shape in one of the :data:`QUESTIONS` forms."""
    (folder / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {"shapes": []}
    truth = []
    for i in range(sizes.s1_3_shapes):
        scene = sample_scene(rng, **_KIND_SCENES["object"])
        image = f"scene-{i:06d}.jpg"
        (folder / "images" / image).write_bytes(_jpeg(render_scene(scene)))
        truth.append(json.dumps({"image": image, "kind": "object", **scene.to_json()}))
        question, answer, _ = scene_question("shape", scene, rng)
        lines["shapes"].append(_llava(f"shape-{i:06d}", _image_turns([(question, answer)]), image))
    _write_meta(folder, lines)
    (folder / "_ground_truth.jsonl").write_text("".join(t + "\n" for t in truth), encoding="utf-8")
    return {"shapes": len(lines["shapes"]), "images": sizes.s1_3_shapes}


def _write_s2(folder: Path, sizes: DemoDataSizes, rng: np.random.Generator) -> dict:
    (folder / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {"scenes": [], "digits": [], "text": []}
    truth = []
    for i in range(sizes.s2_scenes):
        kind = "object" if i % 2 == 0 else "group"
        scene = sample_scene(rng, **_KIND_SCENES[kind])
        image = f"scene-{i:06d}.jpg"
        (folder / "images" / image).write_bytes(_jpeg(render_scene(scene)))
        truth.append(json.dumps({"image": image, "kind": kind, **scene.to_json()}))
        tasks = (*SCENE_KINDS[kind], "exists")
        candidates = [qa[:2] for qa in (scene_question(t, scene, rng) for t in tasks) if qa is not None]
        shuffled = [candidates[int(j)] for j in rng.permutation(len(candidates))]
        chosen = _leak_free(shuffled, limit=int(rng.integers(2, 4)))[0]
        lines["scenes"].append(_llava(f"scene-{i:06d}", _image_turns(chosen), image))
    for i, index in enumerate(_train_digits(sizes.s2_digits, rng)):
        image = f"digit-{i:06d}.jpg"
        (folder / "images" / image).write_bytes(_jpeg(render_digit(index, rng)))
        lines["digits"].append(
            _llava(f"digit-{i:06d}", _digit_turns(digit_label(index), rng), image, digit_index=index)
        )
    for i in range(sizes.s2_text):
        turns = [_text_turn(rng) for _ in range(int(rng.integers(2, 4)))]
        lines["text"].append(_llava(f"text-{i:06d}", turns))
    _write_meta(folder, lines)
    (folder / "_ground_truth.jsonl").write_text("".join(t + "\n" for t in truth), encoding="utf-8")
    return {name: len(rows) for name, rows in lines.items()} | {"images": sizes.s2_scenes + sizes.s2_digits}


def _write_eval(folder: Path, per_task: int, rng: np.random.Generator) -> dict:
    """Held-out scenes (their own stream) until every scene task has ``per_task`` questions, and held-out digits."""
    (folder / "images").mkdir(parents=True)
    rows: dict[str, list[dict]] = {task: [] for task in EVAL_TASKS}
    scenes: list[str] = []
    tries = 0
    while any(len(rows[t]) < per_task for t in _SCENE_TASKS):
        tries += 1
        if tries > 100 * per_task:
            raise RuntimeError(f"evaluation scenes: {tries} scenes did not give {per_task} questions per task")
        kind = "object" if tries % 2 == 1 else "group"
        scene = sample_scene(rng, **_KIND_SCENES[kind])
        image = f"images/scene-{len(scenes):06d}.jpg"
        asked = False
        for task in SCENE_KINDS[kind]:
            if len(rows[task]) < per_task:
                qa = scene_question(task, scene, rng, canonical=True)
                if qa is not None:
                    question, answer, box = qa
                    row = {"id": f"{task}-{len(rows[task]):04d}", "task": task, "image": image, "question": question,
                           "answer": answer}
                    if box is not None:
                        row["box"] = list(box)
                    rows[task].append(row)
                    asked = True
        if asked:
            (folder / image).write_bytes(_jpeg(render_scene(scene)))
            scenes.append(json.dumps({"image": image, "kind": kind, **scene.to_json()}))
    held_out = rng.permutation(digit_indices("held_out"))[:per_task]
    for k, index in enumerate(held_out):
        image = f"images/digit-{k:06d}.jpg"
        (folder / image).write_bytes(_jpeg(render_digit(int(index), rng)))
        rows["digit"].append({"id": f"digit-{k:04d}", "task": "digit", "image": image,
                              "question": QUESTIONS["digit"][0], "answer": str(digit_label(int(index))),
                              "digit_index": int(index)})
    for task, task_rows in rows.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows), encoding="utf-8")
    (folder / "_ground_truth.jsonl").write_text("".join(t + "\n" for t in scenes), encoding="utf-8")
    return {task: len(task_rows) for task, task_rows in rows.items()} | {"images": len(scenes) + len(held_out)}


# ---------------------------------------------------------------------------------------------------- entry points
def _request(seed: int, sizes: DemoDataSizes, noise_share: float) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": int(seed), "sizes": asdict(sizes),
            "noise_share": float(noise_share)}


def load_demo_data(root: Path) -> DemoData:
    """The :class:`DemoData` of a complete demo data folder, from its manifest.

    Raises:
        FileNotFoundError: ``root`` has no ``manifest.json`` (not written, or writing was interrupted), or a file
            it lists is missing.
    """
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; write the demo data with write_demo_data('{root}')")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    stages = {
        name: StageData(root / s["path"], s["format"], int(s["samples"])) for name, s in manifest["stages"].items()
    }
    eval_files = {task: root / rel for task, rel in manifest["eval"]["files"].items()}
    missing = [str(p) for p in [*(s.path for s in stages.values()), *eval_files.values()] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"demo data under '{root}' is incomplete: missing {', '.join(missing)}")
    return DemoData(root, stages, root / manifest["eval"]["dir"], eval_files, manifest["counts"], path)


_PARTS = ("s1.3", "s1.3-shapes", "s1.1", "s1.2", "s2", "eval")
"""The independently written parts (each from a random stream of its own), the longest first: S1.3 is about half
of the ~12 s, the S1.3 shape close-ups a quarter."""


def _write_part(name: str, root: Path, seed: int, sizes: DemoDataSizes, noise_share: float) -> dict:
    """Write one part of :data:`_PARTS` into its folder under ``root``; its counts."""
    rng = _rng(seed, name)
    if name in ("s1.1", "s1.2"):
        return _write_pairs(root / STAGE_DIRS[name], getattr(sizes, name.replace(".", "_")), sizes.shard_size, rng,
                            noise_share if name == "s1.1" else None)
    if name == "s1.3-shapes":
        return _write_s1_3_shapes(root / STAGE_DIRS[name], sizes, rng)
    if name == "s1.3":
        return _write_s1_3(root / STAGE_DIRS[name], sizes, rng)
    if name == "s2":
        return _write_s2(root / STAGE_DIRS[name], sizes, rng)
    return _write_eval(root / "eval", sizes.eval_per_task, rng)


def write_demo_data(
    root: Path, *, seed: int = 0, sizes: DemoDataSizes | None = None, noise_share: float = 0.2, workers: int = 1
) -> DemoData:
    """Write the demo's data under ``root`` (layout in the module docstring) and return where it is.

    ``noise_share`` of the S1.1 captions (rounded to a whole number of samples) are wrong or irrelevant. The same
    ``seed``, ``sizes`` and ``noise_share`` give byte-identical files, with any number of ``workers`` (processes
    writing the parts side by side). When ``root`` already holds a complete write with the same settings nothing is
    written; with other settings the demo's folders (``s1_1``, ``s1_2``, ``s1_3``, ``s2``, ``eval``) are replaced
    and anything else under ``root`` is left alone.

    Raises:
        ValueError: ``noise_share`` outside [0, 1) or ``workers`` < 1.
    """
    sizes = sizes or DemoDataSizes()
    if not 0 <= noise_share < 1:
        raise ValueError(f"noise_share must be in [0, 1), got {noise_share!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    root = Path(root)
    request = _request(seed, sizes, noise_share)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if {k: manifest.get(k) for k in request} == request:
                return load_demo_data(root)
        except (ValueError, KeyError, FileNotFoundError):
            pass  # unreadable or incomplete: written again below
        manifest_path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    for folder in (*STAGE_DIRS.values(), "eval"):
        if (root / folder).exists():
            shutil.rmtree(root / folder)

    if workers == 1:
        counts = {name: _write_part(name, root, seed, sizes, noise_share) for name in _PARTS}
    else:  # spawned, not forked: the caller may hold threads (torch, a process group) that a fork would inherit
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(_PARTS)), mp_context=context) as pool:
            futures = {name: pool.submit(_write_part, name, root, seed, sizes, noise_share) for name in _PARTS}
            counts = {name: future.result() for name, future in futures.items()}
    counts = {name: counts[name] for name in (*STAGE_DIRS, "eval")}  # the manifest's order
    samples = {
        "s1.1": sizes.s1_1, "s1.2": sizes.s1_2,
        "s1.3-shapes": sizes.s1_3_shapes,
        "s1.3": sum(v for k, v in counts["s1.3"].items() if k != "images"),
        "s2": sum(v for k, v in counts["s2"].items() if k != "images"),
    }
    manifest = {
        **request,
        "noisy_captions": counts["s1.1"]["wrong"] + counts["s1.1"]["irrelevant"],
        "stages": {
            stage: {"path": folder if stage in ("s1.1", "s1.2") else f"{folder}/meta.json",
                    "format": "webdataset" if stage in ("s1.1", "s1.2") else "meta", "samples": samples[stage]}
            for stage, folder in STAGE_DIRS.items()
        },
        "eval": {"dir": "eval", "files": {task: f"eval/{task}.jsonl" for task in EVAL_TASKS}},
        "digits": {"train": [0, int(digit_indices("held_out")[0])],
                   "held_out": [int(digit_indices("held_out")[0]), int(digit_indices("held_out")[-1]) + 1]},
        "counts": counts,
    }
    # Written last and atomically: a manifest means every file above is complete.
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    return load_demo_data(root)


def text_corpus(num: int = 2000, *, seed: int = 0) -> list[str]:
    """``num`` short English paragraphs about demo scenes (a dense caption plus a few plain statements about it),
    for the base LM's pre-training corpus: the words and sentence shapes the demo's answers use, from a stream of
    its own (no training or evaluation image is described)."""
    rng = _rng(seed, "corpus")
    out = []
    for _ in range(num):
        scene = sample_scene(rng)
        sentences = [scene.caption()]
        for j in rng.permutation(scene.count)[:2]:
            obj = scene.objects[int(j)]
            sentences.append(f"The {obj.name} is {position_phrase(obj.position)}. It is {obj.size}.")
        sentences.append(_text_turn(rng)[1])
        out.append(" ".join(sentences))
    return out
