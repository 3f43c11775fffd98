"""Where a rank's rows come from. A ``RowSource`` gives, for each epoch, this rank's optimizer steps (each
a list of micro-batches of rows), the same rows in the same order on every attempt, so a resumed stage
sees exactly what an uninterrupted one would. ``InMemorySteps`` (small data: read once, kept) is here;
the streamed source runs on Ray Data and lives with the rest of the Ray adapter (pipelines/train/on_ray.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from components.batching import group_rows
from pipelines.preprocess import shards_dataset
from pipelines.train.plan import StagePlan

Step = list[list[dict]]
"""One optimizer step on one rank: ``grad_accum`` micro-batches of rows."""


class RowSource(Protocol):
    def epoch(self, epoch: int) -> Iterator[Step]:
        """This rank's optimizer steps of ``epoch``, in order."""
        ...


def steps_of(rows: list[dict], plan: StagePlan, epoch: int, w: int) -> list[Step]:
    """Window ``w`` of an epoch's rows -> optimizer steps of ``grad_accum`` micro-batches. Grouped
    (group_by_modality): the window is sorted by (modality, frames, length) before it is cut (LLaVA's
    megabatch grouping; see benchmarks/padding.py), and the micro-batches are dealt to steps in an order
    seeded by the stage seed, the epoch and the window."""
    micro_batch = plan.stage.micro_batch
    n_steps = len(rows) // plan.rows_per_step
    rows = rows[: n_steps * plan.rows_per_step]
    count = n_steps * plan.grad_accum
    if plan.stage.group_by_modality:
        micro = group_rows(rows, micro_batch, count)
        random.Random(plan.recipe.seed + 1000 * epoch + w).shuffle(micro)
    else:
        micro = [rows[i * micro_batch : (i + 1) * micro_batch] for i in range(count)]
    return [micro[s * plan.grad_accum : (s + 1) * plan.grad_accum] for s in range(n_steps)]


def shard_batches(uri: str, columns: list[str] | None = None):
    """Record batches of the Parquet shards under a URI (local or s3://), read with pyarrow."""
    return shards_dataset(uri).to_batches(batch_size=1024, columns=columns)


def own_rows(batches: Callable[[], Iterable], rank: int, world: int, count: int) -> list[dict]:
    """Small data: a rank's rows, those at positions rank, rank+W, ... of the mixture (the ``position``
    preprocessing wrote: the order of (dataset, index), whatever order its tasks wrote the files in), in
    that order, the first ``count``. Every rank gets the same mix of a mixture's datasets."""
    mine = []
    for batch in batches():
        keep = [i for i, p in enumerate(batch.column("position").to_pylist()) if p % world == rank]
        if keep:
            mine.extend(batch.take(keep).to_pylist())
    return sorted(mine, key=lambda r: r["position"])[:count]


class InMemorySteps:
    """Small data: every rank reads the shards once and keeps its rows; each epoch reshuffles them (seeded
    by the stage seed, the epoch and the rank, so a resumed attempt sees the same windows)."""

    def __init__(self, plan: StagePlan, rank: int, world: int):
        self.plan, self.rank = plan, rank
        self.rows = own_rows(lambda: shard_batches(plan.layout.data), rank, world, plan.rows_per_rank)

    def epoch(self, epoch: int) -> Iterator[Step]:
        rows = list(self.rows)
        random.Random(f"{self.plan.recipe.seed}:{epoch}:{self.rank}").shuffle(rows)
        windows = [rows[i : i + self.plan.window] for i in range(0, len(rows), self.plan.window)]
        for w, window in enumerate(windows):
            yield from steps_of(window, self.plan, epoch, w)
