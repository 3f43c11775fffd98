"""A new request's prefill, alone (exactly the batch ``generate()`` would run for it): its collate row, with
its media's features from the replica's feature cache when every medium was seen before (no decoding,
tiling or vision tower), and the forward that fills its KV cache, keeping its media's features on a
miss."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from components.batching import to_device
from components.conversation import IGNORE_INDEX
from components.feature_cache import FeatureCache, features_fingerprint
from components.processor import LlavaProcessor, Prompt


class Prefill:
    def __init__(self, model, processor: LlavaProcessor, features: FeatureCache | None = None):
        self.model, self.processor, self.features = model, processor, features
        self.settings = processor.config.to_dict()
        self.weights = features_fingerprint(model) if features is not None else ""

    def row(self, prompt: Prompt, digests: tuple[str, ...] = ()) -> dict:
        """The request's collate row (call it off the engine's thread: it tiles). With a feature cache and
        the media's digests: when every medium's features are cached, a row of ids alone that carries them;
        otherwise the full row (media decoded here), whose features the prefill will keep."""
        if self.features is None or not digests:
            return self.processor.prompt_row(prompt.decoded(self.processor.video))
        kind = "video" if prompt.video_frames is not None else "image"
        keys = self.features.keys(digests, kind, self.settings, self.weights)
        cached = self.features.get(keys)
        if cached is not None:  # the media stay encoded: their sizes give the token counts
            ids = self.processor.prompt_ids(prompt)
            return {
                "input_ids": ids,
                "labels": np.full(len(ids), IGNORE_INDEX, dtype=np.int32),
                "modality": "text",
                "pixel_values": None,
                "image_sizes": None,
                "features": (kind, cached),
            }
        return {
            **self.processor.prompt_row(prompt.decoded(self.processor.video)),
            "feature_keys": (kind, keys),
        }

    def __call__(self, row: dict):
        """(KV cache, attention-mask row, last position's logits) of ``row`` prefilled alone."""
        model = self.model
        batch = self.processor.collate([row], left_pad=True)
        batch.pop("labels")
        batch = to_device(batch, model.device, model.dtype)
        if "features" in row:  # cached: the model scatters them where its media tokens are
            kind, tensors = row["features"]
            tensors = [t.to(model.device, model.dtype) for t in tensors]
            pooled = tensors if kind == "image" else torch.stack(tensors)
            batch["mm_encoder_outputs"] = {kind: BaseModelOutputWithPooling(pooler_output=pooled)}
            out = model(**batch, use_cache=True, logits_to_keep=1)
        elif "feature_keys" in row and self.features is not None:
            kind, keys = row["feature_keys"]
            with _captured(model.model, kind) as seen:
                out = model(**batch, use_cache=True, logits_to_keep=1)
            per_medium = list(seen[0].pooler_output) if seen else []
            if len(per_medium) == len(keys):  # not when the architecture added a partner image of its own
                self.features.put(keys, per_medium)
        else:
            out = model(**batch, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if batch["attention_mask"].shape[0] > 1:  # a partner row the architecture needed (complete_batch)
            cache.batch_select_indices(torch.tensor([0]))
        return cache, batch["attention_mask"][:1], out.logits[0, -1].float()


@contextlib.contextmanager
def _captured(inner, kind: str):
    """While inside, ``inner``'s get_image_features (or get_video_features) records what it returns."""
    name = f"get_{kind}_features"
    original = getattr(inner, name)
    seen: list = []

    def capture(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    setattr(inner, name, capture)
    try:
        yield seen
    finally:
        delattr(inner, name)  # the class's method again
