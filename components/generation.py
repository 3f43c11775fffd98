"""Generation, and the filler rows that keep ZeRO ranks in step: the paths evaluation, serving and training
share. Every function takes the checkpoint's ``LlavaProcessor`` (components/processor.py)."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from components import storage
from components.batching import to_device
from components.conversation import Turn
from components.processor import LlavaProcessor, Prompt


@torch.no_grad()
def generate(
    model,
    processor: LlavaProcessor,
    rows: list[dict],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> list[dict]:
    """Continue each row; returns [{text, prompt_tokens, completion_tokens, finish_reason}] in order."""
    batch = processor.collate(rows, left_pad=True)
    batch.pop("labels")
    batch = to_device(batch, model.device, model.dtype)  # a GPU replica's model: its device, bf16 pixels
    if seed is not None:
        torch.manual_seed(seed)
    sampling = temperature > 0
    kwargs = {"do_sample": sampling}
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p)
    eos = processor.stop_ids
    tokenizer = processor.tokenizer
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=processor.pad_token_id,
        **kwargs,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    stops = [s for s in [processor.template.stop, *(stop or [])] if s]
    results = []
    for i, row in enumerate(rows):
        tokens = [t for t in new[i].tolist() if t != processor.pad_token_id]
        finish = "length"
        if tokens and tokens[-1] in eos:
            tokens, finish = tokens[:-1], "stop"
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stops:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        results.append(
            {
                "text": text.strip(),
                "prompt_tokens": len(row["input_ids"]),
                "completion_tokens": len(tokens),
                "finish_reason": finish,
            }
        )
    return results


def load_media(processor: LlavaProcessor, images: list[str], video: str | None, media_root: str):
    """Images (PIL) and video frames of a manifest record, through the storage layer; video frames sampled
    as the checkpoint was trained (its processor's VideoSampling)."""
    loaded = []
    for path in images:
        uri = path if storage.is_s3(path) or os.path.isabs(path) else storage.join(media_root, path)
        image = Image.open(io.BytesIO(storage.read_bytes(uri)))
        image.load()
        loaded.append(image)
    frames = None
    if video:
        uri = video if storage.is_s3(video) or os.path.isabs(video) else storage.join(media_root, video)
        frames = processor.sample_video(storage.read_bytes(uri)).frames
    return loaded, frames


class MediaFiller:
    """Rows that make every micro-batch run the same modules, in the same order, on every rank.

    Under ZeRO-3 each rank gathers parameters module by module as its forward reaches them, so all
    ranks must call the same modules in the same order each step (the official trainer hangs when one
    rank gets only text); under ZeRO-2 they must produce gradients for the same parameters. A micro-batch
    without images gets a blank image row, and (in stages with video) one without video gets a blank
    video row. Filler rows are labelled -100 throughout and attend only to themselves, so the loss and
    the gradients are those of the real rows.
    """

    def __init__(self, processor: LlavaProcessor, with_video: bool):
        self.processor = processor
        self.with_video = with_video and processor.arch.takes_video
        t = processor.anyres.tile_size
        blank = Image.new("RGB", (t, t), (0, 0, 0))
        self.image = processor.prompt_row(Prompt([Turn("user", "<image>")], [blank], id="filler-image"))
        self.videos: dict[int, dict] = {}

    def video(self, frames: int) -> dict:
        if frames not in self.videos:
            t = self.processor.anyres.tile_size
            clip = np.zeros((frames, t, t, 3), dtype=np.uint8)
            self.videos[frames] = self.processor.prompt_row(
                Prompt([Turn("user", "<video>")], video_frames=clip, id="filler-video")
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
