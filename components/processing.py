"""Media to model inputs, per sample kind: the one path that preprocessing and serving share.

OneVision: a single image is AnyRes-tiled; each image of a multi-image sample gets its base tile;
video frames are resized to the tile. LLaVA / LLaVA-1.5: every image gets one base tile.
The token count of each media is what the model will produce for it, so placeholders expand exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from components.anyres import (
    AnyResConfig,
    base_tile,
    num_image_tokens,
    num_multi_image_tokens,
    num_video_tokens,
    tile_image,
    video_tiles,
)


@dataclass
class MediaInputs:
    modality: str
    """text, image, multi_image or video."""
    pixel_values: np.ndarray | None = None
    """float32 [tiles, 3, T, T]: every image's tiles in order (base first per image), or video frames."""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(height, width) per image; per frame for video."""
    tiles_per_image: list[int] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    """Tokens per media, in placeholder order."""


def process_images(images: list[Image.Image], arch: str, anyres: AnyResConfig) -> MediaInputs:
    if not images:
        return MediaInputs(modality="text")
    modality = "image" if len(images) == 1 else "multi_image"
    sizes = [(im.height, im.width) for im in images]
    if arch == "llava_onevision" and len(images) == 1:
        tiled = tile_image(images[0], anyres)
        return MediaInputs(
            modality,
            tiled.pixel_values,
            [tiled.image_size],
            [len(tiled.pixel_values)],
            [num_image_tokens(sizes[0], anyres)],
        )
    pixels = np.stack([base_tile(im, anyres) for im in images])
    if arch == "llava_onevision":
        per_image = num_multi_image_tokens(anyres)
    else:  # LLaVA / 1.5: CLIP patches without the CLS token
        per_image = anyres.tokens_per_side**2
    return MediaInputs(modality, pixels, sizes, [1] * len(images), [per_image] * len(images))


def process_video(frames: np.ndarray, arch: str, anyres: AnyResConfig) -> MediaInputs:
    if arch != "llava_onevision":
        raise ValueError(
            f"video: expected arch 'llava_onevision' (LLaVA and LLaVA-1.5 take no video), found {arch!r}"
        )
    pixels = video_tiles(frames, anyres)
    size = (int(frames.shape[1]), int(frames.shape[2]))
    return MediaInputs(
        "video", pixels, [size] * len(frames), [len(frames)], [num_video_tokens(len(frames), anyres)]
    )
