"""AnyRes against transformers' own processor: tiles and token counts, on many shapes and modes."""

import dataclasses
import math

import numpy as np
import pytest
from transformers import LlavaOnevisionImageProcessorPil

from components.anyres import (
    AnyResConfig,
    ImageTooSmallError,
    base_tile,
    grid_pinpoints,
    num_image_tokens,
    num_multi_image_tokens,
    num_video_tokens,
    select_best_resolution,
    tile_image,
    video_tiles,
)
from tests.conftest import random_image

SHAPES = [
    (1, 1), (10, 10), (1, 2000), (2000, 1), (3000, 4000), (4000, 3000), (384, 384), (383, 385), (768, 384),
    (480, 640), (640, 480), (720, 1280), (1080, 1920), (224, 224), (336, 336), (500, 375), (100, 1000),
    (1000, 100), (2304, 2304), (2305, 10), (50, 70), (800, 1200), (1200, 800), (385, 1153), (1536, 999),
    (37, 1500), (999, 37), (3, 5), (1152, 2304), (600, 600), (2400, 500),
]  # fmt: skip # a table of image sizes
MODES = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]


def hf_processor(config: AnyResConfig) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in grid_pinpoints(config)],
        size={"height": config.tile_size, "width": config.tile_size},
        image_mean=list(config.mean),
        image_std=list(config.std),
    )


def hf_token_count(config: AnyResConfig, image_size) -> int:
    """What LlavaOnevisionProcessor expands one image placeholder to."""
    from transformers import LlavaOnevisionProcessor

    class _Tok:
        image_token_id = 1
        video_token_id = 2

    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.image_processor = hf_processor(config)
    proc.num_image_tokens = config.tokens_per_side**2
    proc.vision_aspect_ratio = f"anyres_max_{config.max_tiles}"
    return proc._get_number_of_features(image_size[0], image_size[1], config.tile_size, config.tile_size)


@pytest.mark.parametrize("shape", SHAPES)
def test_tiles_equal_transformers(shape):
    config = AnyResConfig()
    mode = MODES[SHAPES.index(shape) % len(MODES)]
    image = random_image(np.random.default_rng(sum(shape)), *shape, mode=mode)
    ref = hf_processor(config)(image, return_tensors="np")
    ours = tile_image(image, config)
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref["pixel_values"][0].shape
    assert np.abs(ours.pixel_values - ref["pixel_values"][0]).max() <= 1e-5
    assert tuple(ref["image_sizes"][0]) == ours.image_size == shape
    rows, cols = ours.grid
    assert len(ours.pixel_values) == 1 + rows * cols


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_at_a_small_tile(mode):
    config = AnyResConfig(tile_size=56)
    image = random_image(np.random.default_rng(1), 90, 200, mode=mode)
    ref = hf_processor(config)(image, return_tensors="np")["pixel_values"][0]
    assert np.abs(tile_image(image, config).pixel_values - ref).max() <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_token_counts_equal_transformers(shape):
    for config in (AnyResConfig(), AnyResConfig(tile_size=56)):
        assert num_image_tokens(shape, config) == hf_token_count(config, shape)


def test_select_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    candidates = grid_pinpoints(AnyResConfig())
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = (int(rng.integers(1, 5000)), int(rng.integers(1, 5000)))
        assert select_best_resolution(size, candidates) == tuple(
            hf_select(size, [list(c) for c in candidates])
        )


def test_grid_pinpoints_cover_1x1_to_6x6():
    points = grid_pinpoints(AnyResConfig())
    assert len(points) == 36 and points[0] == (384, 384) and points[-1] == (2304, 2304)
    assert (384, 768) in points and (768, 384) in points  # (height, width): both orders are there


def test_multi_image_base_tile_equals_transformers():
    config = AnyResConfig()
    rng = np.random.default_rng(3)
    images = [random_image(rng, 300, 500), random_image(rng, 640, 200, "RGBA")]
    ref = hf_processor(config)([images], return_tensors="np")["pixel_values"]
    for i, image in enumerate(images):
        assert np.abs(base_tile(image, config) - ref[i][0]).max() <= 1e-5


def test_resize_mode_squashes_without_padding():
    config = AnyResConfig(tile_size=56, multi_image_mode="resize")
    from PIL import Image

    image = Image.new("RGB", (200, 50), (255, 0, 0))
    tile = base_tile(image, config)
    assert np.allclose(tile[:, 0, :], tile[:, 28, :])  # no mean-coloured bands at the top


def test_token_counts_of_multi_image_and_video():
    config = AnyResConfig()
    assert num_multi_image_tokens(config) == 729 + 1
    assert num_video_tokens(32, config) == 32 * 196 + 1
    assert num_video_tokens(8, AnyResConfig(tile_size=56)) == 8 * 4 + 1
    frames = np.zeros((3, 48, 64, 3), dtype=np.uint8)
    assert video_tiles(frames, AnyResConfig(tile_size=56)).shape == (3, 3, 56, 56)


def test_over_nine_tiles_are_reduced():
    config = AnyResConfig()
    big = num_image_tokens((2304, 2304), config)
    base = 729
    assert big - base < 729 * 9 * 1.25 + 200  # bilinear-reduced to about 9 tiles' worth
    assert num_image_tokens((384, 384), config) == base + 27 * 27 + 27


def test_bad_configs_and_images_are_rejected():
    with pytest.raises(ValueError, match="tile_size"):
        AnyResConfig(tile_size=0)
    with pytest.raises(ValueError, match="max_tiles"):
        AnyResConfig(max_tiles="9")  # no magic strings: a typed int
    with pytest.raises(ValueError, match="multi_image_mode"):
        AnyResConfig(multi_image_mode="crop")
    with pytest.raises(ImageTooSmallError):
        num_image_tokens((0, 10), AnyResConfig())
    with pytest.raises(ValueError, match="frames"):
        video_tiles(np.zeros((2, 8, 8), dtype=np.uint8), AnyResConfig())


def test_tokens_per_side_floors_like_siglip():
    assert AnyResConfig().tokens_per_side == 27 == math.floor(384 / 14)


def _jpeg(height: int, width: int, seed: int = 0):
    """A photo-like JPEG (smooth content), opened but not decoded."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buffer, "JPEG", quality=90)
    return lambda: Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize(
    "height, width, tile_size", [(3000, 4000, 56), (1600, 1200, 56), (2200, 700, 56), (5000, 3000, 384)]
)
def test_jpeg_draft_keeps_grid_and_tokens_and_stays_close(height, width, tile_size):
    """Opt-in draft decoding: a JPEG much larger than its grid is decoded at a reduced scale, yet the grid,
    tile count and token count are those of its full size, and the tiles stay close to the exact ones."""
    exact_config = AnyResConfig(tile_size=tile_size)
    draft_config = AnyResConfig(tile_size=tile_size, jpeg_draft=True)
    opened = _jpeg(height, width)
    exact = tile_image(opened(), exact_config)
    image = opened()
    drafted = tile_image(image, draft_config)
    assert image.height < height and image.width < width, "decoded at a reduced scale"
    assert drafted.image_size == exact.image_size == (height, width) and drafted.grid == exact.grid
    assert drafted.pixel_values.shape == exact.pixel_values.shape
    assert num_image_tokens(drafted.image_size, draft_config) == num_image_tokens(
        (height, width), exact_config
    )
    deviation = np.abs(drafted.pixel_values - exact.pixel_values)
    assert 0 < float(deviation.mean()) < 0.05  # normalized units (one uint8 step is about 0.015)
    # multi-image items: only the base tile, so even a photo twice the tile is reduced
    for config in (
        AnyResConfig(tile_size=tile_size),
        AnyResConfig(tile_size=tile_size, multi_image_mode="resize"),
    ):
        image = opened()
        reduced = base_tile(image, dataclasses.replace(config, jpeg_draft=True))
        assert image.width < width and float(np.abs(reduced - base_tile(opened(), config)).mean()) < 0.05


def test_jpeg_draft_leaves_other_images_identical():
    """Not a JPEG, an already decoded JPEG, or one too small to reduce: the exact output."""
    draft_config = AnyResConfig(jpeg_draft=True)
    png = random_image(np.random.default_rng(0), 900, 1200)
    assert np.array_equal(
        tile_image(png, draft_config).pixel_values, tile_image(png, AnyResConfig()).pixel_values
    )
    opened = _jpeg(1600, 1200)
    decoded = opened()
    decoded.load()
    exact = tile_image(opened(), AnyResConfig()).pixel_values
    assert np.array_equal(tile_image(decoded, draft_config).pixel_values, exact)
    small = _jpeg(300, 400)
    assert np.array_equal(
        tile_image(small(), draft_config).pixel_values, tile_image(small(), AnyResConfig()).pixel_values
    )
    with pytest.raises(ValueError, match="jpeg_draft: expected true or false, found 'yes'"):
        AnyResConfig(jpeg_draft="yes")


# ---- LLaVA-NeXT (LLaVA-1.5-HD) against transformers' LlavaNext classes ---------------------------

NEXT = AnyResConfig(tile_size=336, grids=((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)))
"""transformers' LlavaNext defaults: CLIP-336 and the NeXT grid pinpoints."""
HD = AnyResConfig(
    tile_size=224,
    grids=(
        (1, 1),
        (1, 2),
        (2, 1),
        (1, 3),
        (3, 1),
        (1, 4),
        (4, 1),
        (1, 5),
        (5, 1),
        (1, 6),
        (6, 1),
        (2, 2),
        (2, 3),
        (3, 2),
    ),
)
"""The LLaVA-1.5 paper's HD grids (A.1) at CLIP-224."""


def hf_next(config: AnyResConfig):
    from transformers import LlavaNextImageProcessorPil

    t = config.tile_size
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in grid_pinpoints(config)],
        size={"shortest_edge": t},
        crop_size={"height": t, "width": t},
        image_mean=list(config.mean),
        image_std=list(config.std),
    )


def hf_next_tokens(config: AnyResConfig, image_size) -> int:
    """What LlavaNextProcessor expands one image placeholder to (CLIP: the CLS dropped by "default")."""
    from transformers import LlavaNextProcessor

    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.image_processor = hf_next(config)
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    t = config.tile_size
    return proc._get_number_of_features(image_size[0], image_size[1], t, t) - 1


@pytest.mark.parametrize("shape", SHAPES)
def test_llava_next_tiles_and_tokens_equal_transformers(shape):
    from components.architectures import architecture

    arch = architecture("llava_next")
    mode = MODES[SHAPES.index(shape) % len(MODES)]
    image = random_image(np.random.default_rng(sum(shape) + 1), *shape, mode=mode)
    ref = hf_next(NEXT)(image, return_tensors="np")
    ours = arch.images([image], NEXT)
    assert ours.pixel_values.shape == ref["pixel_values"][0].shape
    assert np.abs(ours.pixel_values - ref["pixel_values"][0]).max() <= 1e-5
    assert tuple(ref["image_sizes"][0]) == ours.image_sizes[0] == shape
    assert ours.token_counts == [hf_next_tokens(NEXT, shape)]
    for config in (HD, dataclasses.replace(HD, tile_size=56), dataclasses.replace(NEXT, tile_size=56)):
        assert arch.images([image], config).token_counts == [hf_next_tokens(config, shape)]
