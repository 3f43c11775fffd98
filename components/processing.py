"""Media to model inputs, per sample kind: the one path that preprocessing and serving share.

OneVision: a single image is AnyRes-tiled; each image of a multi-image sample gets its base tile;
video frames are resized to the tile. LLaVA / LLaVA-1.5: every image gets one base tile.
The token count of each media is what the model will produce for it, so placeholders expand exactly.
Pixels come out as uint8 tiles (``normalize=False``, what preprocessing stores) or normalized float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from components.anyres import (
    AnyResConfig,
    base_tile_uint8,
    normalize_tiles,
    num_image_tokens,
    num_multi_image_tokens,
    num_video_tokens,
    tile_image_uint8,
    video_tiles_uint8,
)


@dataclass
class MediaInputs:
    modality: str
    """text, image, multi_image or video."""
    pixel_values: np.ndarray | None = None
    """[tiles, 3, T, T]: every image's tiles in order (base first per image), or video frames."""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(height, width) per image; per frame for video."""
    token_counts: list[int] = field(default_factory=list)
    """Tokens per media, in placeholder order."""


def _finish(media: MediaInputs, anyres: AnyResConfig, normalize: bool) -> MediaInputs:
    if normalize and media.pixel_values is not None:
        media.pixel_values = normalize_tiles(media.pixel_values, anyres)
    return media


def process_images(
    images: list[Image.Image], arch: str, anyres: AnyResConfig, *, normalize: bool = True
) -> MediaInputs:
    if not images:
        return MediaInputs(modality="text")
    modality = "image" if len(images) == 1 else "multi_image"
    sizes = [(im.height, im.width) for im in images]
    if arch == "llava_onevision" and len(images) == 1:
        tiles, size, _ = tile_image_uint8(images[0], anyres)
        return _finish(
            MediaInputs(modality, tiles, [size], [num_image_tokens(size, anyres)]), anyres, normalize
        )
    pixels = np.stack([base_tile_uint8(im, anyres) for im in images])
    if arch == "llava_onevision":
        per_image = num_multi_image_tokens(anyres)
    else:  # LLaVA / 1.5: CLIP patches without the CLS token
        per_image = anyres.tokens_per_side**2
    return _finish(MediaInputs(modality, pixels, sizes, [per_image] * len(images)), anyres, normalize)


def process_video(
    frames: np.ndarray, arch: str, anyres: AnyResConfig, *, normalize: bool = True
) -> MediaInputs:
    if arch != "llava_onevision":
        raise ValueError(
            f"video: expected arch 'llava_onevision' (LLaVA and LLaVA-1.5 take no video), found {arch!r}"
        )
    pixels = video_tiles_uint8(frames, anyres)
    size = (int(frames.shape[1]), int(frames.shape[2]))
    media = MediaInputs("video", pixels, [size] * len(frames), [num_video_tokens(len(frames), anyres)])
    return _finish(media, anyres, normalize)
