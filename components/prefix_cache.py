"""The key/value cache of finished turns, reused by the next turn's prefill: the OpenAI API is stateless,
so turn k re-sends turns 1..k-1 (images included), and without this the language model prefills all of
them again, the media's hundreds to thousands of visual tokens among them, at every turn.

What a token is, for matching: a text token is its id; a medium's token is a digest of the medium's key
(its bytes' SHA-256, kind, company and processor settings: components/feature_cache.media_keys) and its
offset inside the medium. The same question after another image, or the same image at another size (its
AnyRes grid), is therefore another sequence (vLLM's #12603 took equal placeholder ids after different
images as hits). Sequences are hashed in blocks of ``BLOCK`` tokens, each block's hash chained on the one
before from a root that is the fingerprint of every weight of the model, so a new export never meets an
old one's KV even in a cache they share. A lookup walks the request's block hashes to the deepest one
cached, then extends token by token inside the next block, so a turn prefills exactly the tokens after
the longest common prefix.

An entry is one finished sequence's KV (prompt and generated tokens, every layer, one row), kept until a
byte budget pushes it out, least recently used first. A newer entry that extends an older one takes over
its block hashes; an entry no hash points to any more is dropped at once (its KV is a prefix of the newer).
Used from the engine's thread only; ``stats`` may be read from any.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading

import numpy as np
import torch

BLOCK = 16
"""Tokens per hashed block (a lookup still matches to the token)."""


def identities(ids: np.ndarray, media: list[tuple[int, int, str]]) -> np.ndarray:
    """The tokens as matching sees them (int64): text tokens their ids (>= 0); the tokens of each medium
    ``(start, count, key)`` a negative digest of the key, its token count (an image's AnyRes grid) and the
    offset inside the medium."""
    out = np.asarray(ids, dtype=np.int64).copy()
    for start, count, key in media:
        base = int(hashlib.blake2b(f"{key}|{count}".encode(), digest_size=7).hexdigest(), 16)
        out[start : start + count] = -1 - (base + np.arange(count, dtype=np.int64))
    return out


@dataclasses.dataclass
class Entry:
    tokens: np.ndarray
    """identities() of the tokens whose KV ``layers`` hold."""
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    """(keys, values) per layer, each (1, heads, len(tokens), head_dim)."""
    hashes: list[bytes]
    size: int


class PrefixCache:
    """Finished sequences' KV under a byte budget; see the module's docstring."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self.index: dict[bytes, int] = {}
        """Block hash -> the newest entry holding that block."""
        self.bytes = 0
        self.next_id = 0
        self.hits = self.misses = self.evictions = 0
        self.reused_tokens = 0
        self.lock = threading.Lock()

    @staticmethod
    def chain(tokens: np.ndarray, root: str) -> list[bytes]:
        """The hash of every full block of ``tokens``, each over the one before it (the first over
        ``root``: the model's weights fingerprint)."""
        hashes, previous = [], root.encode()
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            previous = hashlib.blake2b(
                previous + tokens[start : start + BLOCK].tobytes(), digest_size=16
            ).digest()
            hashes.append(previous)
        return hashes

    def lookup(self, tokens: np.ndarray, root: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """The KV of the longest cached prefix of ``tokens`` and its length (([], 0): a miss). The length
        is at most ``len(tokens) - 1``: the last token is always prefilled, for its logits."""
        with self.lock:
            found = None
            for depth, h in enumerate(self.chain(tokens, root)):
                if h not in self.index:
                    break
                found = (self.index[h], depth + 1)
            if found is None:
                return [], 0
            entry_id, blocks = found
            entry = self.entries[entry_id]
            self.entries.move_to_end(entry_id)
            start = blocks * BLOCK
            limit = min(len(entry.tokens), len(tokens) - 1)
            same = entry.tokens[start:limit] == tokens[start:limit]
            length = min(start + int(np.argmin(same)) if not same.all() else limit, limit)
            return [(k[:, :, :length], v[:, :, :length]) for k, v in entry.layers], length

    def record(self, reused: int) -> None:
        """Count a prefill that reused ``reused`` tokens (0: a miss)."""
        with self.lock:
            self.hits += reused > 0
            self.misses += reused == 0
            self.reused_tokens += reused

    def put(self, tokens: np.ndarray, layers: list[tuple[torch.Tensor, torch.Tensor]], root: str) -> None:
        """Keep a finished sequence's KV (``layers`` cover ``tokens``; copied here, so the batch's own
        tensors are not held)."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        hashes = self.chain(tokens, root)
        if size > self.budget or not hashes:
            return
        entry = Entry(tokens.copy(), [(k.clone(), v.clone()) for k, v in layers], hashes, size)
        with self.lock:
            entry_id, self.next_id = self.next_id, self.next_id + 1
            replaced = {self.index[h] for h in hashes if h in self.index}
            for h in hashes:
                self.index[h] = entry_id
            self.entries[entry_id] = entry
            self.bytes += size
            for old in replaced:  # dropped when the new entry now holds every block it held
                if all(self.index.get(h) != old for h in self.entries[old].hashes):
                    self._drop(old)
            while self.bytes > self.budget:
                self._drop(next(iter(self.entries)))
                self.evictions += 1

    def _drop(self, entry_id: int) -> None:
        entry = self.entries.pop(entry_id)
        self.bytes -= entry.size
        for h in entry.hashes:
            if self.index.get(h) == entry_id:
                del self.index[h]

    def stats(self) -> dict:
        with self.lock:
            return {
                "entries": len(self.entries),
                "bytes": self.bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "reused_tokens": self.reused_tokens,
            }
