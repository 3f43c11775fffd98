"""A new request's prefill, alone (exactly the batch ``generate()`` would run for it): its collate row, with
its media's features from the replica's feature cache when every medium was seen before (no decoding,
tiling or vision tower), and the forward that fills its KV cache, keeping its media's features on a
miss. With a prefix cache (components/prefix_cache.py), only the tokens after the longest cached prefix
are run: the prefix's KV comes from an earlier turn, and the features of the media after it from the
feature cache."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from components.batching import to_device
from components.conversation import IGNORE_INDEX
from components.feature_cache import FeatureCache, features_fingerprint, media_keys
from components.prefix_cache import PrefixCache, identities
from components.processor import LlavaProcessor, Prompt


class Prefill:
    def __init__(
        self,
        model,
        processor: LlavaProcessor,
        features: FeatureCache | None = None,
        prefix: PrefixCache | None = None,
    ):
        self.model, self.processor, self.features, self.prefix = model, processor, features, prefix
        self.settings = processor.config.to_dict()
        self.weights = features_fingerprint(model) if (features, prefix) != (None, None) else ""
        self.root = features_fingerprint(model, parts=None) if prefix is not None else ""
        """The prefix cache's root: every weight (a token's KV depends on all of them)."""
        self.media_ids = [processor.image_token_id, processor.video_token_id]
        self.prefilled_tokens = 0
        """Tokens run through the model by prefills (those reused from the prefix cache are not)."""

    def row(self, prompt: Prompt, digests: tuple[str, ...] = ()) -> dict:
        """The request's collate row (call it off the engine's thread: it tiles), with its tokens as the
        prefix cache matches them (``tokens``, None where it cannot: media without digests)."""
        kind = "video" if prompt.video_frames is not None else "image"
        keys = media_keys(digests, kind, self.settings, self.weights) if digests else []
        row = self._row(prompt, kind, keys)
        row["tokens"], row["media_spans"] = None, []
        if self.prefix is not None and (keys or not (prompt.images or prompt.video_frames is not None)):
            row["media_spans"] = self._spans(prompt, row["input_ids"])
            if row["media_spans"] is not None and len(keys) == len(row["media_spans"]):
                media = [(s, c, k) for (s, c), k in zip(row["media_spans"], keys, strict=True)]
                row["tokens"] = identities(row["input_ids"], media)
        return row

    def _spans(self, prompt: Prompt, ids: np.ndarray) -> list[tuple[int, int]] | None:
        """(start, count) of each medium's tokens in ``ids``; None when they are not where the media's
        sizes say (no reuse for such a row, rather than a wrong one)."""
        counts = self.processor.media_token_counts(prompt)
        positions = np.flatnonzero(np.isin(ids, self.media_ids))
        if len(positions) != sum(counts):
            return None
        spans, at = [], 0
        for count in counts:
            if count and positions[at + count - 1] - positions[at] != count - 1:
                return None
            spans.append((int(positions[at]), count))
            at += count
        return spans

    def _row(self, prompt: Prompt, kind: str, keys: list[str]) -> dict:
        """With a feature cache and the media's keys (media_keys): when every medium's features are cached,
        a row of ids alone that carries them; otherwise the full row (media decoded here), whose features
        the prefill will keep."""
        if self.features is None or not keys:
            return self.processor.prompt_row(prompt.decoded(self.processor.video))
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
        """(KV cache, attention-mask row, last position's logits, tokens reused from the prefix cache) of
        ``row`` prefilled alone."""
        reused, layers = 0, []
        if self.prefix is not None and row.get("tokens") is not None:
            layers, reused = self.prefix.lookup(row["tokens"], self.root)
            reused = self._reusable(row, reused)
            self.prefix.record(reused)
        self.prefilled_tokens += len(row["input_ids"]) - reused
        if reused:
            return (*self._extend(row, layers, reused), reused)
        return (*self._full(row), 0)

    def keep(self, tokens: np.ndarray, layers: list) -> None:
        """A finished sequence's KV, for the next turn (``tokens``: identities() of what it covers)."""
        if self.prefix is not None:
            self.prefix.put(tokens, layers, self.root)

    @staticmethod
    def _reusable(row: dict, reused: int) -> int:
        """``reused`` cut back to the start of a medium it would split; 0 when a medium after it has no
        cached features to give (its pixels cannot be encoded apart from the others')."""
        for start, count in row["media_spans"]:
            if start < reused < start + count:
                reused = start
        after = [start for start, _ in row["media_spans"] if start >= reused]
        return reused if not after or "features" in row else 0

    def _extend(self, row: dict, layers: list, reused: int):
        """Run only the tokens after the reused prefix, on the prefix's KV."""
        model = self.model
        cache = DynamicCache(config=model.config.get_text_config())  # its layers' kinds (sliding windows)
        for i, (keys, values) in enumerate(layers):
            cache.update(keys[:, :, :reused], values[:, :, :reused], i)
        kwargs = {}
        suffix = [j for j, (start, _) in enumerate(row["media_spans"]) if start >= reused]
        if suffix:
            kind, tensors = row["features"]
            tensors = [tensors[j].to(model.device, model.dtype) for j in suffix]
            pooled = tensors if kind == "image" else torch.stack(tensors)
            kwargs["mm_encoder_outputs"] = {kind: BaseModelOutputWithPooling(pooler_output=pooled)}
        ids = torch.as_tensor(np.asarray(row["input_ids"][reused:]), device=model.device).long()[None]
        mask = torch.ones((1, len(row["input_ids"])), dtype=torch.long, device=model.device)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.past_key_values, mask, out.logits[0, -1].float()

    def _full(self, row: dict):
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
