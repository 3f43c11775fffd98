"""Prompting and greedy/sampled generation: the path evaluation and serving share."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from components import storage
from components.anyres import AnyResConfig
from components.batching import collate, to_device
from components.conversation import IGNORE_INDEX, Sample, Turn, get_template, tokenize
from components.processing import MediaInputs, process_images, process_video
from components.video import read_frames


@dataclass
class Prompt:
    """One conversation to continue: turns ending with a user turn, and its media."""

    turns: list[Turn]
    images: list[Image.Image] = field(default_factory=list)
    video_frames: np.ndarray | None = None
    id: str = "request"


def prompt_row(
    prompt: Prompt, tokenizer, template: str, arch: str, anyres: AnyResConfig, max_length: int | None = None
) -> dict:
    """The collate row of a prompt: media processed as in training, ids ending at the assistant's prompt."""
    if prompt.video_frames is not None:
        media = process_video(prompt.video_frames, arch, anyres)
    else:
        media = process_images(prompt.images, arch, anyres)
    sample = Sample(
        id=prompt.id,
        turns=prompt.turns,
        images=[f"image-{i}" for i in range(len(prompt.images))],
        video="video" if prompt.video_frames is not None else None,
    )
    ids = tokenize(sample, tokenizer, template, media.token_counts, max_length=max_length)
    return _row(ids.input_ids, media)


def _row(input_ids: np.ndarray, media: MediaInputs) -> dict:
    return {
        "input_ids": input_ids,
        "labels": np.full(len(input_ids), IGNORE_INDEX, dtype=np.int32),
        "modality": media.modality,
        "pixel_values": media.pixel_values,
        "image_sizes": media.image_sizes,
    }


def stop_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end generation: the template's stop when it is one token, and eos."""
    stop = get_template(template).stop
    ids = []
    if stop:
        encoded = tokenizer.encode(stop, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    rows: list[dict],
    template: str,
    arch: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> list[dict]:
    """Continue each row; returns [{text, prompt_tokens, completion_tokens, finish_reason}] in order."""
    batch = collate(rows, tokenizer.pad_token_id, arch, left_pad=True)
    batch.pop("labels")
    batch = to_device(batch, model.device, model.dtype)  # a GPU replica's model: its device, bf16 pixels
    if seed is not None:
        torch.manual_seed(seed)
    sampling = temperature > 0
    kwargs = {"do_sample": sampling}
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p)
    eos = stop_ids(tokenizer, template)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    template_stop = get_template(template).stop
    stops = [s for s in [template_stop, *(stop or [])] if s]
    results = []
    for i, row in enumerate(rows):
        tokens = [t for t in new[i].tolist() if t != tokenizer.pad_token_id]
        finish = "length"
        if tokens and tokens[-1] in eos:
            tokens, finish = tokens[:-1], "stop"
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stops:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        results.append({"text": text.strip(), "prompt_tokens": len(row["input_ids"]),
                        "completion_tokens": len(tokens), "finish_reason": finish})  # fmt: skip
    return results


def load_media(record_images: list[str], video: str | None, media_root: str, *, fps: float, max_frames: int):
    """Images (PIL) and video frames of a manifest record, through the storage layer."""
    images = []
    for path in record_images:
        uri = path if storage.is_s3(path) or os.path.isabs(path) else storage.join(media_root, path)
        image = Image.open(io.BytesIO(storage.read_bytes(uri)))
        image.load()
        images.append(image)
    frames = None
    if video:
        uri = video if storage.is_s3(video) or os.path.isabs(video) else storage.join(media_root, video)
        frames = read_frames(storage.read_bytes(uri), fps=fps, max_frames=max_frames).frames
    return images, frames


def probe_batch(tokenizer, template: str, arch: str, anyres: AnyResConfig) -> dict:
    """A fixed batch (an image question and a text question) that every rank can build identically:
    used to check that an export gives the same logits as the model that trained it."""
    from PIL import ImageDraw

    image = Image.new("RGB", (150, 100), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((30, 10, 110, 90), fill=(220, 30, 30))
    rows = [
        prompt_row(
            Prompt([Turn("user", "<image>\nWhat color is the circle?")], [image]),
            tokenizer,
            template,
            arch,
            anyres,
        ),
        prompt_row(Prompt([Turn("user", "What is two plus three?")]), tokenizer, template, arch, anyres),
    ]
    return collate(rows, tokenizer.pad_token_id, arch)


class MediaFiller:
    """Rows that make every micro-batch run the same modules, in the same order, on every rank.

    Under ZeRO-3 each rank gathers parameters module by module as its forward reaches them, so all
    ranks must call the same modules in the same order each step (the official trainer hangs when one
    rank gets only text); under ZeRO-2 they must produce gradients for the same parameters. A micro-batch
    without images gets a blank image row, and (in stages with video) one without video gets a blank
    video row. Filler rows are labelled -100 throughout and attend only to themselves, so the loss and
    the gradients are those of the real rows.
    """

    def __init__(self, tokenizer, template: str, arch: str, anyres: AnyResConfig, with_video: bool):
        self.args = (tokenizer, template, arch, anyres)
        self.with_video = with_video and arch == "llava_onevision"
        blank = Image.new("RGB", (anyres.tile_size, anyres.tile_size), (0, 0, 0))
        self.image = prompt_row(Prompt([Turn("user", "<image>")], [blank], id="filler-image"), *self.args)
        self.videos: dict[int, dict] = {}

    def video(self, frames: int) -> dict:
        if frames not in self.videos:
            t = self.args[3].tile_size
            clip = np.zeros((frames, t, t, 3), dtype=np.uint8)
            self.videos[frames] = prompt_row(
                Prompt([Turn("user", "<video>")], video_frames=clip, id="filler-video"), *self.args
            )
        return self.videos[frames]

    def __call__(self, rows: list[dict]) -> list[dict]:
        kinds = {r["modality"] for r in rows}
        out = list(rows)
        if not kinds & {"image", "multi_image"}:
            out.append(self.image)
        if self.with_video and "video" not in kinds:
            out.append(self.video(1))
        return out
