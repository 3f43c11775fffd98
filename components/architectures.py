"""One builder per LLaVA architecture: everything that differs between LLaVA, LLaVA-NeXT and OneVision.

    arch = architecture("llava_onevision")
    media = arch.images([image], anyres)          # pixels + token counts, as the HF model will see them
    config = arch.compose_config(vision_config, text_config, tokens, spec)

Reading order: ``MediaInputs`` (what media become), ``Architecture`` (the interface and what the three
share), then ``Llava`` (LLaVA and LLaVA-1.5: CLIP, one base tile per image, no video), ``LlavaNext``
(LLaVA-1.5-HD: CLIP with AnyRes over the NeXT grids, unpadding and a newline per row) and
``LlavaOnevision`` (SigLIP, AnyRes up to 6x6 reduced to about 9 tiles, base tiles for multi-image,
pooled video frames). Each maps to its transformers model, config and processor classes, and writes the
processor files transformers loads (``hf_processor_files``), so an export is a drop-in checkpoint.
No other module asks which architecture it has: it asks the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image

from components.anyres import (
    AnyResConfig,
    base_tile_uint8,
    grid_pinpoints,
    normalize_tiles,
    num_image_tokens,
    num_multi_image_tokens,
    num_video_tokens,
    select_best_resolution,
    tile_image_uint8,
    video_tiles_uint8,
)

PIL_BICUBIC = 3


@dataclass
class MediaInputs:
    """A sample's media as the model takes them."""

    modality: str
    """text, image, multi_image or video."""
    pixel_values: np.ndarray | None = None
    """[tiles, 3, T, T]: every image's tiles in order (base first per image), or video frames."""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(height, width) per image; per frame for video."""
    token_counts: list[int] = field(default_factory=list)
    """Tokens per media, in placeholder order: what each placeholder expands to."""
    tiles_per_image: list[int] = field(default_factory=list)
    """How many of ``pixel_values`` belong to each image."""


def _finish(media: MediaInputs, anyres: AnyResConfig, normalize: bool) -> MediaInputs:
    if normalize and media.pixel_values is not None:
        media.pixel_values = normalize_tiles(media.pixel_values, anyres)
    return media


class Architecture:
    """What one LLaVA variant does: media to tiles and token counts, batches, HF classes and files."""

    name: ClassVar[str]
    model_class: ClassVar[str]
    """The transformers class an export loads as (AutoModelForImageTextToText picks it from config.json)."""
    config_class: ClassVar[str]
    processor_class: ClassVar[str]
    image_processor_type: ClassVar[str]
    vision_config_class: ClassVar[str]
    """The tiny profile's vision tower: CLIP for LLaVA and LLaVA-NeXT, SigLIP for OneVision."""
    llm_config_class: ClassVar[str]
    """The tiny profile's LLM: Llama (Vicuna's) for LLaVA and LLaVA-NeXT, Qwen-2 for OneVision."""
    select_strategy: ClassVar[str]
    """HF's vision_feature_select_strategy: "default" drops CLIP's CLS token, "full" keeps every patch."""
    takes_video: ClassVar[bool] = False
    max_images: ClassVar[int] = 12

    # ---- media ----------------------------------------------------------------------------------

    def grid_pinpoints(self, anyres: AnyResConfig) -> list[tuple[int, int]]:
        return grid_pinpoints(anyres)

    def images(
        self, images: list[Image.Image], anyres: AnyResConfig, *, normalize: bool = True
    ) -> MediaInputs:
        """Pixels and token counts of a sample's images (none: a text sample)."""
        if not images:
            return MediaInputs(modality="text")
        modality = "image" if len(images) == 1 else "multi_image"
        sizes = [(im.height, im.width) for im in images]
        counts = self.image_token_counts(sizes, anyres)
        if len(images) == 1 and self.tiles_single_image(anyres):
            tiles, size, _ = tile_image_uint8(images[0], anyres)
            return _finish(MediaInputs(modality, tiles, [size], counts, [len(tiles)]), anyres, normalize)
        pixels = np.stack([base_tile_uint8(im, anyres) for im in images])
        return _finish(MediaInputs(modality, pixels, sizes, counts, [1] * len(images)), anyres, normalize)

    def image_token_counts(self, sizes: list[tuple[int, int]], anyres: AnyResConfig) -> list[int]:
        """Tokens of each image of a sample, from the images' (height, width) alone (no pixels needed)."""
        if len(sizes) == 1 and self.tiles_single_image(anyres):
            return [num_image_tokens(sizes[0], anyres, reduce=self.reduces_grid)]
        return [self.base_tile_tokens(anyres)] * len(sizes)

    def video_tokens(self, frames: int, anyres: AnyResConfig) -> int:
        raise ValueError(
            f"video: expected an architecture that takes video (llava_onevision), found {self.name!r}"
        )

    def video(self, frames: np.ndarray, anyres: AnyResConfig, *, normalize: bool = True) -> MediaInputs:
        raise ValueError(
            f"video: expected an architecture that takes video (llava_onevision), found {self.name!r}"
        )

    def tiles_single_image(self, anyres: AnyResConfig) -> bool:
        """Whether a lone image is AnyRes-tiled (else it gets one base tile, as each multi-image item
        does)."""
        return False

    reduces_grid: ClassVar[bool] = False
    """Whether the unpadded grid features are reduced to about ``max_tiles`` tiles' worth (anyres_max_N)."""

    def base_tile_tokens(self, anyres: AnyResConfig) -> int:
        """Tokens of one image that gets only its base tile."""
        return anyres.tokens_per_side**2

    # ---- batches --------------------------------------------------------------------------------

    def complete_batch(self, rows: list[dict], blank_image_row) -> list[dict]:
        """The rows of a batch, plus any the model needs to run them as they are (``blank_image_row()``: a
        row with one blank image, labelled -100, attending to itself)."""
        return rows

    def image_inputs(self, pixels: list[np.ndarray], rows: list[dict], anyres: AnyResConfig) -> dict:
        """The model's image inputs for the image rows of a batch (pixels: each row's normalized tiles)."""
        import torch  # the ingress tiles and tokenizes with this module, without torch

        return {"pixel_values": torch.as_tensor(np.concatenate(pixels))}

    # ---- HF classes and files -------------------------------------------------------------------

    def compose_config(self, vision_config, text_config, image_token_id: int, video_token_id: int, spec):
        """The HF config of a LLaVA model from its parts (``spec``: the ModelSpec)."""
        import transformers  # seconds to import: only where a model's config is composed

        cls = getattr(transformers, self.config_class)
        return cls(**self._config_kwargs(vision_config, text_config, image_token_id, video_token_id, spec))

    def _config_kwargs(self, vision_config, text_config, image_token_id, video_token_id, spec) -> dict:
        return {
            "vision_config": vision_config,
            "text_config": text_config,
            "image_token_index": image_token_id,
            "vision_feature_layer": spec.vision_feature_layer,
            "vision_feature_select_strategy": self.select_strategy,
        }

    def set_stage_config(self, config, anyres: AnyResConfig) -> None:
        """A stage's AnyRes grid, written into the model's config (only the AnyRes architectures have one)."""

    def image_processor_dict(self, anyres: AnyResConfig) -> dict:
        """preprocessor_config.json: what the HF image processor needs to give our tiles."""
        raise NotImplementedError

    def processor_dict(self, anyres: AnyResConfig, image_token: str, video_token: str) -> dict:
        """The HF processor's own arguments (processor_config.json, beside its sub-processors)."""
        raise NotImplementedError

    def video_processor_dict(self, anyres: AnyResConfig, video) -> dict | None:
        return None

    def hf_processor_files(self, anyres: AnyResConfig, video, image_token: str, video_token: str) -> dict:
        """{file name: JSON object} of the HF processor: processor_config.json (transformers 5's unified form,
        sub-processors nested) and the per-processor files older transformers and vLLM read."""
        image = self.image_processor_dict(anyres)
        files = {"preprocessor_config.json": image}
        unified = {**self.processor_dict(anyres, image_token, video_token), "image_processor": image}
        videos = self.video_processor_dict(anyres, video)
        if videos is not None:
            files["video_preprocessor_config.json"] = videos
            unified["video_processor"] = videos
        files["processor_config.json"] = unified
        return files

    def _common_image_processor(self, anyres: AnyResConfig) -> dict:
        return {
            "image_processor_type": self.image_processor_type,
            "processor_class": self.processor_class,
            "do_convert_rgb": True,
            "do_resize": True,
            "resample": PIL_BICUBIC,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(anyres.mean),
            "image_std": list(anyres.std),
        }


class Llava(Architecture):
    """LLaVA and LLaVA-1.5: every image is padded to a square with the mean colour and resized to one tile;
    CLIP's patches without its CLS token, (tile/patch)^2 tokens an image; no video."""

    name = "llava"
    model_class = "LlavaForConditionalGeneration"
    config_class = "LlavaConfig"
    processor_class = "LlavaProcessor"
    image_processor_type = "LlavaImageProcessor"
    vision_config_class = "CLIPVisionConfig"
    llm_config_class = "LlamaConfig"
    select_strategy = "default"

    def image_processor_dict(self, anyres: AnyResConfig) -> dict:
        t = anyres.tile_size
        return {
            **self._common_image_processor(anyres),
            "do_pad": anyres.multi_image_mode == "pad",
            "size": {"shortest_edge": t},
            "do_center_crop": True,
            "crop_size": {"height": t, "width": t},
        }

    def processor_dict(self, anyres: AnyResConfig, image_token: str, video_token: str) -> dict:
        return {
            "processor_class": self.processor_class,
            "patch_size": anyres.patch_size,
            "vision_feature_select_strategy": self.select_strategy,
            "num_additional_image_tokens": 1,  # CLIP's CLS, dropped by the "default" strategy
            "image_token": image_token,
        }


class LlavaNext(Architecture):
    """LLaVA-1.5-HD (LLaVA-NeXT): CLIP with AnyRes over the NeXT grids (1x2, 2x1, 2x2, 3x1, 1x3 tiles); the
    grid features are unpadded to the image's aspect ratio, never reduced, with a newline per row."""

    name = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
    config_class = "LlavaNextConfig"
    processor_class = "LlavaNextProcessor"
    image_processor_type = "LlavaNextImageProcessor"
    vision_config_class = "CLIPVisionConfig"
    llm_config_class = "LlamaConfig"
    select_strategy = "default"

    def tiles_single_image(self, anyres: AnyResConfig) -> bool:
        return True

    def images(
        self, images: list[Image.Image], anyres: AnyResConfig, *, normalize: bool = True
    ) -> MediaInputs:
        """Every image is AnyRes-tiled, a lone one or each of several (what LlavaNextProcessor does)."""
        if len(images) <= 1:
            return super().images(images, anyres, normalize=normalize)
        parts = [super(LlavaNext, self).images([im], anyres, normalize=False) for im in images]
        media = MediaInputs(
            "multi_image",
            np.concatenate([p.pixel_values for p in parts]),
            [p.image_sizes[0] for p in parts],
            [p.token_counts[0] for p in parts],
            [p.tiles_per_image[0] for p in parts],
        )
        return _finish(media, anyres, normalize)

    def image_inputs(self, pixels: list[np.ndarray], rows: list[dict], anyres: AnyResConfig) -> dict:
        """[images, most tiles, 3, T, T], zero-padded, with image_sizes (the HF model unpads by them)."""
        import torch  # the ingress tiles and tokenizes with this module, without torch

        per_image, sizes = [], []
        for tiles, row in zip(pixels, rows, strict=True):
            start = 0
            for size in row["image_sizes"]:
                n = 1 + _grid_tiles(tuple(size), self.grid_pinpoints(anyres), anyres.tile_size)
                per_image.append(tiles[start : start + n])
                start += n
                sizes.append(list(size))
            if start != len(tiles):
                raise ValueError(
                    f"collate: expected {start} tiles for image sizes {row['image_sizes']}, found "
                    f"{len(tiles)}"
                )
        most = max(len(t) for t in per_image)
        out = np.zeros((len(per_image), most, *per_image[0].shape[1:]), dtype=per_image[0].dtype)
        for i, tiles in enumerate(per_image):
            out[i, : len(tiles)] = tiles
        return {"pixel_values": torch.as_tensor(out), "image_sizes": torch.as_tensor(sizes, dtype=torch.long)}

    def _config_kwargs(self, vision_config, text_config, image_token_id, video_token_id, spec) -> dict:
        return {
            **super()._config_kwargs(vision_config, text_config, image_token_id, video_token_id, spec),
            "image_grid_pinpoints": [list(p) for p in self.grid_pinpoints(spec.anyres)],
        }

    def set_stage_config(self, config, anyres: AnyResConfig) -> None:
        config.image_grid_pinpoints = [list(p) for p in self.grid_pinpoints(anyres)]

    def image_processor_dict(self, anyres: AnyResConfig) -> dict:
        t = anyres.tile_size
        return {
            **self._common_image_processor(anyres),
            "do_pad": True,
            "size": {"shortest_edge": t},
            "do_center_crop": True,
            "crop_size": {"height": t, "width": t},
            "image_grid_pinpoints": [list(p) for p in self.grid_pinpoints(anyres)],
        }

    def processor_dict(self, anyres: AnyResConfig, image_token: str, video_token: str) -> dict:
        return {
            "processor_class": self.processor_class,
            "patch_size": anyres.patch_size,
            "vision_feature_select_strategy": self.select_strategy,
            "num_additional_image_tokens": 1,
            "image_token": image_token,
        }


def _grid_tiles(image_size: tuple[int, int], pinpoints: list[tuple[int, int]], tile: int) -> int:
    """Tiles of an image's AnyRes grid (without the base tile)."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    return (best_h // tile) * (best_w // tile)


class LlavaOnevision(Architecture):
    """OneVision and Interleave: SigLIP (every patch, no CLS); a lone image AnyRes-tiled up to 6x6 and reduced
    to about ``max_tiles`` tiles' worth (or, with ``anyres.base_only``, its base tile: Stage-1); each item
    of a multi-image sample one base tile plus a newline; video frames pooled 2x2 plus one newline."""

    name = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    config_class = "LlavaOnevisionConfig"
    processor_class = "LlavaOnevisionProcessor"
    image_processor_type = "LlavaOnevisionImageProcessor"
    vision_config_class = "SiglipVisionConfig"
    llm_config_class = "Qwen2Config"
    select_strategy = "full"
    takes_video = True
    reduces_grid = True

    def tiles_single_image(self, anyres: AnyResConfig) -> bool:
        return not anyres.base_only

    def base_tile_tokens(self, anyres: AnyResConfig) -> int:
        return num_multi_image_tokens(anyres)

    def video_tokens(self, frames: int, anyres: AnyResConfig) -> int:
        return num_video_tokens(frames, anyres)

    def video(self, frames: np.ndarray, anyres: AnyResConfig, *, normalize: bool = True) -> MediaInputs:
        pixels = video_tiles_uint8(frames, anyres)
        size = (int(frames.shape[1]), int(frames.shape[2]))
        media = MediaInputs("video", pixels, [size] * len(frames), [num_video_tokens(len(frames), anyres)])
        return _finish(media, anyres, normalize)

    def complete_batch(self, rows: list[dict], blank_image_row) -> list[dict]:
        """Base-only images (Stage-1) must not be AnyRes-tiled by the model, which tiles every image of a
        one-image sample (``batch_num_images == 1``); the batch's images are passed as one group instead
        (image_inputs), and a lone one gets a blank partner."""
        images = sum(len(r["image_sizes"]) for r in rows if r["modality"] in ("image", "multi_image"))
        if images == 1 and any(r["modality"] == "image" and _tiles(r) == 1 for r in rows):
            return [*rows, blank_image_row()]
        return rows

    def image_inputs(self, pixels: list[np.ndarray], rows: list[dict], anyres: AnyResConfig) -> dict:
        import torch  # the ingress tiles and tokenizes with this module, without torch

        counts = [len(r["image_sizes"]) for r in rows]
        if anyres.base_only:  # every image is one base tile: one group, so that none is tiled (see above)
            counts = [sum(counts)]
        return {
            "pixel_values": torch.as_tensor(np.concatenate(pixels)),
            "image_sizes": torch.as_tensor(
                [list(s) for r in rows for s in r["image_sizes"]], dtype=torch.long
            ),
            "batch_num_images": torch.as_tensor(counts, dtype=torch.long),
        }

    def _config_kwargs(self, vision_config, text_config, image_token_id, video_token_id, spec) -> dict:
        return {
            **super()._config_kwargs(vision_config, text_config, image_token_id, video_token_id, spec),
            "video_token_index": video_token_id,
            "image_grid_pinpoints": [list(p) for p in self.grid_pinpoints(spec.anyres)],
            "vision_aspect_ratio": f"anyres_max_{spec.anyres.max_tiles}",
        }

    def set_stage_config(self, config, anyres: AnyResConfig) -> None:
        config.image_grid_pinpoints = [list(p) for p in self.grid_pinpoints(anyres)]
        config.vision_aspect_ratio = f"anyres_max_{anyres.max_tiles}"

    def image_processor_dict(self, anyres: AnyResConfig) -> dict:
        t = anyres.tile_size
        return {
            **self._common_image_processor(anyres),
            "do_pad": True,
            "size": {"height": t, "width": t},
            "image_grid_pinpoints": [list(p) for p in self.grid_pinpoints(anyres)],
        }

    def processor_dict(self, anyres: AnyResConfig, image_token: str, video_token: str) -> dict:
        return {
            "processor_class": self.processor_class,
            "num_image_tokens": anyres.tokens_per_side**2,
            "vision_feature_select_strategy": self.select_strategy,
            "vision_aspect_ratio": f"anyres_max_{anyres.max_tiles}",
            "image_token": image_token,
            "video_token": video_token,
        }

    def video_processor_dict(self, anyres: AnyResConfig, video) -> dict:
        t = anyres.tile_size
        return {
            **self._common_image_processor(anyres),
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "size": {"height": t, "width": t},
            # frames are sampled by the caller (LLaVA-NeXT's rule, llava_ray_processor.json "video"): HF's own
            # sampler spaces frames uniformly and would pick other frames than training did
            "do_sample_frames": False,
            "fps": video.fps,
            "num_frames": video.max_frames,
        }


def _tiles(row: dict) -> int:
    shape = row.get("pixel_shape")
    if shape is None and row.get("pixel_values") is not None and not isinstance(row["pixel_values"], bytes):
        shape = np.asarray(row["pixel_values"]).shape
    return int(shape[0]) if shape is not None and len(shape) else 0


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (Llava(), LlavaNext(), LlavaOnevision())}
MODEL_TYPES = {"llava": "llava", "llava_next": "llava_next", "llava_onevision": "llava_onevision"}
"""HF config.model_type -> our architecture name."""


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"arch: expected one of {sorted(ARCHITECTURES)}, found {name!r}")
    return ARCHITECTURES[name]
