"""Faults the tests inject into a stage through its step-hook seam (``train_stage(..., hooks=...)``): each
runs on every rank after each optimizer step (and its checkpoint, when one is due) as hook(step, rank).
Pickled by value, so a Ray worker on any node runs them without importing the tests."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from ray import cloudpickle

from components import storage
from pipelines.train.ray_private import wait_until_registered

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class PauseOnce:
    """Every rank stops for ``seconds`` right after ``step`` and its checkpoint (registered by Ray Train's
    controller, when under it), unless ``marker`` (a path or s3:// URI) exists; rank 0 writes it first. A
    test waits for the marker and then does something to the cluster (kills a node) at a known point."""

    step: int
    marker: str
    seconds: float

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or storage.exists(self.marker):
            return
        if rank == 0:
            wait_until_registered(step)
            storage.write_text(self.marker, str(time.time()))
        time.sleep(self.seconds)


@dataclass(frozen=True)
class HangOnce:
    """``rank`` stops making progress for ``seconds`` right after ``step`` (a hung worker: a lost peer, a
    stale lock), once per process."""

    step: int
    rank: int
    seconds: float

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank:
            time.sleep(self.seconds)


@dataclass(frozen=True)
class Slow:
    """Every rank waits ``seconds`` after every step: a tiny model's stage paced like a real one, so that a
    test can change the cluster while it runs."""

    seconds: float

    def __call__(self, step: int, rank: int) -> None:
        time.sleep(self.seconds)


@dataclass(frozen=True)
class HoldUntil:
    """Every rank waits right after ``step`` until ``marker`` (a path or s3:// URI) exists, at most
    ``seconds``: a stage held at a known step while a test changes the cluster (starts a node, drains
    one)."""

    step: int
    marker: str
    seconds: float

    def __call__(self, step: int, rank: int) -> None:
        end = time.monotonic() + self.seconds
        while step == self.step and not storage.exists(self.marker) and time.monotonic() < end:
            time.sleep(0.5)


@dataclass(frozen=True)
class HoldUntilNotice:
    """Every rank waits right after ``step`` until Ray Train's preemption watcher has seen a drain notice
    (``ray.train.get_preemption_info``: a barrier, so every rank asks as often as the others), at most
    ``seconds``: the ranks then notice it after the next step, whatever the watcher's poll interval."""

    step: int
    seconds: float

    def __call__(self, step: int, rank: int) -> None:
        import ray.train

        if step != self.step:
            return
        for _ in range(int(self.seconds)):  # a count, not a clock: every rank stops at the same call
            if ray.train.get_preemption_info() is not None:
                return
            time.sleep(1.0)
