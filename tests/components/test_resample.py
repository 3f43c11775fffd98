"""components/resample.py against Pillow itself: every byte, every pass order, every edge."""

import numpy as np
import pytest
from PIL import Image

from components.anyres import AnyResConfig, normalize_tiles, tile_image, tile_image_uint8
from components.resample import (
    bicubic_coefficients,
    emit_tiles,
    resize_into_tiles,
    resize_rgbx,
    rgb_to_rgbx,
    rgbx_pixels,
    vertical_first,
)
from tests.conftest import random_image


def pil_resize(image: Image.Image, height: int, width: int) -> np.ndarray:
    return np.asarray(image.resize((width, height), Image.BICUBIC))


def noise(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_random_sizes_equal_pillow_byte_for_byte():
    """Noise is the hardest input: every weight and every rounding shows."""
    rng = np.random.default_rng(0)
    orders = {True: 0, False: 0}
    for _ in range(600):
        in_h, in_w = (int(v) for v in rng.integers(1, 90, 2))
        out_h, out_w = (int(v) for v in rng.integers(1, 130, 2))
        image = noise(rng, in_h, in_w)
        ours = resize_rgbx(rgbx_pixels(image), (out_h, out_w))
        assert ours.shape == (out_h, out_w, 4)
        assert np.array_equal(ours[..., :3], pil_resize(image, out_h, out_w)), (in_h, in_w, out_h, out_w)
        if out_h != in_h and out_w != in_w:
            orders[vertical_first((in_h, in_w), (out_h, out_w))] += 1
    assert min(orders.values()) > 50  # both pass orders were exercised


@pytest.mark.parametrize(
    "in_size,out_size",
    [
        ((1, 2000), (384, 384)),
        ((2000, 1), (384, 384)),
        ((1, 1), (384, 384)),
        ((2200, 1700), (2304, 1781)),  # AnyRes upscale, horizontal pass first
        ((2200, 1700), (384, 384)),  # base tile, strong downscale
        ((1700, 2200), (1536, 1987)),
        ((2304, 100), (384, 17)),  # height shrinks far more: vertical pass first
        ((17, 33), (17, 900)),  # one side only
        ((900, 33), (5, 33)),
    ],
)
def test_extreme_and_large_sizes_equal_pillow(in_size, out_size):
    image = random_image(np.random.default_rng(sum(in_size)), *in_size)
    ours = resize_rgbx(rgbx_pixels(image), out_size)
    assert np.array_equal(ours[..., :3], pil_resize(image, *out_size))


def test_pass_order_is_pillows():
    """Where the two orders give different bytes, Pillow's result is the order vertical_first names."""
    rng = np.random.default_rng(1)
    decided = 0
    for _ in range(400):
        in_h, in_w = (int(v) for v in rng.integers(2, 60, 2))
        out_h, out_w = (int(v) for v in rng.integers(1, 80, 2))
        if out_h == in_h or out_w == in_w:
            continue
        image = noise(rng, in_h, in_w)
        ref = pil_resize(image, out_h, out_w)
        h_then_v = pil_resize(Image.fromarray(pil_resize(image, in_h, out_w)), out_h, out_w)
        v_then_h = pil_resize(Image.fromarray(pil_resize(image, out_h, in_w)), out_h, out_w)
        if np.array_equal(h_then_v, v_then_h):
            continue
        decided += 1
        expected = v_then_h if vertical_first((in_h, in_w), (out_h, out_w)) else h_then_v
        assert np.array_equal(ref, expected), (in_h, in_w, out_h, out_w)
    assert decided > 100


def test_coefficients_are_pillows_fixed_point():
    bounds, weights = bicubic_coefficients(640, 384)
    assert bounds.shape == (384, 2) and weights.dtype == np.int32
    sums = weights.sum(axis=1)
    assert np.all(np.abs(sums - (1 << 22)) <= bounds[:, 1])  # each row is 1.0 within its roundings
    assert bounds[0, 0] == 0 and bounds[-1, 0] + bounds[-1, 1] == 640
    up_bounds, _ = bicubic_coefficients(100, 300)
    assert up_bounds[:, 1].max() <= 5 and np.median(up_bounds[:, 1]) == 4  # upscaling: the 4-tap kernel


def test_large_image_is_copied_and_small_one_is_a_view():
    small = random_image(np.random.default_rng(2), 300, 400)
    view = rgbx_pixels(small)
    assert view.shape == (300, 400, 4) and not view.flags.writeable and not view.flags.owndata
    assert np.array_equal(view[..., :3], np.asarray(small))
    large = random_image(np.random.default_rng(3), 3000, 4000)  # over Pillow's 16 MiB block: two blocks
    pixels = rgbx_pixels(large)
    assert pixels.shape == (3000, 4000, 4) and np.array_equal(pixels[..., :3], np.asarray(large))


def test_emit_pads_cuts_and_normalizes():
    config = AnyResConfig(tile_size=8, patch_size=4)
    rng = np.random.default_rng(4)
    pixels = rgb_to_rgbx(rng.integers(0, 256, (10, 13, 3), dtype=np.uint8))
    tiles = np.empty((2 * 2, 3, 8, 8), np.uint8)
    emit_tiles(pixels, tiles, 2, (3, 1))
    canvas = tiles.reshape(2, 2, 3, 8, 8).transpose(0, 3, 1, 4, 2).reshape(16, 16, 3)
    expected = np.zeros((16, 16, 3), np.uint8)
    expected[3:13, 1:14] = pixels[..., :3]
    assert np.array_equal(canvas, expected)
    floats = np.empty(tiles.shape, np.float32)
    scale = (1 / 255 / np.asarray(config.std)).astype(np.float32)
    shift = (np.asarray(config.mean) / np.asarray(config.std)).astype(np.float32)
    emit_tiles(pixels, floats, 2, (3, 1), scale, shift)
    assert np.array_equal(floats, normalize_tiles(tiles, config))  # bit for bit, padding included


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_fused_resize_into_tiles_equals_resize_then_emit(dtype):
    """The vertical pass writing tiles directly gives the bytes of resize + emit, for every pass order."""
    rng = np.random.default_rng(6)
    scale, shift = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
    cases = [((40, 30), (48, 36)), ((40, 30), (17, 33)), ((40, 30), (40, 19)), ((40, 30), (11, 30)),
             ((40, 30), (40, 30)), ((90, 12), (20, 13)), ((7, 50), (23, 45))]  # fmt: skip # (size, expected)
    for in_size, out_size in cases:
        pixels = rgb_to_rgbx(rng.integers(0, 256, (*in_size, 3), dtype=np.uint8))
        side, cols = 16, 4
        rows = -(-(out_size[0] + 5) // side)
        offset = (3, 2) if out_size[1] + 2 <= side * cols else (3, 0)
        expected = np.empty((rows * cols, 3, side, side), dtype)
        fused = np.empty_like(expected)
        emit_tiles(resize_rgbx(pixels, out_size), expected, cols, offset, scale, shift)
        resize_into_tiles(pixels, out_size, fused, cols, offset, scale, shift)
        assert np.array_equal(fused, expected), (in_size, out_size)


def test_float_tiles_equal_normalized_uint8_tiles_bit_for_bit():
    """Preprocessing stores uint8 tiles and normalizes at collate: the same floats tile_image gives."""
    config = AnyResConfig(tile_size=56)
    image = random_image(np.random.default_rng(5), 90, 200)
    tiles, _, _ = tile_image_uint8(image, config)
    assert np.array_equal(tile_image(image, config).pixel_values, normalize_tiles(tiles, config))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"pixels: expected uint8 \[H, W, 4\] RGBX, found uint8 \(4, 4, 3\)"):
        resize_rgbx(np.zeros((4, 4, 3), np.uint8), (2, 2))
    with pytest.raises(ValueError, match="size: expected positive sizes"):
        resize_rgbx(np.zeros((4, 4, 4), np.uint8), (0, 2))
    with pytest.raises(ValueError, match="image: expected mode RGB, found L"):
        rgbx_pixels(Image.new("L", (3, 3)))
