"""AnyRes tiling (LLaVA-NeXT / OneVision) and the visual token counts that go with it.

Sizes are always ``(height, width)``, named so. The output equals transformers'
``LlavaOnevisionImageProcessorPil`` for the same config (see tests/components/test_anyres.py),
and the token counts equal what ``LlavaOnevisionProcessor`` expands, so checkpoints trained
here behave the same wherever they are served.

Speed: Pillow's pixels are read without a copy, the two resizes (to the grid resolution and to
the base tile) run components/resample.py's vectorized, byte-identical replica of Pillow's
bicubic, and the last step writes planar tiles straight from the resized pixels: the padding,
the cut into tiles and the rescale+normalize in one pass. ``AnyResConfig.jpeg_draft`` (opt-in,
not identical) lets libjpeg decode large JPEGs at a reduced scale before those resizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from components.errors import Mismatch
from components.resample import resize_into_tiles, rgb_to_rgbx, rgbx_pixels

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Size = tuple[int, int]  # (height, width)


class ImageTooSmallError(Mismatch):
    """An image with a zero side cannot be tiled."""


@dataclass(frozen=True)
class AnyResConfig:
    """How images become tiles. Every knob is a typed int; no knob is parsed out of a string."""

    tile_size: int = 384
    """Side of one square tile in pixels (the vision tower's input size)."""
    patch_size: int = 14
    """Side of one vision-transformer patch; tokens per tile side = tile_size // patch_size (384 // 14 =
    27)."""
    max_grid: int = 6
    """Grids go from 1x1 up to max_grid x max_grid tiles (OneVision: 6)."""
    max_tiles: int = 9
    """Features of the unpadded grid are bilinear-reduced to about this many tiles' worth (anyres_max_9)."""
    grids: tuple[tuple[int, int], ...] | None = None
    """The (rows, cols) grids to choose from; None: every grid from 1x1 to max_grid x max_grid (OneVision).
    LLaVA-NeXT: ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))."""
    base_only: bool = False
    """A lone image gets its base tile only, as each item of a multi-image sample does (OneVision's
    Stage-1: (tile/patch)^2 visual tokens, 729 at 384 px, plus the newline HF's model appends)."""
    multi_image_mode: str = "pad"
    """Multi-image items and video frames' base tile: "pad" (pad to a square with the mean colour, then
    resize; what transformers does for multi-image samples) or "resize" (squash to the tile)."""
    mean: tuple[float, float, float] = field(default=OPENAI_CLIP_MEAN)
    std: tuple[float, float, float] = field(default=OPENAI_CLIP_STD)
    jpeg_draft: bool = False
    """Opt-in: a JPEG not yet decoded is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT), the
    smallest that still covers every size it is resized to; the grid and token counts still come from
    its full size. Faster on large photos, but the tiles are no longer identical to transformers'
    (deviation measured in benchmarks/anyres.py and benchmarks/RESULTS.md)."""

    def __post_init__(self) -> None:
        for name in ("tile_size", "patch_size", "max_grid", "max_tiles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AnyResConfig.{name}: expected a positive int, found {value!r}")
        if self.tile_size < self.patch_size:
            raise ValueError(
                f"AnyResConfig.tile_size: expected >= patch_size={self.patch_size}, found {self.tile_size}"
            )
        if self.multi_image_mode not in ("pad", "resize"):
            raise ValueError(
                f"AnyResConfig.multi_image_mode: expected 'pad' or 'resize', found {self.multi_image_mode!r}"
            )
        if self.grids is not None:
            grids = tuple(tuple(g) for g in self.grids)
            if not grids or not all(
                len(g) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in g)
                for g in grids
            ):
                raise ValueError(
                    f"AnyResConfig.grids: expected (rows, cols) pairs of positive ints, found {self.grids!r}"
                )
            object.__setattr__(self, "grids", grids)
        if not isinstance(self.base_only, bool):
            raise ValueError(f"AnyResConfig.base_only: expected true or false, found {self.base_only!r}")
        if not isinstance(self.jpeg_draft, bool):
            raise ValueError(f"AnyResConfig.jpeg_draft: expected true or false, found {self.jpeg_draft!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(
                f"AnyResConfig.mean/std: expected 3 values each, found {self.mean!r} / {self.std!r}"
            )

    @property
    def tokens_per_side(self) -> int:
        return self.tile_size // self.patch_size


@dataclass
class TiledImage:
    pixel_values: np.ndarray
    """float32 [1 + rows*cols, 3, T, T]; the base tile first, then the grid row by row."""
    image_size: Size
    """The original (height, width)."""
    grid: Size
    """(rows, cols) of the grid."""


def grid_pinpoints(config: AnyResConfig) -> list[Size]:
    """Every candidate resolution (rows*T, cols*T): the configured grids, or rows, cols in 1..max_grid in
    transformers' order."""
    t = config.tile_size
    if config.grids is not None:
        return [(r * t, c * t) for r, c in config.grids]
    return [(r * t, c * t) for r in range(1, config.max_grid + 1) for c in range(1, config.max_grid + 1)]


def select_best_resolution(image_size: Size, candidates: list[Size]) -> Size:
    """The candidate keeping the most effective resolution; ties go to the least wasted area."""
    height, width = image_size
    best, best_effective, best_waste = None, -1, math.inf
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_h, cand_w), effective, waste
    assert best is not None, "no candidate resolutions"
    return best


def fit_size(image_size: Size, target: Size) -> Size:
    """The (height, width) that fits image_size inside target, keeping the aspect ratio (one side exact)."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what transformers does)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _scale_shift(config: AnyResConfig) -> tuple[np.ndarray, np.ndarray]:
    """float32 [3] (a, b) with x * a - b == (x / 255 - mean) / std to within 1e-6 for uint8 x."""
    std = np.asarray(config.std, dtype=np.float64)
    scale = (1 / 255 / std).astype(np.float32)
    shift = (np.asarray(config.mean, dtype=np.float64) / std).astype(np.float32)
    return scale, shift


def _check_size(image: Image.Image) -> Size:
    if image.width < 1 or image.height < 1:
        raise ImageTooSmallError(
            "image", "a non-empty image", f"size (height={image.height}, width={image.width})"
        )
    return image.height, image.width


def _draft(image: Image.Image, config: AnyResConfig, width: int, height: int) -> None:
    """With ``config.jpeg_draft``, a JPEG that is not decoded yet will be decoded at the largest reduction
    (1/2, 1/4, 1/8) that keeps it at least width x height. A no-op for other images and decoded ones."""
    if config.jpeg_draft and image.format == "JPEG" and len(getattr(image, "tile", None) or ()) == 1:
        image.draft(None, (max(1, width), max(1, height)))


def _to_tile(pixels: np.ndarray, tiles: np.ndarray, config: AnyResConfig) -> None:
    """RGBX pixels resized to T x T into tiles [1, 3, T, T]: uint8 bytes, or float32 normalized."""
    t = config.tile_size
    resize_into_tiles(pixels, (t, t), tiles, 1, (0, 0), *_scale_shift(config))


def _tiles(image: Image.Image, config: AnyResConfig, dtype: type) -> tuple[np.ndarray, Size, Size]:
    """AnyRes: pick the grid, resize keeping the aspect ratio, pad (centred, black), cut into tiles, and
    put the base image (resized to T x T) first; uint8 tiles hold the bytes, float32 ones are normalized."""
    image_size = _check_size(image)  # the full size, also under jpeg_draft: it sets the grid and tokens
    t = config.tile_size
    best_h, best_w = select_best_resolution(image_size, grid_pinpoints(config))
    new_h, new_w = fit_size(image_size, (best_h, best_w))
    _draft(image, config, max(new_w, t), max(new_h, t))
    pixels = rgbx_pixels(to_rgb(image))
    rows, cols = best_h // t, best_w // t
    tiles = np.empty((1 + rows * cols, 3, t, t), dtype)
    _to_tile(pixels, tiles[:1], config)
    offset = ((best_h - new_h) // 2, (best_w - new_w) // 2)
    resize_into_tiles(pixels, (new_h, new_w), tiles[1:], cols, offset, *_scale_shift(config))
    return tiles, image_size, (rows, cols)


def tile_image_uint8(image: Image.Image, config: AnyResConfig) -> tuple[np.ndarray, Size, Size]:
    """AnyRes before normalization: (uint8 [1 + rows*cols, 3, T, T] base first, image_size, (rows, cols))."""
    return _tiles(image, config, np.uint8)


def normalize_tiles(tiles: np.ndarray, config: AnyResConfig) -> np.ndarray:
    """uint8 [..., 3, T, T] -> float32, one fused rescale+normalize pass (the values tile_image gives)."""
    scale, shift = _scale_shift(config)
    out = np.multiply(tiles, scale[:, None, None], dtype=np.float32)
    np.subtract(out, shift[:, None, None], out=out)
    return out


def tile_image(image: Image.Image, config: AnyResConfig) -> TiledImage:
    """AnyRes tiles, normalized: float32 [1 + rows*cols, 3, T, T], base first."""
    tiles, image_size, grid = _tiles(image, config, np.float32)
    return TiledImage(pixel_values=tiles, image_size=image_size, grid=grid)


def _base_tile(image: Image.Image, config: AnyResConfig, dtype: type) -> np.ndarray:
    height, width = _check_size(image)
    t = config.tile_size
    if config.multi_image_mode == "pad":  # the longer side becomes the tile's
        side = max(height, width)
        _draft(image, config, math.ceil(width * t / side), math.ceil(height * t / side))
    else:
        _draft(image, config, t, t)
    rgb = to_rgb(image)
    if config.multi_image_mode == "pad" and rgb.width != rgb.height:
        side = max(rgb.width, rgb.height)
        fill = tuple(int(m * 255) for m in config.mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        rgb = square
    tile = np.empty((1, 3, t, t), dtype)
    _to_tile(rgbx_pixels(rgb), tile, config)
    return tile[0]


def base_tile_uint8(image: Image.Image, config: AnyResConfig) -> np.ndarray:
    """One uint8 [3, T, T] tile for a multi-image item: padded to a square (or squashed), then resized."""
    return _base_tile(image, config, np.uint8)


def base_tile(image: Image.Image, config: AnyResConfig) -> np.ndarray:
    """One float32 [3, T, T] tile for a multi-image item."""
    return _base_tile(image, config, np.float32)


def _video_tiles(frames: np.ndarray, config: AnyResConfig, dtype: type) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames: expected uint8 [F>=1, H, W, 3], found {frames.dtype} {tuple(frames.shape)}"
        )
    t = config.tile_size
    out = np.empty((frames.shape[0], 3, t, t), dtype)
    for i, frame in enumerate(frames):
        _to_tile(rgb_to_rgbx(frame), out[i : i + 1], config)
    return out


def video_tiles_uint8(frames: np.ndarray, config: AnyResConfig) -> np.ndarray:
    """Frames uint8 [F, H, W, 3] -> uint8 [F, 3, T, T], each resized to the tile (transformers' video
    processor)."""
    return _video_tiles(frames, config, np.uint8)


def video_tiles(frames: np.ndarray, config: AnyResConfig) -> np.ndarray:
    """Frames uint8 [F, H, W, 3] -> float32 [F, 3, T, T]."""
    return _video_tiles(frames, config, np.float32)


# ---- token counts ---------------------------------------------------------------------------


def _unpadded_features(image_size: Size, grid: Size, config: AnyResConfig, reduce: bool) -> tuple[int, int]:
    """(features, newlines) of the unpadded grid, reduced to about max_tiles tiles' worth when larger
    (``reduce``: OneVision's anyres_max_N; LLaVA-NeXT keeps them all)."""
    height, width = image_size
    side = config.tokens_per_side
    cur_h, cur_w = side * grid[0], side * grid[1]
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    ratio = math.sqrt(cur_h * cur_w / (config.max_tiles * side**2))
    if reduce and ratio > 1.1:
        return int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
    return cur_h * cur_w, cur_h


def num_image_tokens(image_size: Size, config: AnyResConfig, *, reduce: bool = True) -> int:
    """Tokens of one AnyRes image: base tile + unpadded grid features + one newline per feature row
    (``reduce``: the grid features bilinear-reduced to about max_tiles tiles' worth, as OneVision does)."""
    if image_size[0] < 1 or image_size[1] < 1:
        raise ImageTooSmallError("image_size", "positive (height, width)", str(image_size))
    best_h, best_w = select_best_resolution(image_size, grid_pinpoints(config))
    grid = (best_h // config.tile_size, best_w // config.tile_size)
    features, newlines = _unpadded_features(image_size, grid, config, reduce)
    return config.tokens_per_side**2 + features + newlines


def num_multi_image_tokens(config: AnyResConfig) -> int:
    """Tokens of one item of a multi-image sample: its base tile plus one newline."""
    return config.tokens_per_side**2 + 1


def num_video_tokens(num_frames: int, config: AnyResConfig) -> int:
    """Tokens of a video: each frame 2x2 bilinear-pooled (27x27 -> 14x14 = 196), plus one newline at the
    end."""
    if num_frames < 1:
        raise ValueError(f"num_frames: expected at least 1, found {num_frames}")
    pooled = math.ceil(config.tokens_per_side / 2)
    return num_frames * pooled * pooled + 1
