"""Image preprocessing for Mono-InternVL: dynamic tiling, thumbnail, normalisation.

The tile grid decides how many `<IMG_CONTEXT>` tokens an image costs, so `tile_grid` reproduces the release's
rule bit for bit, including its tie-breaking and the iteration order of its candidate list (see SPEC §4).

Shapes: `pixel_values` is `(N, 3, S, S)` float32 with N = tiles (thumbnail included) and S = `image_size`.
"""

from __future__ import annotations

import io
import numbers
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageError",
    "ImageSource",
    "dynamic_tiles",
    "load_image",
    "load_images",
    "open_image",
    "tile_grid",
    "tiles_to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


class ImageError(ValueError):
    """An image could not be opened or decoded (missing, unreadable, truncated or not an image)."""


def _check_positive_int(name: str, value: object) -> int:
    # bool is an Integral too, but `True` as a tile count is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_tile_budget(min_num: object, max_num: object) -> tuple[int, int]:
    min_num = _check_positive_int("min_num", min_num)
    max_num = _check_positive_int("max_num", max_num)
    if min_num > max_num:
        raise ValueError(
            f"min_num ({min_num}) must not exceed max_num ({max_num}); lower min_num or raise max_num"
        )
    return min_num, max_num


@lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    # Built exactly like the release: a *set* of (cols, rows) tuples, then a stable sort by cols*rows.
    # Grids with the same product keep the set's iteration order, which is deterministic (small-int tuple
    # hashes are not randomised) and decides which grid wins an exact aspect-ratio tie. Do not "simplify"
    # this into a sorted list comprehension: that would change the order within equal products.
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def tile_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """Choose the tile grid `(cols, rows)` for an image of `width` x `height` pixels.

    Candidates are all grids with `min_num <= cols * rows <= max_num`, ordered by tile count. The grid whose
    aspect ratio `cols / rows` is closest to `width / height` wins; on an exact tie a later (larger) grid
    replaces the current one only if the image has more than half the pixels of that grid
    (`width * height > 0.5 * image_size**2 * cols * rows`), so small images are not blown up.

    Raises:
        ValueError: a size is not a positive integer, or `min_num > max_num`.
    """
    width = _check_positive_int("width", width)
    height = _check_positive_int("height", height)
    image_size = _check_positive_int("image_size", image_size)
    min_num, max_num = _check_tile_budget(min_num, max_num)

    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Cut `image` into `cols * rows` tiles of `image_size` x `image_size` pixels (grid from `tile_grid`).

    The whole image is resized to `(image_size * cols, image_size * rows)` with PIL's default filter (as the
    release does) and cut row-major: left to right, then top to bottom. When there is more than one tile and
    `use_thumbnail` is set, the whole image resized to `image_size` x `image_size` is appended last.
    """
    cols, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for r in range(rows):
        for c in range(cols):
            box = (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
            tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file '{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} bytes)"
    return f"image object {type(source).__name__}"


def open_image(source: ImageSource) -> Image.Image:
    """Open `source` (a path, encoded image bytes, or a PIL image) fully decoded as an RGB PIL image.

    The pixels are decoded here, so a truncated or corrupt file fails now rather than later inside a data
    loader. Alpha is dropped by `convert("RGB")` (as in the release); EXIF orientation is not applied.

    Raises:
        ImageError: the file is missing, unreadable, not an image, or truncated. The message names the file.
        TypeError: `source` is none of the accepted types.
    """
    if isinstance(source, Image.Image):
        try:
            # A lazily opened image may still hold undecoded (possibly truncated) data: decode it now.
            source.load()
            return source if source.mode == "RGB" else source.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot decode {_describe(source)}: {exc}") from exc
    if isinstance(source, (str, os.PathLike)):
        opener: object = Path(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        opener = io.BytesIO(bytes(source))
    else:
        raise TypeError(
            f"open_image expects a path, encoded image bytes or a PIL image, got {type(source).__name__}"
        )
    try:
        with Image.open(opener) as im:
            # convert() forces a full decode; the copy it returns outlives the closed file handle.
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise ImageError(f"{_describe(source)} does not exist; check the path") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{_describe(source)} is too large to decode safely: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for truncated data and
        # occasionally ValueError/SyntaxError from format plugins on malformed headers.
        raise ImageError(f"cannot read {_describe(source)}: {type(exc).__name__}: {exc}") from exc


def tiles_to_tensor(
    tiles: Sequence[Image.Image],
    image_size: int = 448,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Stack tiles into normalised `pixel_values` of shape `(N, 3, image_size, image_size)`, float32.

    Per tile: convert to RGB, resize bicubic to `image_size` (a no-op copy for tiles already that size), scale
    uint8 to [0, 1] and normalise with `(x - mean) / std` per channel, in the same float32 operations as
    torchvision's `ToTensor` + `Normalize`, so results match the release bit for bit.
    """
    image_size = _check_positive_int("image_size", image_size)
    if len(tiles) == 0:
        raise ValueError("tiles_to_tensor got no tiles; pass at least one image tile")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got mean={mean!r} std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std!r}")

    arrays = []
    for tile in tiles:
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        tile = tile.resize((image_size, image_size), Image.BICUBIC)
        arrays.append(np.asarray(tile, dtype=np.uint8))
    # (N, S, S, 3) uint8 -> (N, 3, S, S) float32 in [0, 1]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    pixels = pixels.to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub_(mean_t).div_(std_t)


def load_image(
    image: ImageSource,
    image_size: int = 448,
    min_num: int = 1,
    max_num: int = 12,
    use_thumbnail: bool = True,
    dynamic: bool = True,
) -> torch.Tensor:
    """Open one image and turn it into `pixel_values` of shape `(tiles, 3, image_size, image_size)`.

    With `dynamic=True` the image is tiled by `dynamic_tiles` (thumbnail last); with `dynamic=False` the
    whole image becomes a single bicubic-resized tile. Matches the release README's `load_image`.
    """
    min_num, max_num = _check_tile_budget(min_num, max_num)
    pil = open_image(image)
    if dynamic:
        tiles = dynamic_tiles(pil, min_num, max_num, image_size, use_thumbnail)
    else:
        tiles = [pil]
    return tiles_to_tensor(tiles, image_size)


def load_images(
    images: Sequence[ImageSource],
    image_size: int = 448,
    min_num: int = 1,
    max_num: int = 12,
    use_thumbnail: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """Load several images of one sample, splitting the tile budget between them.

    Each image may use at most `max(1, max_num // len(images))` tiles (thumbnail not counted), with `min_num`
    lowered to that budget if needed. Returns the concatenated `pixel_values` `(sum(tiles), 3, S, S)` and
    `num_patches_list`, the number of tiles of each image in order.
    """
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        raise ValueError("load_images expects a list of images; use load_image for a single image")
    if len(images) == 0:
        raise ValueError("load_images got an empty list of images; pass at least one image")
    min_num, max_num = _check_tile_budget(min_num, max_num)
    budget = max(1, max_num // len(images))
    per_image_min = min(min_num, budget)
    tensors = [
        load_image(img, image_size, per_image_min, budget, use_thumbnail, dynamic=True) for img in images
    ]
    return torch.cat(tensors, dim=0), [t.shape[0] for t in tensors]
