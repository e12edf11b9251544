"""Tests for mono.processing: tile grid rule, tiling, thumbnail, normalisation, image errors."""

import io
import random

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from mono.processing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    dynamic_tiles,
    load_image,
    load_images,
    open_image,
    tile_grid,
    tiles_to_tensor,
)


def _reference_grid(width, height, min_num, max_num, image_size):
    """Straightforward restatement of the release rule, written independently of mono.processing."""
    pairs = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    pairs.add((i, j))
    ordered = sorted(pairs, key=lambda p: p[0] * p[1])
    best, best_diff = None, None
    for cols, rows in ordered:
        diff = abs(width / height - cols / rows)
        if best is None or diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size**2 * cols * rows:
            best = (cols, rows)
    return best


# --- tile_grid ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, image_size, expected",
    [
        # 2:1 images: (2,1) and (4,2) tie exactly; the larger grid wins only above half its pixel area.
        ((2000, 1000), 448, (4, 2)),  # 2e6 px > 0.5 * 448^2 * 8 = 802816
        ((1000, 500), 448, (2, 1)),  # 5e5 px below the threshold
        ((18, 9), 6, (4, 2)),  # 162 > 0.5 * 36 * 8 = 144
        ((16, 8), 6, (2, 1)),  # 128 < 144
        ((18, 8), 6, (2, 1)),  # 144 == 144: strictly greater is required, so no switch
        ((1000, 2000), 448, (2, 4)),  # 1:2, the same rule for tall images
        ((500, 1000), 448, (1, 2)),
        ((3000, 1000), 448, (6, 2)),  # 3:1 ties (3,1) and (6,2): 3e6 px > 0.5 * 448^2 * 12
        ((1200, 400), 448, (3, 1)),  # 480000 px below that threshold
    ],
)
def test_tile_grid_exact_ties(size, image_size, expected):
    assert tile_grid(*size, min_num=1, max_num=12, image_size=image_size) == expected


@pytest.mark.parametrize(
    "side, expected",
    [(100, (1, 1)), (448, (1, 1)), (700, (2, 2)), (1000, (3, 3)), (2000, (3, 3))],
)
def test_tile_grid_square(side, expected):
    # (1,1), (2,2), (3,3) tie; (2,2) needs > 2 * 448^2 px (side > 633.6), (3,3) needs > 4.5 * 448^2 (> 950.4).
    assert tile_grid(side, side) == expected


@pytest.mark.parametrize(
    "size, expected",
    [((1, 50), (1, 12)), ((5000, 10), (12, 1)), ((10, 5000), (1, 12)), ((2000, 1), (12, 1))],
)
def test_tile_grid_extreme_aspect(size, expected):
    assert tile_grid(*size, max_num=12) == expected


def test_tile_grid_min_num_forces_more_tiles():
    assert tile_grid(448, 448, min_num=4, max_num=12) == (2, 2)
    assert tile_grid(10, 10, min_num=4, max_num=4) == (2, 2)
    assert tile_grid(1000, 10, min_num=5, max_num=6) in {(5, 1), (6, 1)}


def test_tile_grid_tie_order_follows_the_release_set_order():
    # Equal-product grids with equal aspect distance: the winner is whichever the release's set yields first.
    # A lexicographic sort would pick (2, 2) and (1, 5) here and change the token count of such images.
    assert tile_grid(5, 2, min_num=4, max_num=4) == (4, 1)  # |2.5 - 4| == |2.5 - 1|
    assert tile_grid(13, 5, min_num=5, max_num=5) == (5, 1)  # |2.6 - 5| == |2.6 - 0.2|


def test_tile_grid_max_one_is_always_single_tile():
    for size in [(1, 1), (5000, 10), (10, 5000), (4000, 4000)]:
        assert tile_grid(*size, min_num=1, max_num=1) == (1, 1)


def test_tile_grid_matches_brute_force_on_random_inputs():
    rng = random.Random(1234)
    for _ in range(200):
        min_num = rng.randint(1, 8)
        max_num = rng.randint(min_num, 24)
        image_size = rng.choice([14, 56, 224, 448])
        # Mix small sizes (more exact ties) with realistic photo sizes.
        hi = rng.choice([20, 300, 4000])
        width, height = rng.randint(1, hi), rng.randint(1, hi)
        if rng.random() < 0.3:  # exact multiples produce exact aspect-ratio ties
            height = max(1, width // rng.randint(1, 4))
        expected = _reference_grid(width, height, min_num, max_num, image_size)
        assert tile_grid(width, height, min_num, max_num, image_size) == expected, (
            width, height, min_num, max_num, image_size,
        )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(width=0, height=10), "width"),
        (dict(width=10, height=-1), "height"),
        (dict(width=10, height=10, image_size=0), "image_size"),
        (dict(width=10, height=10, min_num=0), "min_num"),
        (dict(width=10, height=10, min_num=5, max_num=4), "min_num"),
        (dict(width=10, height=10, max_num=2.5), "max_num"),
    ],
)
def test_tile_grid_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tile_grid(**kwargs)


# --- dynamic_tiles --------------------------------------------------------------------------------------


def _coloured_grid_image(cols, rows, cell):
    """An image of cols x rows flat-coloured cells, each colour unique, cell px wide."""
    arr = np.zeros((rows * cell, cols * cell, 3), dtype=np.uint8)
    colours = {}
    for r in range(rows):
        for c in range(cols):
            colour = (20 + 60 * c, 20 + 60 * r, 200 - 30 * (r * cols + c))
            arr[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = colour
            colours[(c, r)] = colour
    return Image.fromarray(arr), colours


def test_dynamic_tiles_are_row_major():
    # 3 cols x 2 rows of 56 px cells at image_size 56 -> grid (3, 2), no resampling needed.
    image, colours = _coloured_grid_image(3, 2, 56)
    assert tile_grid(image.width, image.height, 1, 12, 56) == (3, 2)
    tiles = dynamic_tiles(image, max_num=12, image_size=56, use_thumbnail=False)
    assert len(tiles) == 6
    order = [(c, r) for r in range(2) for c in range(3)]
    for tile, cell in zip(tiles, order):
        assert tile.size == (56, 56)
        centre = np.asarray(tile)[28, 28]
        assert tuple(int(v) for v in centre) == colours[cell]


@pytest.mark.parametrize("use_thumbnail", [True, False])
@pytest.mark.parametrize("size, grid", [((900, 450), (2, 1)), ((448, 448), (1, 1)), ((1400, 1400), (3, 3))])
def test_dynamic_tiles_count(size, grid, use_thumbnail):
    image = Image.new("RGB", size, (10, 20, 30))
    assert tile_grid(*size) == grid
    tiles = dynamic_tiles(image, use_thumbnail=use_thumbnail)
    num_grid = grid[0] * grid[1]
    assert len(tiles) == num_grid + (1 if use_thumbnail and num_grid > 1 else 0)
    assert all(t.size == (448, 448) for t in tiles)


def test_thumbnail_is_last_and_is_the_whole_image():
    image = Image.fromarray(skimage.data.chelsea())  # 451 x 300 -> (2, 1) at image_size 224
    tiles = dynamic_tiles(image, max_num=6, image_size=224, use_thumbnail=True)
    cols, rows = tile_grid(image.width, image.height, 1, 6, 224)
    assert len(tiles) == cols * rows + 1
    expected = np.asarray(image.resize((224, 224)))
    assert np.array_equal(np.asarray(tiles[-1]), expected)
    # The grid tiles are crops of the resized whole image.
    resized = np.asarray(image.resize((224 * cols, 224 * rows)))
    assert np.array_equal(np.asarray(tiles[0]), resized[:224, :224])


# --- tensors and load_image -------------------------------------------------------------------------------


def test_tiles_to_tensor_normalises_like_totensor_normalize():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = tiles_to_tensor([Image.fromarray(arr)], image_size=32)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    manual = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None])
    manual = manual / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out[0], manual, rtol=0, atol=1e-6)


def test_tiles_to_tensor_converts_mode_and_resizes_bicubic():
    gray = Image.fromarray(np.arange(40 * 30, dtype=np.uint32).reshape(30, 40).astype(np.uint8), mode="L")
    out = tiles_to_tensor([gray], image_size=16)
    expected = np.asarray(gray.convert("RGB").resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255
    got = out[0].permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_tiles_to_tensor_rejects_empty():
    with pytest.raises(ValueError, match="no tiles"):
        tiles_to_tensor([])


def test_load_image_on_real_photo(tmp_path):
    astronaut = skimage.data.astronaut()  # 512 x 512 RGB
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    pixel_values = load_image(path, image_size=448, max_num=12)
    # 512^2 px: (1,1) beats the (2,2) tie (needs > 2 * 448^2), so one tile and no thumbnail.
    assert pixel_values.shape == (1, 3, 448, 448)
    assert pixel_values.dtype == torch.float32
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for c in range(3):
        assert lo[c] - 1e-5 <= pixel_values[:, c].min() and pixel_values[:, c].max() <= hi[c] + 1e-5
    tile = np.asarray(Image.fromarray(astronaut).resize((448, 448)), dtype=np.float64) / 255
    manual_mean = (tile.mean(axis=(0, 1)) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(pixel_values[0].double().mean(dim=(1, 2)).numpy(), manual_mean, atol=1e-5)


def test_load_image_multi_tile_and_static():
    coffee = Image.fromarray(skimage.data.coffee())  # 600 x 400, aspect 1.5
    pixel_values = load_image(coffee, image_size=224, max_num=6)
    assert tile_grid(600, 400, 1, 6, 224) == (3, 2)
    assert pixel_values.shape == (3 * 2 + 1, 3, 224, 224)
    single = load_image(coffee, image_size=224, dynamic=False)
    assert single.shape == (1, 3, 224, 224)
    # The static tile is the whole image resized bicubic; the thumbnail uses PIL's default filter, which is
    # bicubic for RGB images, so the two agree.
    torch.testing.assert_close(single[0], pixel_values[-1])


def test_load_images_splits_the_tile_budget():
    coffee = Image.fromarray(skimage.data.coffee())
    pixel_values, num_patches = load_images([coffee, coffee, coffee], image_size=224, max_num=12)
    # Budget 12 // 3 = 4 tiles per image. Aspect 1.5 is equally far from 1 (grids (1,1), (2,2)) and 2 (grid
    # (2,1)); 240000 px exceeds half the area of both later grids, so the last of them, (2,2), wins.
    assert tile_grid(600, 400, 1, 4, 224) == (2, 2)
    assert num_patches == [5, 5, 5]
    assert pixel_values.shape == (15, 3, 224, 224)
    # min_num above the per-image budget is lowered to it instead of failing.
    _, num_patches = load_images([coffee] * 12, image_size=224, min_num=2, max_num=12)
    assert num_patches == [1] * 12


def test_load_images_rejects_empty_and_single():
    with pytest.raises(ValueError, match="empty"):
        load_images([])
    with pytest.raises(ValueError, match="load_image"):
        load_images(Image.new("RGB", (4, 4)))


# --- open_image ----------------------------------------------------------------------------------------


def _encoded(fmt):
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, format=fmt)
    return buf.getvalue()


def test_open_image_accepts_path_bytes_and_pil(tmp_path):
    data = _encoded("PNG")
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    from_path = open_image(str(path))
    from_bytes = open_image(data)
    rgba = Image.fromarray(skimage.data.chelsea()).convert("RGBA")
    from_pil = open_image(rgba)
    for im in (from_path, from_bytes, from_pil):
        assert im.mode == "RGB" and im.size == (451, 300)
    assert np.array_equal(np.asarray(from_path), skimage.data.chelsea())


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_open_image_truncated_file(tmp_path, fmt, suffix):
    data = _encoded(fmt)
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"truncated{suffix}"):
        open_image(path)


def test_open_image_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ImageError, match="notes.png"):
        open_image(path)
    with pytest.raises(ImageError, match="bytes"):
        open_image(b"garbage")


def test_open_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match="missing.jpg") as info:
        open_image(tmp_path / "missing.jpg")
    assert isinstance(info.value, ValueError)


def test_open_image_rejects_other_types():
    with pytest.raises(TypeError, match="ndarray"):
        open_image(np.zeros((4, 4, 3), dtype=np.uint8))
