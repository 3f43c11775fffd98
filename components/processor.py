"""One processor per checkpoint: the tokenizer, the template, the tiling, the video sampling, the media
placeholders and the stop ids behind one object, saved into every export and read back from it.

    processor = LlavaProcessor.from_pretrained("runs/demo/stage2_ov/hf")     # a path or s3:// URI
    row = processor.prompt_row(Prompt([Turn("user", "<image>\\nWhat color?")], [image]))
    batch = processor.collate([row], left_pad=True)

Training, preprocessing, evaluation, Serve and the generate command all take this object; none passes
a template, an architecture or an AnyRes config on its own. What differs between LLaVA, LLaVA-NeXT and
OneVision is asked of ``self.arch`` (components/architectures.py).

An export holds our own settings in ``llava_ray_processor.json`` and, for transformers, the tokenizer
files, ``chat_template.jinja`` (string or content-part messages, ``add_generation_prompt``, and
``{% generation %}`` around what the loss trains on), ``processor_config.json``,
``preprocessor_config.json`` and (OneVision) ``video_preprocessor_config.json``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from components import storage
from components.anyres import AnyResConfig
from components.architectures import MODEL_TYPES, Architecture, MediaInputs, architecture
from components.conversation import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    SPECIAL_TOKENS,
    VIDEO_PLACEHOLDER,
    Sample,
    Template,
    TokenizedSample,
    Turn,
    get_template,
    tokenize,
)
from components.video import VideoClip, VideoSource, read_frames

PROCESSOR_FILE = "llava_ray_processor.json"


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from a video (LLaVA-NeXT's rule, components/video.py): every
    round(native_fps / fps)-th frame, or ``max_frames`` evenly spaced ones when that gives more (or when
    ``uniform``)."""

    fps: float = 1.0
    max_frames: int = 32
    uniform: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise ValueError(f"VideoSampling.fps: expected a positive number, found {self.fps!r}")
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"VideoSampling.max_frames: expected a positive int, found {self.max_frames!r}")

    def read(self, source: VideoSource, *, max_pixels: int | None = None) -> VideoClip:
        """Decode only the frames this sampling takes (preprocessing, serving and evaluation all read video
        here); ``max_pixels``: the most sampled frames x height x width (VideoTooLargeError past it)."""
        return read_frames(
            source,
            fps=self.fps,
            max_frames=self.max_frames,
            force_uniform=self.uniform,
            max_pixels=max_pixels,
        )


@dataclass(frozen=True)
class ProcessorConfig:
    """What a processor is, beside its tokenizer: written to ``llava_ray_processor.json``."""

    arch: str = "llava_onevision"
    template: str = DEFAULT_TEMPLATE
    """The chat format rows are built with (``plain`` in Stage-1; an export records the conversational
    one)."""
    anyres: AnyResConfig = field(default_factory=AnyResConfig)
    video: VideoSampling = field(default_factory=VideoSampling)
    image_token: str = IMAGE_PLACEHOLDER
    video_token: str = VIDEO_PLACEHOLDER

    def __post_init__(self) -> None:
        architecture(self.arch)
        get_template(self.template)
        if isinstance(self.anyres, dict):
            object.__setattr__(self, "anyres", anyres_from_dict(self.anyres))
        if isinstance(self.video, dict):
            object.__setattr__(self, "video", VideoSampling(**self.video))

    def to_dict(self) -> dict:
        return asdict(self)


def anyres_from_dict(data: dict) -> AnyResConfig:
    """An AnyResConfig from its JSON form (lists back to tuples)."""
    return AnyResConfig(**{k: _tuples(v) for k, v in data.items()})


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def media_inputs(
    config: ProcessorConfig,
    images: list[Image.Image] | None,
    frames: np.ndarray | None,
    *,
    normalize: bool = True,
) -> MediaInputs:
    """The media half of a processor (no tokenizer needed): what preprocessing's tiling stage runs."""
    arch = architecture(config.arch)
    if frames is not None:
        if images:
            raise ValueError(f"media: expected images or video frames, found {len(images)} images and frames")
        return arch.video(frames, config.anyres, normalize=normalize)
    return arch.images(images or [], config.anyres, normalize=normalize)


@dataclass
class Prompt:
    """One conversation to continue: turns ending with a user turn, and its media (decoded, or still
    encoded: see ``EncodedImage``, ``EncodedVideo`` and ``decoded``)."""

    turns: list[Turn]
    images: list = field(default_factory=list)
    """PIL images, or EncodedImage."""
    video_frames: object = None
    """uint8 [F, H, W, 3] frames, an EncodedVideo, or None."""
    id: str = "request"

    def decoded(self, sampling: VideoSampling) -> Prompt:
        """This prompt with its media decoded (video frames sampled by ``sampling``)."""
        images = [im.decode() if isinstance(im, EncodedImage) else im for im in self.images]
        frames = self.video_frames
        if isinstance(frames, EncodedVideo):
            frames = sampling.read(frames.data).frames
        return Prompt(self.turns, images, frames, self.id)


@dataclass(frozen=True)
class EncodedImage:
    """An image's file bytes and its size: what a serving replica gets, decoded only when its pixels are
    needed (a feature-cache hit needs only the size, for the token count)."""

    data: bytes
    width: int
    height: int

    def decode(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


@dataclass(frozen=True)
class EncodedVideo:
    """A video's file bytes and how many frames its sampling takes (``len``), decoded only when needed."""

    data: bytes
    frames: int

    def __len__(self) -> int:
        return self.frames


class LlavaProcessor:
    """The tokenizer plus a ``ProcessorConfig``: media to tiles and token counts, samples to training rows,
    prompts to generation rows, rows to batches; saved beside the weights of every export."""

    def __init__(self, config: ProcessorConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.arch: Architecture = architecture(config.arch)
        self.template: Template = get_template(config.template)

    # ---- what it is ----------------------------------------------------------------------------

    @property
    def anyres(self) -> AnyResConfig:
        return self.config.anyres

    @property
    def video(self) -> VideoSampling:
        return self.config.video

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.config.image_token)

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.config.video_token)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end generation: the template's stop when it is one token, and eos."""
        ids = []
        if self.template.stop:
            encoded = self.tokenizer.encode(self.template.stop, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    def replace(self, **changes) -> LlavaProcessor:
        """The same tokenizer with other settings (a stage's template, AnyRes grid or video sampling)."""
        config = dataclasses.replace(self.config, **{k: v for k, v in changes.items() if v is not None})
        return LlavaProcessor(config, self.tokenizer)

    def __repr__(self) -> str:
        return f"LlavaProcessor({self.config!r}, vocab={len(self.tokenizer)})"

    # ---- media ---------------------------------------------------------------------------------

    def sample_video(self, source: VideoSource) -> VideoClip:
        """Decode only the frames this checkpoint was trained to see."""
        return self.video.read(source)

    def media(
        self,
        images: list[Image.Image] | None = None,
        frames: np.ndarray | None = None,
        *,
        normalize: bool = True,
    ) -> MediaInputs:
        """Tiles (uint8 when not ``normalize``) and token counts of a sample's images or video frames."""
        return media_inputs(self.config, images, frames, normalize=normalize)

    # ---- rows and batches ----------------------------------------------------------------------

    def tokenize(
        self,
        sample: Sample,
        token_counts: list[int],
        *,
        layout: str = "interleaved",
        max_length: int | None = None,
    ) -> TokenizedSample:
        """input_ids with each placeholder expanded to its media's tokens; labels on assistant turns only."""
        return tokenize(
            sample, self.tokenizer, self.template, token_counts, layout=layout, max_length=max_length
        )

    def prompt_row(self, prompt: Prompt, *, max_length: int | None = None) -> dict:
        """The collate row of a prompt: media processed as in training, ids ending at the assistant's
        prompt."""
        media = self.media(prompt.images, prompt.video_frames)
        sample = Sample(
            id=prompt.id,
            turns=prompt.turns,
            images=[f"image-{i}" for i in range(len(prompt.images))],
            video="video" if prompt.video_frames is not None else None,
        )
        ids = self.tokenize(sample, media.token_counts, max_length=max_length)
        return {
            "input_ids": ids.input_ids,
            "labels": np.full(len(ids.input_ids), IGNORE_INDEX, dtype=np.int32),
            "modality": media.modality,
            "pixel_values": media.pixel_values,
            "image_sizes": media.image_sizes,
        }

    def prompt_ids(self, prompt: Prompt) -> np.ndarray:
        """The ids ``prompt_row`` builds, from the media's sizes alone (no tiling): what serving counts
        against the model's positions, and the row of a prompt whose media features are cached."""
        counts = self.media_token_counts(prompt)
        sample = Sample(
            id=prompt.id,
            turns=prompt.turns,
            images=[f"image-{i}" for i in range(len(prompt.images))],
            video="video" if prompt.video_frames is not None else None,
        )
        return self.tokenize(sample, counts).input_ids

    def media_token_counts(self, prompt: Prompt) -> list[int]:
        """Each medium's tokens in the prompt's ids, in order, from the media's sizes alone."""
        if prompt.video_frames is not None:
            return [self.arch.video_tokens(len(prompt.video_frames), self.anyres)]
        return list(
            self.arch.image_token_counts([(im.height, im.width) for im in prompt.images], self.anyres)
        )

    def count_tokens(self, prompt: Prompt) -> int:
        """The prompt's length as ``prompt_row`` builds it (checked before a request joins a batch)."""
        return len(self.prompt_ids(prompt))

    def collate(self, rows: list[dict], *, left_pad: bool = False) -> dict:
        """Padded ids, labels and attention mask plus the media tensors this architecture's HF model takes."""
        from components.batching import collate  # torch: the ingress tiles and tokenizes without it

        rows = self.arch.complete_batch(rows, self._blank_image_row)
        return collate(rows, self.pad_token_id, self.arch, self.anyres, left_pad=left_pad)

    def _blank_image_row(self) -> dict:
        t = self.anyres.tile_size
        blank = Image.new("RGB", (t, t), (0, 0, 0))
        return self.prompt_row(Prompt([Turn("user", IMAGE_PLACEHOLDER)], [blank], id="blank-image"))

    def probe_batch(self) -> dict:
        """A fixed batch every rank builds identically, one row per path the architecture takes: an image
        question, two images, a video (where it takes video) and text. It checks that an export gives the
        logits of the model that trained it, so an export field that only one path reads shows."""
        image = Image.new("RGB", (150, 100), (245, 245, 245))
        ImageDraw.Draw(image).ellipse((30, 10, 110, 90), fill=(220, 30, 30))
        other = Image.new("RGB", (90, 120), (20, 20, 40))
        ImageDraw.Draw(other).rectangle((10, 30, 70, 90), fill=(40, 200, 60))
        rows = [
            self.prompt_row(Prompt([Turn("user", "<image>\nWhat color is the circle?")], [image])),
            self.prompt_row(Prompt([Turn("user", "<image>\n<image>\nWhich has a square?")], [image, other])),
        ]
        if self.arch.takes_video:
            frames = np.zeros((4, 64, 80, 3), dtype=np.uint8)
            for k in range(4):  # a square moving right, red then blue
                frames[k, 20:44, 8 + 12 * k : 32 + 12 * k] = (220, 30, 30) if k < 2 else (30, 30, 220)
            rows.append(self.prompt_row(Prompt([Turn("user", "<video>\nWhere does it go?")], [], frames)))
        rows.append(self.prompt_row(Prompt([Turn("user", "What is two plus three?")])))
        return self.collate(rows)

    # ---- save / load ---------------------------------------------------------------------------

    def generation_config(self) -> dict:
        """What generation_config.json needs so that HF's plain ``generate`` stops where we stop."""
        stops = self.stop_ids
        out = {"eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": self.pad_token_id}
        if self.tokenizer.bos_token_id is not None:
            out["bos_token_id"] = self.tokenizer.bos_token_id
        # a stop of several tokens (Vicuna-v0's "###" with a real tokenizer) cannot be an eos id; HF's
        # stop_strings would make every plain generate() call demand the tokenizer, so it is left out:
        # generate(..., stop_strings=["###"], tokenizer=tokenizer) stops there (README)
        return out

    def save_pretrained(self, directory: str) -> None:
        """Tokenizer files, chat_template.jinja, the HF processor configs and ours, into a local directory."""
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.chat_template = chat_template(self.template)
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
            f.write(chat_template(self.template))
        files = self.arch.hf_processor_files(
            self.anyres, self.video, self.config.image_token, self.config.video_token
        )
        files[PROCESSOR_FILE] = self.config.to_dict()
        for name, data in files.items():
            with open(os.path.join(directory, name), "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)

    @classmethod
    def from_pretrained(cls, uri: str, *, default_template: str | None = None) -> LlavaProcessor:
        """The processor of a checkpoint (path, file:// or s3:// URI). A checkpoint of ours carries every
        setting; an HF release (llava-hf layout) gives the architecture, tiling and normalization, and
        ``default_template`` (a recipe's) names its chat format."""
        from transformers import AutoTokenizer  # seconds to import: only where a processor is loaded

        with tempfile.TemporaryDirectory() as tmp:
            path = local_dir(uri, tmp)
            tokenizer = AutoTokenizer.from_pretrained(path)
            ensure_media_tokens(tokenizer)
            ours = os.path.join(path, PROCESSOR_FILE)
            if os.path.exists(ours):
                with open(ours) as f:
                    config = ProcessorConfig(**json.load(f))
                return cls(config, tokenizer)
            if default_template is None:
                raise ValueError(
                    f"{uri}: expected {PROCESSOR_FILE} or a template to prompt with, found neither"
                )
            return cls(_config_from_hf(path, default_template), tokenizer)


def _config_from_hf(path: str, template: str) -> ProcessorConfig:
    """A ProcessorConfig from an HF release: config.json's model type, preprocessor_config.json's tiling."""
    with open(os.path.join(path, "config.json")) as f:
        model_config = json.load(f)
    model_type = model_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{path}/config.json: model_type: expected one of {sorted(MODEL_TYPES)}, found {model_type!r}"
        )
    image = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                data = json.load(f)
            image = data.get("image_processor", data) if not image else image
    vision = model_config.get("vision_config", {})
    tile = int(vision.get("image_size", 336))
    kwargs = {"tile_size": tile, "patch_size": int(vision.get("patch_size", 14))}
    if image.get("image_mean"):
        kwargs.update(mean=tuple(image["image_mean"]), std=tuple(image["image_std"]))
    pinpoints = model_config.get("image_grid_pinpoints") or image.get("image_grid_pinpoints")
    if pinpoints:
        grids = tuple(sorted({(h // tile, w // tile) for h, w in pinpoints}))
        kwargs["max_grid"] = max(max(g) for g in grids)
        if len(grids) != kwargs["max_grid"] ** 2:
            kwargs["grids"] = grids
    aspect = model_config.get("vision_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres_max_"):
        kwargs["max_tiles"] = int(aspect[len("anyres_max_") :])
    return ProcessorConfig(arch=MODEL_TYPES[model_type], template=template, anyres=AnyResConfig(**kwargs))


def local_dir(uri: str, tmp: str) -> str:
    """A local directory for a path, file:// or s3:// URI (downloaded into ``tmp``)."""
    if storage.is_s3(uri):
        return storage.download_dir(uri, tmp)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return uri


def ensure_media_tokens(tokenizer) -> None:
    """A tokenizer gets <image>, <video> and ChatML's markers as special tokens when it lacks them, and a
    pad."""
    wanted = [t for k, t in SPECIAL_TOKENS.items() if k not in ("pad", "bos", "eos", "unk")]
    missing = [t for t in wanted if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ---- the chat template ------------------------------------------------------------------------


# content_text (components/conversation.py) in Jinja, as the macro ``render(content)``: placeholders in the
# text; images first, labelled; the parts in order, a newline where media meets text without whitespace
_RENDER_MACRO = "".join(
    [
        "{%- macro render(content) -%}",
        "{%- if content is string -%}{{ content }}{%- else -%}",
        "{%- set ns = namespace(texts='', parts=[], media=[], lead=-1, out='', prev='', labelled=[]) -%}",
        "{%- for p in content -%}",
        "{%- if p['type'] == 'text' and p['text'] -%}",
        "{%- if ns.lead < 0 -%}{%- set ns.lead = ns.parts | length -%}{%- endif -%}",
        "{%- set ns.texts = ns.texts + p['text'] -%}{%- set ns.parts = ns.parts + [['text', p['text']]] -%}",
        "{%- elif p['type'] in ['image', 'image_url'] -%}",
        "{%- set ns.parts = ns.parts + [['media', '" + IMAGE_PLACEHOLDER + "']] -%}",
        "{%- set ns.media = ns.media + ['image'] -%}",
        "{%- elif p['type'] in ['video', 'video_url'] -%}",
        "{%- set ns.parts = ns.parts + [['media', '" + VIDEO_PLACEHOLDER + "']] -%}",
        "{%- set ns.media = ns.media + ['video'] -%}",
        "{%- endif -%}{%- endfor -%}",
        "{%- if '" + IMAGE_PLACEHOLDER + "' in ns.texts or '" + VIDEO_PLACEHOLDER + "' in ns.texts -%}",
        "{{ ns.texts }}{%- else -%}",
        "{%- if ns.lead < 0 -%}{%- set ns.lead = ns.parts | length -%}{%- endif -%}",
        "{%- if ns.lead == ns.media | length and ns.lead >= 2 and 'video' not in ns.media -%}",
        "{%- for k in range(ns.lead) -%}",
        "{%- set ns.labelled = ns.labelled + [['text', 'Image ' ~ (k + 1) ~ ': '], ns.parts[k]] -%}",
        "{%- endfor -%}",
        "{%- set ns.parts = ns.labelled + ns.parts[ns.lead:] -%}",
        "{%- endif -%}",
        "{%- for kind, piece in ns.parts -%}",
        "{%- if ns.prev and (ns.prev == 'media' or kind == 'media')"
        " and not (ns.out[-1:].isspace() or piece[:1].isspace()) -%}",
        "{%- set ns.out = ns.out + '\\n' -%}",
        "{%- endif -%}",
        "{%- set ns.out = ns.out + piece -%}{%- set ns.prev = kind -%}",
        "{%- endfor -%}",
        "{{ ns.out }}",
        "{%- endif -%}{%- endif -%}{%- endmacro -%}",
    ]
)


def chat_template(template: Template) -> str:
    """A Jinja chat template that renders exactly what ``tokenize`` builds, for HF's apply_chat_template.

    A message's content is a string, or a list of parts (``text``, ``image``/``image_url``,
    ``video``/``video_url``) that become text by ``content_text`` (components/conversation.py), the rule
    the endpoint applies to the same parts. The assistant's answer and its stop sit in ``{% generation %}``
    (HF's assistant mask equals our labels), and ``add_generation_prompt`` adds the assistant's prompt
    after a last user turn."""

    def q(s: str) -> str:
        return json.dumps(s)

    user_pre, user_post = template.user_format.split("{text}")
    asst_pre, asst_post = template.assistant_format.split("{text}")
    prefix_pre, prefix_post = template.prefix_format.split("{system}")
    media = "'" + IMAGE_PLACEHOLDER + "' * text.count('" + IMAGE_PLACEHOLDER + "') + '"
    media += VIDEO_PLACEHOLDER + "' * text.count('" + VIDEO_PLACEHOLDER + "')"
    user_text = "text" if template.text_in_user else media
    return "".join(
        [
            _RENDER_MACRO,
            "{%- set sys = namespace(text=" + q(template.system) + ") -%}",
            "{%- for m in messages if m['role'] == 'system' -%}"
            "{%- set sys.text = render(m['content']) -%}{%- endfor -%}",
            "{{ bos_token }}" if template.add_bos else "",
            "{{ " + q(prefix_pre) + " + sys.text + " + q(prefix_post) + " }}",
            "{%- for m in messages -%}",
            "{%- set text = render(m['content']) -%}",
            "{%- if m['role'] == 'user' -%}",
            "{{ " + q(user_pre) + " + " + user_text + " + " + q(user_post) + " }}",
            "{%- if not loop.last or add_generation_prompt -%}{{ "
            + q(template.assistant_prompt)
            + " }}{%- endif -%}",
            "{%- elif m['role'] == 'assistant' -%}",
            "{% generation %}{{ " + q(asst_pre) + " + text + " + q(asst_post) + " }}{% endgeneration %}",
            "{{ " + q(template.after_assistant) + " }}",
            "{%- endif -%}{%- endfor -%}",
        ]
    )
