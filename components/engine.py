"""The serving engine of one model replica: a loop that owns the model and, at every decode step, admits
waiting requests and advances every active sequence by one token. Its parts, each with one job:

- ``Scheduler`` (components/scheduler.py): who waits, who is admitted within the batch's budgets, and
  the bounded queue beyond them (``QueueFull``: 429);
- ``Prefill`` (components/prefill.py): a new request prefilled alone, its media's features from the
  feature cache or kept in it, and only its tokens after the longest prefix whose KV an earlier turn
  left in the prefix cache (components/prefix_cache.py), where a finished sequence's KV goes;
- ``DecodeBatch`` (components/decode_batch.py): the active sequences' left-padded KV cache, masks and
  positions, concatenated, filtered and stepped together;
- ``Sequence`` (components/decode_output.py): picking each token (within the request's response_format
  grammar, components/structured.py), detokenizing, stops, emitting; a request's ``n`` choices are ``n``
  sequences forked from its one prefill.

Greedy output equals ``generate()`` on the request alone: a request is prefilled alone, and each row of
the batch keeps its own positions. Sampling is per request (temperature, top_p, and a generator seeded by
the request's seed), so a seeded request samples the same text whatever it shares the batch with.
Streamed and non-streamed requests share the batch; their tokens leave through ``emit``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

from components.decode_batch import DecodeBatch, copied
from components.decode_output import Sequence
from components.feature_cache import FeatureCache
from components.prefill import Prefill
from components.prefix_cache import PrefixCache
from components.processor import LlavaProcessor, Prompt
from components.scheduler import EngineConfig, QueueFull, Scheduler
from components.structured import Grammars

__all__ = ["Engine", "EngineConfig", "Job", "QueueFull", "wait_for"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    """One request to the engine: its collate row (``Engine.row``), its sampling, and where its events go.
    ``emit`` gets ``{"delta": text}`` while it streams, then one ``{"done": result}`` (the result as
    ``generate()`` gives it) or ``{"error": exception}``; it is called from the engine's thread."""

    row: dict
    max_new_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    logprobs: bool = False
    """Also return each chosen token's log-probability (``token_logprobs``), OpenAI's ``logprobs``."""
    n: int = 1
    """Choices: ``n`` sequences forked from one prefill (each event carries its ``index``)."""
    grammar: str | None = None
    """An llguidance grammar (components/structured.py's grammar_for) each choice's tokens must follow."""
    cancelled: bool = False
    """Set by the caller that gave up (a client gone): the engine drops it at its next step, silently."""

    @property
    def budget(self) -> int:
        """Batch tokens its choices may hold: each its prompt and max_new_tokens."""
        return self.n * (len(self.row["input_ids"]) + self.max_new_tokens)


class Engine:
    """The loop of one model replica (``start()`` runs it in a daemon thread)."""

    def __init__(
        self,
        model,
        processor: LlavaProcessor,
        config: EngineConfig | None = None,
        features: FeatureCache | None = None,
        prefix: PrefixCache | None = None,
    ):
        self.model, self.processor = model, processor
        self.config = config or EngineConfig()
        self.features = features
        """A FeatureCache or None: media features reused across requests."""
        self.prefix = prefix
        """A PrefixCache or None: finished turns' KV, reused by the turns that follow them."""
        self.prefill = Prefill(model, processor, features, prefix)
        self.grammars = Grammars(processor.tokenizer, processor.stop_ids)
        self.scheduler = Scheduler(self.config)
        self.batch = DecodeBatch(model.device)
        self.eos = set(processor.stop_ids)
        self.running = False
        self.thread: threading.Thread | None = None
        self.steps = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=4096)
        """The number of sequences of each recent decode step (operators and tests read it)."""

    # ---- the outside: submit, and the loop's thread ----------------------------------------------

    def row(self, prompt: Prompt, digests: tuple[str, ...] = ()) -> dict:
        """A request's collate row, its media's features from the cache where seen (off the loop's thread:
        it tiles)."""
        return self.prefill.row(prompt, digests)

    def submit(self, job: Job) -> None:
        """Queue a request (QueueFull past ``max_queue`` waiting beyond the batch's free places)."""
        self.scheduler.submit(job, active=len(self.batch))

    def start(self) -> Engine:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.scheduler.cond:
            self.running = False
            self.scheduler.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def stats(self) -> dict:
        with self.scheduler.cond:
            return {
                "steps": self.steps,
                "active": len(self.batch),
                "waiting": len(self.scheduler),
                "batch_sizes": list(self.batch_sizes),
                "prefilled_tokens": self.prefill.prefilled_tokens,
            }

    def _loop(self) -> None:
        cond = self.scheduler.cond
        while True:
            with cond:
                while self.running and not len(self.scheduler) and not len(self.batch):
                    cond.wait()
                if not self.running:
                    return
            try:
                self.step()
            except Exception as e:  # a failure of the batch: every active request gets it, the loop goes on
                log.exception("engine step failed")
                for seq in self.batch.sequences:
                    seq.job.emit({"error": e})
                self.batch.clear()

    # ---- one iteration ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Admit what fits, then one decode step for every active sequence."""
        for seq in self.batch.sequences:
            if seq.job.cancelled:
                seq.finish = "cancelled"
        self._drop_finished()
        active = list({id(s.job): s.job for s in self.batch.sequences}.values())
        for job in self.scheduler.admissible(active):
            try:
                self._admit(job)
            except Exception as e:  # its own failure only (a bad medium, a model error on its prompt)
                log.exception("prefill failed")
                job.emit({"error": e})
        if not len(self.batch):
            return
        self.batch_sizes.append(len(self.batch))
        self.steps += 1
        logits = self.batch.forward(self.model)
        for row, seq in enumerate(self.batch.sequences):
            self.batch.set_last(row, seq.advance(logits[row]))
        self._drop_finished()

    def _admit(self, job: Job) -> None:
        """Prefill alone; each of its n choices joins the batch (on its own copy of the prompt's KV) and
        picks its first token."""
        stops = [s for s in [self.processor.template.stop, *job.stop] if s]
        sequences = [
            Sequence(
                job,
                stops,
                self.eos,
                self.processor.tokenizer,
                index=i,
                matcher=None if job.grammar is None else self.grammars.matcher(job.grammar),
            )
            for i in range(job.n)
        ]
        cache, mask, logits, reused = self.prefill(job.row)
        for i, seq in enumerate(sequences):
            seq.cached_tokens = reused
            self.batch.concatenate(seq, cache if i == job.n - 1 else copied(cache), mask)
            self.batch.set_last(len(self.batch) - 1, seq.advance(logits))
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = []
        for i, seq in enumerate(self.batch.sequences):
            if seq.finish is None:
                keep.append(i)
            elif (
                seq.finish != "cancelled"
                and self.prefix is not None
                and seq.job.row.get("tokens") is not None
            ):
                self._keep_kv(i, seq)
        self.batch.filter(keep)

    def _keep_kv(self, row: int, seq: Sequence) -> None:
        """The finished sequence's KV (its prompt and every generated token but the last, which was never
        fed) into the prefix cache, for the conversation's next turn."""
        layers = self.batch.row_kv(row)
        covered = layers[0][0].shape[2]
        tokens = np.concatenate([seq.job.row["tokens"], np.asarray(seq.tokens, dtype=np.int64)])[:covered]
        self.prefill.keep(tokens, layers)


def wait_for(engine: Engine, job_kwargs: dict, timeout: float = 600.0) -> dict:
    """Submit one request and block until its result (for tests, evaluation and benchmarks); with n > 1,
    the first choice's result with every choice's in ``choices``."""
    done = threading.Event()
    results: dict[int, dict] = {}
    n = job_kwargs.get("n", 1)

    def emit(event: dict) -> None:
        if "done" in event or "error" in event:
            results[event.get("index", 0)] = event
            if "error" in event or len(results) == n:
                done.set()

    engine.submit(Job(emit=emit, **job_kwargs))
    if not done.wait(timeout):
        raise TimeoutError(f"engine: expected a result within {timeout} s, found none")
    for event in results.values():
        if "error" in event:
            raise event["error"]
    choices = [results[i]["done"] for i in range(n)]
    return {**choices[0], "choices": choices} if n > 1 else choices[0]
