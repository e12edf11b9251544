"""Synthetic scenes and real handwritten digits for the EViP demo, each image with its full ground truth.

Legend: a pixel box is ``(x1, y1, x2, y2)`` in the image's own pixels with ``x2``/``y2`` exclusive (the edges of
the drawn area); a *normalised* box has the same edges scaled to integers in 0..1000 (InternVL's grounding
convention: ``round(1000 * x / width)``).

A scene is sampled as ground truth first (:func:`sample_scene`, a pure function of a numpy ``Generator``) and drawn
second (:func:`render_scene`, a pure function of the scene), so text-only helpers (the base-LM corpus) get scene
descriptions without drawing, and one scene always gives the same pixels.

Sizes are chosen for the demo model (112-px tiles of 16 visual tokens each, 14-px patches, pixel shuffle 0.5):
images are 112 px on the short side at five aspect ratios, so dynamic tiling gives 1 tile (1:1) or 2 tiles plus a
thumbnail (2:1, 1:2, 3:2, 2:3); small shapes (16-21 px) still cover a visual token, large ones (28-38 px) are
clearly larger, and objects keep a gap between them so counting is never ambiguous.

The digits are scikit-learn's bundled ``load_digits()`` (1,797 real 8x8 scans of handwriting), split by index:
:data:`DIGITS_HELD_OUT_START` and later are held out for evaluation and never drawn for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "ASPECTS", "BASE", "Box", "COLOURS", "DIGITS_HELD_OUT_START", "MAX_OBJECTS", "POSITIONS", "SHAPES", "SIZES",
    "Scene", "SceneObject", "WORDS", "digit_indices", "digit_label", "normalise_box", "position_of",
    "position_phrase", "render_digit", "render_scene", "sample_scene",
]

Box = tuple[int, int, int, int]

BASE = 112
"""Short side of a scene in pixels: the demo's tile size, so a 1:1 scene is exactly one tile."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (30, 170, 60),
    "blue": (40, 80, 225), "purple": (140, 50, 180), "white": (250, 250, 250), "black": (15, 15, 15),
}
"""Named fill colours, far apart in RGB and all distinct from the grey backgrounds."""

SHAPES = ("circle", "square", "triangle", "cross")
"""Shapes with different silhouettes at 16 px (a star would look like a circle that small)."""

SIZES: dict[str, tuple[int, int]] = {"small": (16, 21), "large": (28, 38)}
"""Side length range (inclusive, at :data:`BASE`) of each size word; the gap between them keeps the words apart."""

ASPECTS: dict[str, tuple[int, int]] = {"1:1": (2, 2), "2:1": (4, 2), "1:2": (2, 4), "3:2": (3, 2), "2:3": (2, 3)}
"""Aspect ratio name -> (width, height) in half tiles: 112x112, 224x112, 112x224, 168x112, 112x168 at BASE."""

MAX_OBJECTS = 5
"""Scenes hold 1..MAX_OBJECTS shapes."""

WORDS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "car", "ship", "home", "milk", "rain", "leaf",
         "king", "lamp")
"""Words a scene may show: short (3-4 letters, so they fit beside the shapes) and none a colour or shape name."""

POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
"""Position words: the cell of a 3x3 grid that holds a box's centre, in reading order."""

_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right", "left": "on the left",
    "centre": "in the centre", "right": "on the right", "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}

WORD_SCALE = 2
"""The bitmap font's 6x11-px glyphs are enlarged this much (nearest neighbour), so letters span ~12x22 px."""

_GAP = 6  # px between any two boxes, so shapes never touch (counting stays unambiguous)
_MARGIN = 3  # px between a box and the image border
_JITTER = 12  # max per-channel deviation of a fill from its named colour, so colour is not one exact RGB value
_NOISE_STD = 6.0  # std of the per-pixel background noise of a noisy scene
_PLACE_TRIES = 60  # random positions tried per box before the layout is drawn again
_LAYOUT_TRIES = 200


# ---------------------------------------------------------------------------------------------------- geometry
def _round_div(num: int, den: int) -> int:
    """``round(num / den)`` with halves up, in exact integer arithmetic (no float rounding differences)."""
    return (2 * num + den) // (2 * den)


def normalise_box(box: Box, width: int, height: int) -> Box:
    """A pixel box as integers in 0..1000 (``round(1000 * x / width)``, ``round(1000 * y / height)``)."""
    x1, y1, x2, y2 = box
    return (_round_div(1000 * x1, width), _round_div(1000 * y1, height), _round_div(1000 * x2, width),
            _round_div(1000 * y2, height))


def position_of(box: Box, width: int, height: int) -> str:
    """The :data:`POSITIONS` word of the 3x3 grid cell holding the box's centre."""
    cx2, cy2 = box[0] + box[2], box[1] + box[3]  # twice the centre, to stay in integers
    col = min(2, 3 * cx2 // (2 * width))
    row = min(2, 3 * cy2 // (2 * height))
    return POSITIONS[3 * row + col]


def position_phrase(position: str) -> str:
    """A position word as a phrase that follows a noun: ``"top left"`` -> ``"in the top left"``."""
    return _PHRASES[position]


def _first_free(x: np.ndarray, y: np.ndarray, w: int, h: int, placed: list[Box]) -> int:
    """Index of the first candidate corner ``(x[k], y[k])`` whose w x h box keeps ``_GAP`` px from every placed
    box, or -1 (all candidates at once: per-candidate Python loops dominated the time of sampling a scene)."""
    if not placed:
        return 0
    p = np.asarray(placed)[None]  # (1, M, 4) against (K, 1) candidates
    x, y = x[:, None], y[:, None]
    apart_x = (x + w + _GAP <= p[..., 0]) | (p[..., 2] + _GAP <= x)
    apart_y = (y + h + _GAP <= p[..., 1]) | (p[..., 3] + _GAP <= y)
    ok = np.flatnonzero((apart_x | apart_y).all(axis=1))
    return int(ok[0]) if ok.size else -1


# ---------------------------------------------------------------------------------------------------- ground truth
@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene.

    Attributes:
        colour: a :data:`COLOURS` name.
        shape: a :data:`SHAPES` name.
        size: ``small`` or ``large`` (:data:`SIZES`).
        box: pixel box; shapes are as wide as they are high.
        position: the :data:`POSITIONS` word of the box.
        rgb: the exact fill drawn (the named colour, slightly jittered).
    """

    colour: str
    shape: str
    size: str
    box: Box
    position: str
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        """``"red circle"``: unique within a scene, so it is the referring expression of grounding."""
        return f"{self.colour} {self.shape}"

    def describe(self) -> str:
        """``"a large red circle in the top left"``."""
        return f"a {self.size} {self.colour} {self.shape} {position_phrase(self.position)}"


@dataclass(frozen=True)
class Scene:
    """A scene's ground truth: everything :func:`render_scene` draws, and nothing it does not.

    Attributes:
        width, height: image size in pixels.
        aspect: the :data:`ASPECTS` name.
        background: grey level of the background.
        noise_seed: which window of the fixed noise bank is the background noise, ``None`` for a plain
            background.
        objects: the shapes in reading order (by :data:`POSITIONS` cell, then top to bottom, left to right); each
            ``colour shape`` pair occurs at most once.
        word: the written word (:data:`WORDS`) or ``None``.
        word_box: pixel box of the word's ink, or ``None``.
    """

    width: int
    height: int
    aspect: str
    background: int
    noise_seed: Optional[int]
    objects: tuple[SceneObject, ...]
    word: Optional[str] = None
    word_box: Optional[Box] = None

    @property
    def count(self) -> int:
        """Number of shapes (the written word is not a shape)."""
        return len(self.objects)

    @property
    def word_rgb(self) -> tuple[int, int, int]:
        """Ink of the word: black on a light background, white on a dark one."""
        return (0, 0, 0) if self.background >= 128 else (255, 255, 255)

    @property
    def word_position(self) -> Optional[str]:
        return position_of(self.word_box, self.width, self.height) if self.word_box is not None else None

    def box_1000(self, box: Box) -> Box:
        """``box`` of this scene normalised to 0..1000."""
        return normalise_box(box, self.width, self.height)

    def find(self, colour: str, shape: str) -> SceneObject:
        """The object of that colour and shape (``KeyError`` if there is none)."""
        for obj in self.objects:
            if obj.colour == colour and obj.shape == shape:
                return obj
        raise KeyError(f"no {colour} {shape} in the scene")

    def caption(self) -> str:
        """The dense caption: every shape with size, colour and position, then the word if there is one.

        ``There are 2 shapes on a grey background: a large red circle in the top left and a small blue square in
        the centre. The word "moon" is written on the right.`` Objects are listed in reading order, so the caption
        is a function of the pixels.
        """
        parts = [obj.describe() for obj in self.objects]
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        text = (f"There is 1 shape on a grey background: {listed}." if self.count == 1 else
                f"There are {self.count} shapes on a grey background: {listed}.")
        if self.word is not None:
            text += f' The word "{self.word}" is written {position_phrase(self.word_position)}.'
        return text

    def to_json(self) -> dict:
        """The ground truth as plain JSON (pixel and 0..1000 boxes), as written next to the images."""
        out = {
            "width": self.width, "height": self.height, "aspect": self.aspect, "background": self.background,
            "noisy": self.noise_seed is not None, "count": self.count,
            "objects": [
                {"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position, "box": list(o.box),
                 "box_1000": list(self.box_1000(o.box))}
                for o in self.objects
            ],
            "word": self.word,
        }
        if self.word_box is not None:
            out["word_box"] = list(self.word_box)
            out["word_box_1000"] = list(self.box_1000(self.word_box))
            out["word_position"] = self.word_position
        return out


@lru_cache(maxsize=None)
def _word_mask(word: str) -> Image.Image:
    """The word's ink as an ``L`` mask, cropped to the ink and enlarged ``WORD_SCALE`` times (nearest neighbour)."""
    font = ImageFont.load_default_imagefont()  # the bitmap font shipped inside Pillow: no font file needed
    left, top, right, bottom = font.getbbox(word)
    small = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(small).text((1 - left, 1 - top), word, fill=255, font=font)
    small = small.crop(small.getbbox())
    return small.resize((small.width * WORD_SCALE, small.height * WORD_SCALE), Image.Resampling.NEAREST)


def sample_scene(
    rng: np.random.Generator,
    *,
    num_objects: Optional[int] = None,
    word_prob: float = 0.4,
    aspect: Optional[str] = None,
    base: int = BASE,
    scale: float = 1.0,
) -> Scene:
    """A random scene: 1..:data:`MAX_OBJECTS` shapes (distinct colour-shape pairs, random sizes, non-touching),
    a written word with probability ``word_prob``, on a plain or lightly noisy grey background.

    ``num_objects`` and ``aspect`` fix those choices; ``base`` is the short side in pixels (shape sizes scale with
    it); ``scale`` enlarges the shapes (2.0: a close-up, where ``small`` and ``large`` keep their ratio). A scene
    that does not fit is laid out again, aspect ratio included, so crowded scenes lean to the wider aspects.
    Deterministic in the state of ``rng``.

    Raises:
        ValueError: ``num_objects`` outside 1..MAX_OBJECTS or an unknown ``aspect``.
    """
    if num_objects is not None and not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}, got {num_objects}")
    if not 0.5 <= scale <= 2.5:
        raise ValueError(f"scale must be in [0.5, 2.5], got {scale}")
    if aspect is not None and aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; known: {', '.join(ASPECTS)}")
    colours, aspects = list(COLOURS), list(ASPECTS)
    for _ in range(_LAYOUT_TRIES):
        name = aspect or aspects[int(rng.integers(len(aspects)))]
        width, height = (base * k // 2 for k in ASPECTS[name])
        n = num_objects or int(rng.integers(1, MAX_OBJECTS + 1))
        pairs = rng.choice(len(colours) * len(SHAPES), size=n, replace=False)
        sizes = ["large" if large else "small" for large in rng.random(n) < 0.5]
        sides = [int(rng.integers(round(SIZES[s][0] * scale * base / BASE), round(SIZES[s][1] * scale * base / BASE) + 1))
                 for s in sizes]
        word = WORDS[int(rng.integers(len(WORDS)))] if rng.random() < word_prob else None
        # Place the biggest boxes first (the word's is widest): small ones fit into what is left.
        items: list[tuple[int, int, Optional[int]]] = [(side, side, k) for k, side in enumerate(sides)]
        if word is not None:
            mask = _word_mask(word)
            items.append((mask.width, mask.height, None))
        items.sort(key=lambda it: -(it[0] * it[1]))
        placed: list[Box] = []
        boxes: dict[Optional[int], Box] = {}
        for w, h, k in items:
            xs = rng.integers(_MARGIN, width - w - _MARGIN + 1, _PLACE_TRIES)
            ys = rng.integers(_MARGIN, height - h - _MARGIN + 1, _PLACE_TRIES)
            first = _first_free(xs, ys, w, h, placed)
            if first < 0:
                break
            x, y = int(xs[first]), int(ys[first])
            placed.append((x, y, x + w, y + h))
            boxes[k] = placed[-1]
        if len(boxes) < len(items):
            continue  # no room: draw the whole layout again
        objects = []
        for k, pair in enumerate(pairs):
            colour, shape = colours[int(pair) // len(SHAPES)], SHAPES[int(pair) % len(SHAPES)]
            jitter = rng.integers(-_JITTER, _JITTER + 1, 3).tolist()
            rgb = tuple(min(255, max(0, v + d)) for v, d in zip(COLOURS[colour], jitter))
            objects.append(SceneObject(colour, shape, sizes[k], boxes[k], position_of(boxes[k], width, height), rgb))
        objects.sort(key=lambda o: (POSITIONS.index(o.position), o.box[1], o.box[0]))
        background = int(rng.integers(96, 161))
        noise_seed = int(rng.integers(1 << 31)) if rng.random() < 0.5 else None
        return Scene(width, height, name, background, noise_seed, tuple(objects), word, boxes.get(None))
    raise RuntimeError(f"could not place {n} shapes in a {width}x{height} scene in {_LAYOUT_TRIES} layouts")


# ---------------------------------------------------------------------------------------------------- drawing
def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x1, y1, x2, y2 = obj.box
    r, b = x2 - 1, y2 - 1  # PIL's shape boxes include their last pixel
    if obj.shape == "circle":
        draw.ellipse((x1, y1, r, b), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, r, b), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x1, b), (r, b), ((x1 + r) / 2, y1)], fill=obj.rgb)
    elif obj.shape == "cross":
        # A plus sign with arms a third of the side thick, centred.
        side = x2 - x1
        t = max(2, round(side / 3))
        lo = x1 + (side - t) // 2
        draw.rectangle((lo, y1, lo + t - 1, b), fill=obj.rgb)
        lo = y1 + (side - t) // 2
        draw.rectangle((x1, lo, r, lo + t - 1), fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {', '.join(SHAPES)}")


@lru_cache(maxsize=1)
def _noise_bank(side: int) -> np.ndarray:
    """``side`` x ``side`` Gaussian background noise (std ``_NOISE_STD``, int16) that scenes cut windows from:
    drawing fresh normals for every image took most of the time of writing the demo data on a small CPU."""
    rng = np.random.default_rng(20240611)
    return np.rint(_NOISE_STD * rng.standard_normal((side, side, 3))).astype(np.int16)


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of ``scene`` (a pure function of it: background, optional noise, shapes, then the word)."""
    if scene.noise_seed is None:
        pixels = np.full((scene.height, scene.width, 3), scene.background, dtype=np.uint8)
    else:
        bank = _noise_bank(max(6 * BASE, 2 * max(scene.width, scene.height)))
        oy = scene.noise_seed % (bank.shape[0] - scene.height + 1)
        ox = (scene.noise_seed // bank.shape[0]) % (bank.shape[1] - scene.width + 1)
        window = bank[oy:oy + scene.height, ox:ox + scene.width]
        pixels = np.clip(window + np.int16(scene.background), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    if scene.word is not None:
        image.paste(scene.word_rgb, scene.word_box, _word_mask(scene.word))
    return image


# ---------------------------------------------------------------------------------------------------- digits
DIGITS_HELD_OUT_START = 1500
"""Digits ``load_digits()[i]`` with ``i >= 1500`` (297 of 1,797) are the held-out evaluation digits."""

_INKS = ((20, 20, 20), (25, 40, 140), (130, 20, 25), (20, 95, 40))  # pen colours: black, blue, red, green


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float in 0..1, labels (1797,) int)`` of scikit-learn's bundled digits (no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digit_indices(split: str) -> np.ndarray:
    """Indices of ``train`` (0..1499) or ``held_out`` (1500..1796) digits."""
    total = len(_digits()[1])
    if split == "train":
        return np.arange(DIGITS_HELD_OUT_START)
    if split == "held_out":
        return np.arange(DIGITS_HELD_OUT_START, total)
    raise ValueError(f"unknown digit split {split!r}; expected 'train' or 'held_out'")


def digit_label(index: int) -> int:
    """The digit (0..9) drawn in ``load_digits()`` image ``index``."""
    return int(_digits()[1][index])


def render_digit(index: int, rng: np.random.Generator, *, size: int = BASE) -> Image.Image:
    """Digit ``index`` as a ``size`` x ``size`` RGB image: the 8x8 scan enlarged (bicubic) to 87-100% of the
    canvas at a random offset, in a random pen colour on off-white paper.

    The digit fills most of the tile, as a scanned digit would: one 14-px patch then sees about one pixel of the
    scan wherever the digit sits. (At 62-100% the tiny demo model needed several times the training steps to
    reach the same held-out accuracy: it has to learn every digit at every scale and offset from 1,500 scans.)"""
    glyph = Image.fromarray(np.rint(_digits()[0][index] * 255).astype(np.uint8), "L")
    side = int(rng.integers(size * 7 // 8, size + 1))
    ink = _INKS[int(rng.integers(len(_INKS)))]
    paper = tuple(250 - v for v in rng.integers(0, 20, 3).tolist())
    x, y = rng.integers(0, size - side + 1, 2).tolist()
    canvas = Image.new("RGB", (size, size), paper)
    # The enlarged scan is the ink's coverage: paste blends paper + (ink - paper) * coverage / 255.
    canvas.paste(ink, (x, y, x + side, y + side), glyph.resize((side, side), Image.Resampling.BICUBIC))
    return canvas
