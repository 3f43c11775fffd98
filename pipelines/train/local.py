"""A stage in this process on one rank, with no Ray (``llava-ray run --local``, tests, the GPU machine):
the same StageWorker, a process group of this process alone, checkpoints under ``root/<step>`` through the
URI layer (a local directory or s3://), resumed from the newest complete one. ``LocalContext`` also serves
each of several gloo rank processes that share ``root`` (tests and benchmarks of other world sizes)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist

from components import storage
from components.progress import ProgressPrinter
from pipelines.train.plan import StagePlan
from pipelines.train.worker import StageWorker, StepHook


def join_local_group(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    """Rank ``rank`` of a process group of ``world`` processes on this machine, rendezvous on
    127.0.0.1:``port`` (the environment DeepSpeed reads set to match)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    dist.init_process_group(backend, rank=rank, world_size=world)


def init_one_rank_group(cuda: bool) -> bool:
    """A process group of this process alone on 127.0.0.1 (NCCL on a GPU, gloo on the CPU); True when it
    made one, False when one already exists (DeepSpeed keeps the group it first saw, so it is made once
    and kept for the process)."""
    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if cuda:
        torch.cuda.set_device(0)
    join_local_group(0, 1, port, "nccl" if cuda else "gloo")
    return True


class LocalContext:
    """The rank context of one process: checkpoints go to ``root/<step>``, published with a manifest."""

    ends_process = False

    def __init__(self, root: str, rank: int = 0, world: int = 1, printer: ProgressPrinter | None = None):
        self.root, self.rank, self.world = storage.absolute(root), rank, world
        self.printer = printer

    def note(self, phase: str) -> None:
        if self.printer is not None:
            self.printer.phase(phase)

    def stalled(self, message: str) -> None:
        """Nothing to end: this process is the caller's; the watchdog raises StageStalled in the rank."""

    def checkpoints(self) -> list[int]:
        """Steps with a complete (published) checkpoint, oldest first."""
        steps = {rel.split("/")[0] for rel in storage.list_files(self.root)}
        done = [int(s) for s in steps if s.isdigit() and storage.is_complete(storage.join(self.root, s))]
        return sorted(done)

    @contextlib.contextmanager
    def resume_dir(self):
        done = self.checkpoints()
        if not done:
            yield None
            return
        with tempfile.TemporaryDirectory() as scratch:  # s3:// is copied here; a local path is used in place
            yield storage.download_dir(storage.join(self.root, str(done[-1])), scratch)

    def report(self, metrics: dict, directory: str) -> None:
        """Every rank's files under ``root/<step>``; with several ranks, rank 0 publishes one manifest of
        them all once every rank has written."""
        target = storage.join(self.root, str(metrics["step"]))
        if self.world == 1:
            storage.upload_dir(directory, target)
            return
        record = storage.upload_dir(directory, target, manifest=False)
        records: list = [None] * self.world
        dist.all_gather_object(records, record["files"])
        if self.rank == 0:
            files = {k: v for r in records for k, v in r.items()}
            storage.write_text(storage.join(target, storage.MANIFEST), json.dumps({"files": files}, indent=1))
        dist.barrier()

    def progress(self, record: dict) -> None:
        if self.printer is not None:
            self.printer.update(record)

    def interruption(self, plan: StagePlan) -> None:
        """No scheduler ends a local attempt: nothing to prepare for."""
        return None

    def row_source(self, plan: StagePlan):
        raise ValueError(
            f"stage {plan.stage.name}: a local run has no Ray Data to stream with: expected data_mode "
            f"memory or auto, found {plan.stage.data_mode}"
        )


def fit_here(
    plan: StagePlan, step_hooks: Sequence[StepHook] = (), printer: ProgressPrinter | None = None
) -> str | None:
    """The stage in this process, one rank, no Ray Train; returns its last checkpoint's URI. The caller's
    torch thread count is restored afterwards."""
    init_one_rank_group(plan.recipe.use_gpu)
    context = LocalContext(storage.join(plan.layout.checkpoints, "local"), printer=printer)
    threads = torch.get_num_threads()
    try:
        StageWorker(plan, context, step_hooks).train()
    finally:
        torch.set_num_threads(threads)
    done = context.checkpoints()
    return storage.join(context.root, str(done[-1])) if done else None
