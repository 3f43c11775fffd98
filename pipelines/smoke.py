"""One forward and backward pass per modality on the demo data: the quickest proof that the parts fit."""

from __future__ import annotations

import json
import os

import torch
from PIL import Image

from components.batching import collate
from components.conversation import parse_sample, tokenize
from components.model import ModelSpec
from components.processing import process_images, process_video
from components.video import read_frames

SPLITS = {"image": "single_image", "multi_image": "multi_image", "video": "video", "text": "text"}


def forward_backward_per_modality(
    model, tokenizer, spec: ModelSpec, root: str, manifests: dict
) -> list[dict]:
    results = []
    model.train()
    for modality, split in SPLITS.items():
        with open(manifests[split]) as f:
            sample = parse_sample(json.loads(f.readline()), source=split)
        if sample.video:
            media = process_video(
                read_frames(os.path.join(root, sample.video)).frames, spec.arch, spec.anyres
            )
        else:
            images = [Image.open(os.path.join(root, p)) for p in sample.images]
            media = process_images(images, spec.arch, spec.anyres)
        ids = tokenize(sample, tokenizer, spec.template, media.token_counts)
        row = {"input_ids": ids.input_ids, "labels": ids.labels, "modality": media.modality,
               "pixel_values": media.pixel_values, "image_sizes": media.image_sizes}  # fmt: skip
        model.zero_grad()
        loss = model(**collate([row], tokenizer.pad_token_id, spec.arch)).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        results.append(
            {"modality": modality, "tokens": len(ids), "loss": loss.item(), "grad_norm": float(grad_norm)}
        )
    return results
