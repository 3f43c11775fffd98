"""The batch the engine decodes: one left-padded key/value cache for every active sequence (TGI's first
engine did the same for plain transformers models), with each row's attention mask, next position and
last token. It owns the four together, so they change in one place: a new sequence is ``concatenate``d
(its prefilled cache padded to the batch's width or the batch's to its), finished ones are ``filter``ed
out (and padding columns no row needs any more dropped), and ``forward`` runs one decode step. Each row
keeps its own positions, so its attention and rotary positions are those it would have alone.

Invariant, checked after every change: the cache, the mask, the positions, the last tokens and the
sequences each have one row per active sequence, and the cache is as wide as the mask."""

from __future__ import annotations

import copy

import torch


class DecodeBatch:
    def __init__(self, device: torch.device):
        self.device = device
        self.sequences: list = []
        """What each row decodes for (the engine's sequences), in row order."""
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        """The token each row feeds the next step (its newest)."""

    def __len__(self) -> int:
        return len(self.sequences)

    def concatenate(self, sequence, cache, mask: torch.Tensor) -> None:
        """Add a sequence whose prompt was prefilled alone into ``cache``; ``mask``: its attention mask row
        (1, width), ones where its tokens are (left padding where its prefill batch had a longer row)."""
        mask = mask.to(device=self.device, dtype=torch.long).reshape(1, -1)
        position = mask.sum(1)
        last = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        if not self.sequences:
            self.cache, self.mask, self.positions, self.last = cache, mask, position, last
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
            self.positions = torch.cat([self.positions, position])
            self.last = torch.cat([self.last, last])
        self.sequences.append(sequence)
        self.check()

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in that order); the leading padding no kept row attends to goes."""
        if len(keep) == len(self.sequences):
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        self.sequences = [self.sequences[i] for i in keep]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row attends to
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        self.check()

    def row_kv(self, row: int) -> list:
        """(keys, values) of every layer for ``row``'s own tokens (its mask's ones: the right end)."""
        n = int(self.mask[row].sum())
        return [
            (layer.keys[row : row + 1, :, -n:], layer.values[row : row + 1, :, -n:])
            for layer in self.cache.layers
        ]

    def set_last(self, row: int, token: int) -> None:
        self.last[row, 0] = token

    def forward(self, model) -> torch.Tensor:
        """One decode step of every row: the next-token logits (float32), one row per sequence."""
        ones = torch.ones((len(self.sequences), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out = model(
            input_ids=self.last,
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        self.check()
        return out.logits[:, -1].float()

    def clear(self) -> None:
        self.sequences, self.cache, self.mask, self.positions, self.last = [], None, None, None, None

    def check(self) -> None:
        """Raise when the structures disagree on the rows (a bug in the engine, never the request's)."""
        n = len(self.sequences)
        rows = {
            "mask": self.mask.shape[0],
            "positions": self.positions.shape[0],
            "last": self.last.shape[0],
            **{f"cache layer {i}": layer.keys.shape[0] for i, layer in enumerate(self.cache.layers)},
        }
        wrong = {k: v for k, v in rows.items() if v != n}
        width = self.cache.layers[0].keys.shape[2]
        if wrong or width != self.mask.shape[1]:
            raise AssertionError(
                f"decode batch: expected {n} rows everywhere and a cache as wide as the mask "
                f"({self.mask.shape[1]}), found rows {wrong or 'agreeing'} and width {width}"
            )


def copied(cache):
    """An independent copy of a one-row KV cache (a choice forked from a shared prefill), layer kinds
    (sliding windows) included."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    return out


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` padded with zeros on the left of ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
