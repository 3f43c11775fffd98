"""Who decodes next: the requests waiting for a place in the engine's batch, admitted in arrival order
within the batch's budgets (``EngineConfig``), and a bounded queue beyond them (``QueueFull``: the caller
answers 429)."""

from __future__ import annotations

import collections
import dataclasses
import threading


class QueueFull(RuntimeError):
    """More requests wait beyond the batch than the queue holds: the caller answers 429."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(
            f"queue: expected at most {limit} waiting requests, found {waiting} (the queue is full)"
        )
        self.waiting, self.limit = waiting, limit


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """A replica's batch and queue (serve/serve.yaml's ``engine:``)."""

    max_batch_size: int = 8
    """Sequences decoded together at most."""
    max_batch_tokens: int = 8192
    """The most prompt + max_new_tokens of all active sequences together (a request needing more than
    this alone runs when the batch is empty)."""
    max_queue: int = 64
    """Requests waiting for a place in the batch at most; past it, ``submit`` raises QueueFull."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"engine.{f.name}: expected a positive int, found {value!r}")


class Scheduler:
    """The waiting requests (anything with ``n``, ``budget`` and ``cancelled``) and the rule that admits them.
    Thread-safe: requests arrive from the server's threads, the engine's loop takes them; ``cond`` is
    notified whenever one arrives."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.waiting: collections.deque = collections.deque()
        self.cond = threading.Condition()

    def submit(self, job, active: int) -> None:
        """Queue a request; raises QueueFull when ``max_queue`` already wait beyond the batch's free places
        (``active`` sequences decode now; those that will join at the next step are not counted)."""
        with self.cond:
            free = max(0, self.config.max_batch_size - active)
            if len(self.waiting) - free >= self.config.max_queue:
                raise QueueFull(len(self.waiting) - free + 1, self.config.max_queue)
            self.waiting.append(job)
            self.cond.notify()

    def admissible(self, active: list) -> list:
        """Waiting requests that fit beside the active ones now (each ``n`` sequences of ``budget`` tokens
        in all), in arrival order; the first one always, alone. Cancelled ones are dropped on the way."""
        taken = []
        with self.cond:
            used = sum(job.budget for job in active)
            places = sum(job.n for job in active)
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    continue
                crowded = places + job.n > self.config.max_batch_size
                if (active or taken) and (crowded or used + job.budget > self.config.max_batch_tokens):
                    break
                taken.append(self.waiting.popleft())
                used += job.budget
                places += job.n
        return taken

    def __len__(self) -> int:
        return len(self.waiting)
