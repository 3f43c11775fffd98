"""Vision features of recently seen media, by content: a chat about one image sends it with every turn
(the API is stateless), and the tower plus AnyRes is a large share of prefill.

A key is the SHA-256 of the medium's bytes, plus what makes its features: the processor's settings
(tiling, video sampling), whether it came alone or among several images (OneVision tiles a lone image
and not one of several), and the fingerprint of the weights that encode it (vision tower, projector,
newline embedding). A new export therefore never meets an old one's features, even in a cache they
share. Entries are the projector's outputs per medium, evicted least recently used past a byte budget.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading

import torch

VISION_PARTS = ("vision_tower", "multi_modal_projector", "image_newline")


def features_fingerprint(model, parts: tuple[str, ...] | None = VISION_PARTS) -> str:
    """A digest of the weights and settings that turn pixels into features (not the language model's);
    ``parts=None``: of every weight and setting (what a token's key/values depend on)."""
    h = hashlib.blake2b(digest_size=16)
    config = model.config.to_dict()
    h.update(
        json.dumps(
            {k: v for k, v in config.items() if parts is None or k != "text_config"},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for name, tensor in sorted(model.state_dict().items()):
        if parts is None or any(part in name for part in parts):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def media_keys(digests: tuple[str, ...], kind: str, settings: dict, weights: str) -> list[str]:
    """One key per medium: its bytes' digest, the kind and company it came in, the processor's settings
    and the fingerprint of the weights that encode it (``features_fingerprint``)."""
    setting = json.dumps(
        {"kind": kind, "alone": len(digests) == 1, "settings": settings, "weights": weights},
        sort_keys=True,
        default=str,
    )
    return [hashlib.sha256(f"{digest}|{setting}".encode()).hexdigest() for digest in digests]


class FeatureCache:
    """Per-medium features under a byte budget, least recently used out first; thread-safe."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.lock = threading.Lock()

    keys = staticmethod(media_keys)

    def get(self, keys: list[str]) -> list[torch.Tensor] | None:
        """Every key's features, or None (a miss) unless all are here."""
        with self.lock:
            if not keys or any(k not in self.entries for k in keys):
                self.misses += 1
                return None
            for k in keys:
                self.entries.move_to_end(k)
            self.hits += 1
            return [self.entries[k] for k in keys]

    def put(self, keys: list[str], features: list[torch.Tensor]) -> None:
        with self.lock:
            for key, value in zip(keys, features, strict=True):
                value = value.detach()
                size = value.numel() * value.element_size()
                if size > self.budget:
                    continue
                if key in self.entries:
                    self.bytes -= self._size(self.entries.pop(key))
                self.entries[key] = value
                self.bytes += size
                while self.bytes > self.budget:
                    _, old = self.entries.popitem(last=False)
                    self.bytes -= self._size(old)
                    self.evictions += 1

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def stats(self) -> dict:
        with self.lock:
            return {
                "entries": len(self.entries),
                "bytes": self.bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
