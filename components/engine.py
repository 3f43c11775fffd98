"""Iteration-level batching: one loop owns the model and, at every decode step, admits waiting requests
and advances every active sequence by one token.

The batch is one left-padded key/value cache (TGI's first engine did the same for plain transformers
models): a new request is prefilled alone (its media encoded, or taken from the feature cache) and its
cache concatenated onto the batch's; a finished sequence is filtered out at once and the padding columns
no row needs any more are dropped. Each row keeps its own positions, so its attention and rotary
positions are those it would have alone: greedy output equals ``generate()`` on the request alone.
Sampling is per request (temperature, top_p, and a generator seeded by the request's seed), so a seeded
request samples the same text whatever it shares the batch with. Streamed and non-streamed requests share
the batch; their tokens leave through ``emit``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from components.batching import to_device
from components.conversation import IGNORE_INDEX
from components.feature_cache import features_fingerprint
from components.processor import LlavaProcessor, Prompt

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests wait beyond the batch than the queue holds: the caller answers 429."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(
            f"queue: expected at most {limit} waiting requests, found {waiting} (the queue is full)"
        )
        self.waiting, self.limit = waiting, limit


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    """Sequences decoded together at most."""
    max_batch_tokens: int = 8192
    """The most prompt + max_tokens of all active sequences together (a request needing more than this
    alone runs when the batch is empty)."""
    max_queue: int = 64
    """Requests waiting for a place in the batch at most; past it, ``submit`` raises QueueFull."""


@dataclasses.dataclass
class Job:
    """One request to the engine: its collate row (``LlavaProcessor.prompt_row``), its sampling, and where
    its events go. ``emit`` gets ``{"delta": text}`` while it streams, then one ``{"done": result}`` (the
    result as ``generate()`` gives it) or ``{"error": exception}``; it is called from the engine's thread."""

    row: dict
    max_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    media_keys: tuple[str, ...] = ()
    """The digest of each medium's bytes, in order; empty: its features are not cached."""
    logprobs: bool = False
    """Also return each chosen token's log-probability (``token_logprobs``), OpenAI's ``logprobs``."""
    cancelled: bool = False
    """Set by the caller that gave up (a client gone): the engine drops it at its next step, silently."""

    @property
    def budget(self) -> int:
        return len(self.row["input_ids"]) + self.max_tokens


class Detokenizer:
    """A sequence's text, decoded as its tokens come, in time independent of the answer's length.

    Each step decodes only a short window: the tokens since the text last ended on a whole character, and
    the ones before them back to the previous such point, as context (vLLM's and TGI's scheme). The
    context matters for tokenizers that space a word by its left neighbour (SentencePiece's "▁", stripped
    at the start of a decode): the new text is what the window adds beyond its context. A window that ends
    in an incomplete character (a U+FFFD) waits for the bytes still to come, 4 tokens at most. Decoding
    the whole answer at every step instead costs O(n) a token, O(n^2) an answer.

    For valid UTF-8 the text equals the tokenizer's decode of all the tokens. Not for an invalid byte run
    under a byte-fallback tokenizer (Llama's): its decoder turns the whole run into U+FFFD, valid
    characters in it included, where the window has already shown them. So the engine takes an answer's
    final text from one decode of all its tokens, and this text only for what streams before."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.start = 0
        """The window's first token: context only, its text already in ``text``."""
        self.read = 0
        """Tokens before this one are in ``text``."""

    def add(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (the sequence's tokens so far, the newest last) as far as it ends on a
        whole character."""
        window = self.tokenizer.decode(tokens[self.start :], skip_special_tokens=True)
        context = self.tokenizer.decode(tokens[self.start : self.read], skip_special_tokens=True)
        whole = len(window) > len(context) and not window.endswith("\ufffd")
        # a character is at most 4 bytes and a token at least one: past 4 tokens without a whole character,
        # what the window shows is final (invalid bytes, skipped specials); shown, so that a model stuck on
        # stray bytes neither stops streaming nor widens the window for ever
        if whole or len(tokens) - self.read > 4:
            self.text += window[len(context) :]
            self.start, self.read = self.read, len(tokens)
        return self.text


class _Sequence:
    """An active request: its tokens so far, its text, its sampler, and what it has streamed."""

    def __init__(self, job: Job, stops: list[str], eos: set[int], tokenizer):
        self.job = job
        self.tokens: list[int] = []
        self.text = Detokenizer(tokenizer)
        self.stops = stops
        self.eos = eos
        self.sent = 0
        self.finish: str | None = None
        self.logprobs: list[float] = []
        self.generator = None
        if job.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(job.seed if job.seed is not None else torch.seed())

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (float32): argmax, or a sample after temperature and top-p
        (HF's order and rule: keep the smallest set whose probability reaches top_p, at least one)."""
        if self.generator is None:
            return int(torch.argmax(logits))
        scores = logits.float() / self.job.temperature
        if self.job.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.job.top_p
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))


class Engine:
    """The scheduler loop of one model replica (``start()`` runs it in a daemon thread)."""

    def __init__(self, model, processor: LlavaProcessor, config: EngineConfig | None = None, features=None):
        self.model = model
        self.processor = processor
        self.config = config or EngineConfig()
        self.features = features
        """A FeatureCache (components/feature_cache.py) or None: media features reused across requests."""
        self.tokenizer = processor.tokenizer
        self.eos = set(processor.stop_ids)
        self.settings = processor.config.to_dict()
        self.weights = features_fingerprint(model) if features is not None else ""
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[_Sequence] = []
        self.cache = None
        self.mask = None
        self.positions = None
        self.last = None
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.steps = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)
        """The number of sequences of each recent decode step (operators and tests read it)."""

    # ---- the outside: submit, and the loop's thread ----------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a request; raises QueueFull when ``max_queue`` already wait beyond the batch's free places
        (those that will join at the next step are not counted as waiting)."""
        with self.cond:
            free = max(0, self.config.max_batch_size - len(self.active))
            if len(self.waiting) - free >= self.config.max_queue:
                raise QueueFull(len(self.waiting) - free + 1, self.config.max_queue)
            self.waiting.append(job)
            self.cond.notify()

    def start(self) -> Engine:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def stats(self) -> dict:
        with self.cond:
            return {
                "steps": self.steps,
                "active": len(self.active),
                "waiting": len(self.waiting),
                "batch_sizes": list(self.batch_sizes),
            }

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.waiting and not self.active:
                    self.cond.wait()
                if not self.running:
                    return
            try:
                self.step()
            except Exception as e:  # a failure of the batch: every active request gets it, the loop goes on
                log.exception("engine step failed")
                for seq in self.active:
                    seq.job.emit({"error": e})
                self._reset()

    def row(self, prompt: Prompt, digests: tuple[str, ...] = ()) -> dict:
        """The request's collate row (call it off the engine's thread: it tiles). With a feature cache and
        the media's digests: when every medium's features are cached, a row of ids alone that carries them
        (no decoding, no tiling, no encoding); otherwise the full row (media decoded here, off the
        engine's thread), whose features the prefill will keep."""
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

    # ---- one iteration ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Admit what fits, then one decode step for every active sequence."""
        for seq in self.active:
            if seq.job.cancelled:
                seq.finish = "cancelled"
        self._drop_finished()
        for job in self._admissible():
            try:
                self._admit(job)
            except Exception as e:  # its own failure only (a bad medium, a model error on its prompt)
                log.exception("prefill failed")
                job.emit({"error": e})
        if not self.active:
            return
        self.batch_sizes.append(len(self.active))
        self.steps += 1
        ones = torch.ones((len(self.active), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out = self.model(
            input_ids=self.last,
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        logits = out.logits[:, -1].float()
        for i, seq in enumerate(self.active):
            self._advance(seq, logits[i])
        self._drop_finished()

    def _admissible(self) -> list[Job]:
        """Waiting requests that fit the batch now, in arrival order (the first one always, alone)."""
        taken = []
        with self.cond:
            used = sum(s.job.budget for s in self.active)
            while self.waiting and len(self.active) + len(taken) < self.config.max_batch_size:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    continue
                if (self.active or taken) and used + job.budget > self.config.max_batch_tokens:
                    break
                taken.append(self.waiting.popleft())
                used += job.budget
        return taken

    def _admit(self, job: Job) -> None:
        """Prefill alone (exactly the batch ``generate()`` would run for it), then join the batch."""
        stops = [s for s in [self.processor.template.stop, *job.stop] if s]
        seq = _Sequence(job, stops, self.eos, self.tokenizer)
        batch = self.processor.collate([job.row], left_pad=True)
        batch.pop("labels")
        batch = to_device(batch, self.model.device, self.model.dtype)
        if "features" in job.row:  # cached: the model scatters them where its media tokens are
            kind, tensors = job.row["features"]
            tensors = [t.to(self.model.device, self.model.dtype) for t in tensors]
            pooled = tensors if kind == "image" else torch.stack(tensors)
            batch["mm_encoder_outputs"] = {kind: BaseModelOutputWithPooling(pooler_output=pooled)}
            out = self.model(**batch, use_cache=True, logits_to_keep=1)
        elif "feature_keys" in job.row and self.features is not None:
            kind, keys = job.row["feature_keys"]
            with _captured(self.model.model, kind) as seen:
                out = self.model(**batch, use_cache=True, logits_to_keep=1)
            per_medium = list(seen[0].pooler_output) if seen else []
            if len(per_medium) == len(keys):  # not when the architecture added a partner image of its own
                self.features.put(keys, per_medium)
        else:
            out = self.model(**batch, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if batch["attention_mask"].shape[0] > 1:  # a partner row the architecture needed (complete_batch)
            cache.batch_select_indices(torch.tensor([0]))
        n = int(batch["attention_mask"][0].sum())
        self._join(seq, cache, n)
        self._advance(seq, out.logits[0, -1].float())
        self._drop_finished()

    def _join(self, seq: _Sequence, cache, length: int) -> None:
        """The new row's cache onto the batch's, both left-padded to the longer of the two."""
        device = self.model.device
        if not self.active:
            self.cache = cache
            self.mask = torch.ones((1, length), dtype=torch.long, device=device)
            self.positions = torch.tensor([length], device=device)
            self.last = torch.zeros((1, 1), dtype=torch.long, device=device)
            self.active = [seq]
            return
        width = max(self.mask.shape[1], length)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        mask = torch.ones((1, length), dtype=self.mask.dtype, device=device)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.positions = torch.cat([self.positions, torch.tensor([length], device=device)])
        self.last = torch.cat([self.last, torch.zeros((1, 1), dtype=torch.long, device=device)])
        self.active.append(seq)

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> None:
        token = seq.pick(logits)
        if seq.job.logprobs:
            seq.logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        row = self.active.index(seq)
        self.last[row, 0] = token
        finish = None
        if token in seq.eos:
            finish = "stop"
        else:
            seq.tokens.append(token)
        if finish is None and len(seq.tokens) >= seq.job.max_tokens:
            finish = "length"
        seen = len(seq.text.text)
        text = seq.text.add(seq.tokens)
        cut = _first_stop(text, seq.stops, since=seen)
        if cut is not None:
            finish = "stop"
        if finish:  # the whole answer decoded once, as generate()'s caller decodes it
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            cut = _first_stop(text, seq.stops)
            text = text if cut is None else text[:cut]
        if seq.job.stream:
            ready = len(text) if finish else _safe_prefix(text, seq.stops)
            if ready > seq.sent:
                seq.job.emit({"delta": text[seq.sent : ready]})
                seq.sent = ready
        if finish:
            seq.finish = finish
            seq.job.emit(
                {
                    "done": {
                        "text": text.strip(),
                        "prompt_tokens": len(seq.job.row["input_ids"]),
                        "completion_tokens": len(seq.tokens),
                        "finish_reason": finish,
                        **({"token_logprobs": seq.logprobs} if seq.job.logprobs else {}),
                    }
                }
            )

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.active) if s.finish is None]
        if len(keep) == len(self.active):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        self.active = [self.active[i] for i in keep]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row attends to
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def _reset(self) -> None:
        self.active, self.cache, self.mask, self.positions, self.last = [], None, None, None, None


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


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` padded with zeros on the left of ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _first_stop(text: str, stops: list[str], since: int = 0) -> int | None:
    """Where the first stop string in ``text`` begins (None: there is none), looking only at those that
    end past ``since`` (a stop string that ended earlier would have ended the sequence then)."""
    found = (text.find(stop, max(0, since - len(stop) + 1)) for stop in stops)
    return min((i for i in found if i >= 0), default=None)


def _safe_prefix(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be streamed: all but a tail that could begin a stop string, and never a
    half-decoded character: a last U+FFFD may be the start of a character whose other bytes are still to
    come (an incomplete UTF-8 sequence decodes to one U+FFFD); any earlier one is final."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    held = max(
        (
            k
            for stop in stops
            for k in range(1, min(len(stop) - 1, end) + 1)
            if text[end - k : end] == stop[:k]
        ),
        default=0,
    )
    return end - held


def wait_for(engine: Engine, job_kwargs: dict, timeout: float = 600.0) -> dict:
    """Submit one request and block until its result (for tests, evaluation and benchmarks)."""
    done = threading.Event()
    result: dict = {}

    def emit(event: dict) -> None:
        if "done" in event or "error" in event:
            result.update(event)
            done.set()

    engine.submit(Job(emit=emit, **job_kwargs))
    if not done.wait(timeout):
        raise TimeoutError(f"engine: expected a result within {timeout} s, found none")
    if "error" in result:
        raise result["error"]
    return result["done"]
