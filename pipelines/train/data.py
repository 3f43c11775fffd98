"""Where a rank's rows come from. A ``RowSource`` gives, for each epoch, this rank's optimizer steps (each
a list of micro-batches of rows), the same rows in the same order on every attempt, so a resumed stage
sees exactly what an uninterrupted one would. The epoch's global steps are cut without the world size;
each rank then takes its share of every step, so a stage sees the same steps at any world size.
``InMemorySteps`` (small data: read once, kept) is here; the streamed source runs on Ray Data and lives
with the rest of the Ray adapter (pipelines/train/on_ray.py).
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


def global_steps(rows: list[dict], plan: StagePlan, epoch: int, w: int) -> list[list[list[dict]]]:
    """Window ``w`` of an epoch's rows -> its global optimizer steps, each the plan's
    ``micro_batches_per_step`` micro-batches (every rank's together). Nothing here depends on the world
    size: which rows make up a step is a function of the rows, the stage seed, the epoch and the window.
    Grouped (group_by_modality): the window is sorted by (modality, frames, length) before it is cut
    (LLaVA's megabatch grouping; see benchmarks/padding.py), and the micro-batches are dealt to steps in an
    order seeded by the stage seed, the epoch and the window."""
    micro_batch, per_step = plan.stage.micro_batch, plan.micro_batches_per_step
    n_steps = len(rows) // plan.global_rows
    rows = rows[: n_steps * plan.global_rows]
    count = n_steps * per_step
    if plan.stage.group_by_modality:
        micro = group_rows(rows, micro_batch, count)
        random.Random(plan.recipe.seed + 1000 * epoch + w).shuffle(micro)
    else:
        micro = [rows[i * micro_batch : (i + 1) * micro_batch] for i in range(count)]
    return [micro[s * per_step : (s + 1) * per_step] for s in range(n_steps)]


def rank_share(step: list[list[dict]], rank: int, world: int) -> Step:
    """The micro-batches of a global step that ``rank`` of ``world`` trains on: its virtual shards, slots
    rank, rank+W, ... (``micro_batches_per_step / W`` of them, the rank's accumulation)."""
    if len(step) % world:
        raise ValueError(
            f"a step of {len(step)} micro-batches cannot be shared by {world} ranks: expected a world size "
            f"that divides {len(step)}"
        )
    return step[rank::world]


def shard_batches(uri: str, columns: list[str] | None = None):
    """Record batches of the Parquet shards under a URI (local or s3://), read with pyarrow."""
    return shards_dataset(uri).to_batches(batch_size=1024, columns=columns)


def all_rows(batches: Callable[[], Iterable]) -> list[dict]:
    """Small data: every row, in the mixture's order (the ``position`` preprocessing wrote: the order of
    (dataset, index), whatever order its tasks wrote the files in)."""
    rows = [r for batch in batches() for r in batch.to_pylist()]
    return sorted(rows, key=lambda r: r["position"])


class InMemorySteps:
    """Small data: every rank reads the shards once and keeps every row (a step's rows depend on the epoch's
    order alone, not on the rank); each epoch reshuffles them, seeded by the stage seed and the epoch, so
    every world size and every resumed attempt sees the same global steps; the rank trains on its share."""

    def __init__(self, plan: StagePlan, rank: int, world: int):
        self.plan, self.rank, self.world = plan, rank, world
        self.rows = all_rows(lambda: shard_batches(plan.layout.data))

    def epoch(self, epoch: int) -> Iterator[Step]:
        plan = self.plan
        rows = list(self.rows)
        random.Random(f"{plan.recipe.seed}:{epoch}").shuffle(rows)
        rows = rows[: plan.rows_per_epoch]
        windows = [rows[i : i + plan.window] for i in range(0, len(rows), plan.window)]
        for w, window in enumerate(windows):
            for step in global_steps(window, plan, epoch, w):
                yield rank_share(step, self.rank, self.world)
