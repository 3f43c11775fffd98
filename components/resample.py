"""Pillow's BICUBIC resize, bit for bit, vectorized, and fused with tiling.

Tiles must equal transformers' ``LlavaOnevisionImageProcessorPil``, which resizes with Pillow, so
every output byte must be what Pillow computes. Pillow resizes in two separable passes of 8-bit
fixed-point arithmetic (22-bit coefficients, a rounding half, an arithmetic shift, a clip), one
pixel and one channel at a time. This module does the same integer arithmetic on the same
coefficients, but each pass runs over contiguous rows of RGBX lanes that LLVM (numba) turns into
SIMD code, with a 16-row transposed block for the horizontal pass. Same integers in, same order of
passes, same bytes out; tests/components/test_resample.py checks it against Pillow on thousands of
sizes.

What is Pillow's and must stay so (pinned by pyproject.toml, checked by the tests):
- the coefficients: ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` of libImaging/Resample.c,
  in double precision, then rounded half away from zero to 22 fractional bits;
- the pass order of Pillow 13 (python-pillow/Pillow#9549): when both sides change, the vertical
  pass goes first iff the height shrinks and ``(H - h) > 2 * (W - w)``; otherwise the horizontal
  pass goes first over the input rows the vertical pass will read;
- a side that keeps its size is not resampled at all.

Sizes are ``(height, width)``. Pixels are uint8 ``[H, W, 4]`` RGBX (Pillow's own layout of an RGB
image; ``rgbx_pixels`` reads it without a copy where Pillow allows).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from PIL import Image

PRECISION_BITS = 22  # Pillow: 32 - 8 bits of result - 2 bits of headroom
_HALF = 1 << (PRECISION_BITS - 1)
_ONE = float(1 << PRECISION_BITS)
_BLOCK = 16  # rows per transposed block of the horizontal pass: 16 RGBX pixels = 64 lanes

Size = tuple[int, int]  # (height, width)


@njit(cache=True)
def _bicubic(x: float) -> float:
    """Pillow's bicubic kernel (a = -0.5), with its exact order of operations."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@njit(cache=True)
def bicubic_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point bicubic weights for resampling in_size -> out_size along one axis.

    Returns ``bounds`` int32 [out, 2] (first input index, number of taps) and ``weights`` int32
    [out, ksize] (zero past each output's taps).
    """
    scale = in_size / out_size
    filterscale = scale if scale > 1.0 else 1.0
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.empty((out_size, 2), np.int32)
    weights = np.zeros((out_size, ksize), np.int32)
    raw = np.empty(ksize, np.float64)
    inv = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        total = 0.0
        xmin = int(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        for x in range(xmax):
            w = _bicubic((x + xmin - center + 0.5) * inv)
            raw[x] = w
            total += w
        for x in range(xmax):
            w = raw[x]
            if total != 0.0:
                w = w / total
            weights[xx, x] = int(-0.5 + w * _ONE) if w < 0 else int(0.5 + w * _ONE)
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, weights


@njit(cache=True, inline="always")
def _clip8(acc: int) -> int:
    v = acc >> PRECISION_BITS
    return 0 if v < 0 else (255 if v > 255 else v)


@njit(cache=True, inline="always")
def _sums(
    acc: np.ndarray, rows: np.ndarray, first: int, bounds: np.ndarray, weights: np.ndarray, o: int
) -> None:
    """acc = the fixed-point sums of output o (before the shift and clip): the half plus its taps
    rows[first + t] (uint8 lane vectors) times weights[o, t], four taps per pass over acc."""
    lanes = acc.shape[0]
    taps = bounds[o, 1]
    acc[:] = _HALF
    t = 0
    while t + 4 <= taps:
        k0, k1, k2, k3 = weights[o, t], weights[o, t + 1], weights[o, t + 2], weights[o, t + 3]
        s0, s1, s2, s3 = rows[first + t], rows[first + t + 1], rows[first + t + 2], rows[first + t + 3]
        for i in range(lanes):
            acc[i] = np.int32(
                acc[i]
                + np.int32(s0[i]) * k0
                + np.int32(s1[i]) * k1
                + np.int32(s2[i]) * k2
                + np.int32(s3[i]) * k3
            )
        t += 4
    while t < taps:
        k0 = weights[o, t]
        s0 = rows[first + t]
        for i in range(lanes):
            acc[i] = np.int32(acc[i] + np.int32(s0[i]) * k0)
        t += 1


@njit(cache=True, inline="always")
def _vertical_row(src: np.ndarray, bounds: np.ndarray, weights: np.ndarray, yo: int, acc: np.ndarray) -> None:
    """acc = the fixed-point sums of output row yo: its taps are whole input rows of uint8 lanes."""
    _sums(acc, src, bounds[yo, 0], bounds, weights, yo)


@njit(cache=True)
def _vertical(src: np.ndarray, bounds: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """out[yo] = clip(sum_t src[y0 + t] * w[yo, t]) over whole rows of lanes: uint8 [rows, L] each."""
    acc = np.empty(src.shape[1], np.int32)
    for yo in range(out.shape[0]):
        _vertical_row(src, bounds, weights, yo, acc)
        row = out[yo]
        for i in range(acc.shape[0]):
            row[i] = _clip8(acc[i])


@njit(cache=True)
def _horizontal(
    src32: np.ndarray, y0: int, bounds: np.ndarray, weights: np.ndarray, out32: np.ndarray
) -> None:
    """out32[r, xo] = resampled src32[y0 + r, :] for RGBX pixels viewed as uint32 [rows, W].

    Works on blocks of 16 rows transposed into [W, 64 lanes], so that each output pixel's taps read
    whole contiguous lane vectors; the block's results are transposed back as whole pixels.
    """
    width = src32.shape[1]
    out_rows, out_width = out32.shape
    block = np.empty((width, _BLOCK), np.uint32)
    lanes_in = block.view(np.uint8).reshape(width, _BLOCK * 4)
    result = np.empty((out_width, _BLOCK), np.uint32)
    lanes_out = result.view(np.uint8).reshape(out_width, _BLOCK * 4)
    acc = np.empty(_BLOCK * 4, np.int32)
    for r0 in range(0, out_rows, _BLOCK):
        rows = min(_BLOCK, out_rows - r0)
        for x in range(width):
            for r in range(rows):
                block[x, r] = src32[y0 + r0 + r, x]
        for xo in range(out_width):
            _sums(acc, lanes_in, bounds[xo, 0], bounds, weights, xo)
            row = lanes_out[xo]
            for i in range(_BLOCK * 4):
                row[i] = _clip8(acc[i])
        for r in range(rows):
            dst = out32[r0 + r]
            for xo in range(out_width):
                dst[xo] = result[xo, r]


def _as32(pixels: np.ndarray) -> np.ndarray:
    return pixels.view(np.uint32).reshape(pixels.shape[:2])


def _resize_horizontal(pixels: np.ndarray, width: int, y0: int = 0, y1: int | None = None) -> np.ndarray:
    y1 = pixels.shape[0] if y1 is None else y1
    bounds, weights = bicubic_coefficients(pixels.shape[1], width)
    out = np.empty((y1 - y0, width, 4), np.uint8)
    _horizontal(_as32(pixels), y0, bounds, weights, _as32(out))
    return out


def _resize_vertical(pixels: np.ndarray, bounds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    rows, width = bounds.shape[0], pixels.shape[1]
    out = np.empty((rows, width, 4), np.uint8)
    _vertical(pixels.reshape(pixels.shape[0], width * 4), bounds, weights, out.reshape(rows, width * 4))
    return out


def vertical_first(in_size: Size, out_size: Size) -> bool:
    """Pillow 13's choice of pass order when both sides change size."""
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    return in_h > out_h and (in_h - out_h) > 2 * (in_w - out_w)


def _checked(pixels: np.ndarray, size: Size) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[2] != 4 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels: expected uint8 [H, W, 4] RGBX, found {pixels.dtype} {tuple(pixels.shape)}")
    if min(*pixels.shape[:2], *size) < 1:
        raise ValueError(f"size: expected positive sizes, found {tuple(pixels.shape[:2])} -> {tuple(size)}")
    return np.ascontiguousarray(pixels)


def _before_vertical(pixels: np.ndarray, size: Size) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """When Pillow's last pass for this resize is the vertical one: (what it reads, uint8 rows [r, w, 4];
    its bounds; its weights), having run the horizontal pass first if there is one. None otherwise."""
    (in_h, in_w), (out_h, out_w) = pixels.shape[:2], size
    if out_h == in_h or (out_w != in_w and vertical_first((in_h, in_w), (out_h, out_w))):
        return None
    bounds, weights = bicubic_coefficients(in_h, out_h)
    if out_w == in_w:
        return pixels, bounds, weights
    y0, y1 = int(bounds[0, 0]), int(bounds[-1, 0] + bounds[-1, 1])  # the input rows the vertical pass reads
    shifted = bounds.copy()
    shifted[:, 0] -= y0
    return _resize_horizontal(pixels, out_w, y0, y1), shifted, weights


def resize_rgbx(pixels: np.ndarray, size: Size) -> np.ndarray:
    """uint8 [H, W, 4] RGBX -> [h, w, 4], equal to ``Image.resize((w, h), Image.BICUBIC)`` byte for byte."""
    pixels = _checked(pixels, size)
    (in_h, in_w), (out_h, out_w) = pixels.shape[:2], size
    if (out_h, out_w) == (in_h, in_w):
        return pixels.copy()
    staged = _before_vertical(pixels, size)
    if staged is not None:
        return _resize_vertical(*staged)
    if out_h == in_h:
        return _resize_horizontal(pixels, out_w)
    return _resize_horizontal(_resize_vertical(pixels, *bicubic_coefficients(in_h, out_h)), out_w)


def rgbx_pixels(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels as read-only uint8 [H, W, 4] RGBX.

    Pillow stores RGB as 4 bytes a pixel; through the Arrow C data interface that memory is a view,
    no copy, when the image sits in one block of Pillow's allocator (up to 16 MiB by default). A
    larger image is copied.
    """
    if image.mode != "RGB":
        raise ValueError(f"image: expected mode RGB, found {image.mode}")
    height, width = image.height, image.width
    try:
        import pyarrow as pa

        values = pa.array(image).values
        return values.to_numpy(zero_copy_only=True).reshape(height, width, 4)
    except (ValueError, TypeError, pa.ArrowException):  # rows in several blocks: one copy
        return np.frombuffer(image.tobytes("raw", "RGBX"), np.uint8).reshape(height, width, 4)


def rgb_to_rgbx(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> [..., 4] with a zero fourth lane."""
    out = np.zeros((*frames.shape[:-1], 4), np.uint8)
    out[..., :3] = frames
    return out


@njit(cache=True, inline="always")
def _emit_row(src32, tiles, cols, y_canvas, left, scale, shift):
    """Canvas row y_canvas of every tile column: RGBX pixels src32 (uint32 [w]; empty for a padding row)
    placed at column ``left``, each value as ``value * scale[c] - shift[c]``; the rest gets the value of 0."""
    side = tiles.shape[2]
    width = src32.shape[0]
    tr, ry = y_canvas // side, y_canvas % side
    s0, s1, s2 = scale[0], scale[1], scale[2]
    f0, f1, f2 = shift[0], shift[1], shift[2]
    for tc in range(cols):
        tile = tiles[tr * cols + tc]
        d0, d1, d2 = tile[0, ry], tile[1, ry], tile[2, ry]
        x_start = tc * side - left  # image column of this tile row's first pixel
        lo = min(side, max(0, -x_start))
        hi = max(lo, min(side, width - x_start))
        for rx in range(lo):
            d0[rx], d1[rx], d2[rx] = -f0, -f1, -f2
        segment = src32[x_start + lo : x_start + hi]  # indexed from range: stays vectorized
        for i in range(hi - lo):
            v = segment[i]
            d0[lo + i] = np.float32(v & 0xFF) * s0 - f0
            d1[lo + i] = np.float32((v >> 8) & 0xFF) * s1 - f1
            d2[lo + i] = np.float32((v >> 16) & 0xFF) * s2 - f2
        for rx in range(hi, side):
            d0[rx], d1[rx], d2[rx] = -f0, -f1, -f2


@njit(cache=True)
def _emit(pixels32, tiles, cols, top, left, scale, shift):
    """RGBX pixels (uint32 [h, w]) placed at (top, left) of a padded canvas, cut into planar tiles
    [rows*cols, 3, T, T] as ``value * scale[c] - shift[c]`` in float32 (the exact bytes for uint8 tiles
    with scale 1 and shift 0)."""
    height = pixels32.shape[0]
    empty = pixels32[0, :0]
    for y_canvas in range((tiles.shape[0] // cols) * tiles.shape[2]):
        y = y_canvas - top
        _emit_row(pixels32[y] if 0 <= y < height else empty, tiles, cols, y_canvas, left, scale, shift)


@njit(cache=True)
def _vertical_emit(src, bounds, weights, tiles, cols, top, left, scale, shift):
    """The vertical pass and ``_emit`` in one: each output row goes from the accumulator to the tiles
    while it is in L1, and the resized image never exists in memory."""
    acc = np.empty(src.shape[1], np.int32)
    row = np.empty(src.shape[1], np.uint8)
    row32 = row.view(np.uint32)
    height = bounds.shape[0]
    for y_canvas in range((tiles.shape[0] // cols) * tiles.shape[2]):
        y = y_canvas - top
        if 0 <= y < height:
            _vertical_row(src, bounds, weights, y, acc)
            for i in range(acc.shape[0]):
                row[i] = _clip8(acc[i])
            _emit_row(row32, tiles, cols, y_canvas, left, scale, shift)
        else:
            _emit_row(row32[:0], tiles, cols, y_canvas, left, scale, shift)


_IDENTITY = (np.ones(3, np.float32), np.zeros(3, np.float32))


def _conversion(tiles: np.ndarray, scale, shift) -> tuple[np.ndarray, np.ndarray]:
    if tiles.dtype == np.uint8:
        return _IDENTITY
    if tiles.dtype != np.float32 or scale is None or shift is None:
        raise ValueError(f"tiles: expected uint8, or float32 with scale and shift, found {tiles.dtype}")
    return scale, shift


def emit_tiles(
    pixels: np.ndarray, tiles: np.ndarray, cols: int, offset: Size, scale=None, shift=None
) -> None:
    """Cut RGBX pixels placed at ``offset`` (top, left) of a padded canvas into planar tiles, in place:
    uint8 tiles get the bytes; float32 tiles get ``value * scale[c] - shift[c]`` (float32 [3] each)."""
    resize_into_tiles(pixels, pixels.shape[:2], tiles, cols, offset, scale, shift)


def resize_into_tiles(
    pixels: np.ndarray,
    size: Size,
    tiles: np.ndarray,
    cols: int,
    offset: Size,
    scale: np.ndarray | None = None,
    shift: np.ndarray | None = None,
) -> None:
    """``emit_tiles(resize_rgbx(pixels, size), ...)``, the same bytes, without the resized image in memory
    when Pillow's last pass is the vertical one (the usual case for AnyRes): that pass writes the tiles.
    uint8 tiles get the bytes; float32 tiles get ``value * scale[c] - shift[c]`` (float32 [3] each)."""
    pixels = _checked(pixels, size)
    scale, shift = _conversion(tiles, scale, shift)
    staged = _before_vertical(pixels, size)
    if staged is None:
        resized = pixels if tuple(size) == pixels.shape[:2] else resize_rgbx(pixels, size)
        _emit(_as32(resized), tiles, cols, offset[0], offset[1], scale, shift)
        return
    rows, bounds, weights = staged
    _vertical_emit(
        rows.reshape(rows.shape[0], -1), bounds, weights, tiles, cols, offset[0], offset[1], scale, shift
    )


def warm_up() -> None:
    """Compile every kernel now (or load it from numba's on-disk cache), so that a worker's first image,
    video or multi-image item does not pay for it: both pass orders, one-sided resizes, uint8 and float32
    tiles."""
    pixels = np.zeros((6, 5, 4), np.uint8)
    for size in ((4, 9), (2, 4), (6, 3), (3, 5)):  # horizontal first, vertical first, one side each
        resize_rgbx(pixels, size)
    scale = np.ones(3, np.float32)
    for dtype in (np.uint8, np.float32):
        tiles = np.empty((1, 3, 8, 8), dtype)
        emit_tiles(pixels, tiles, 1, (1, 1), scale, scale)
        resize_into_tiles(pixels, (4, 9), tiles, 1, (1, 0), scale, scale)
