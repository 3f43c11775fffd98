"""A stage on Ray Train: the only module of the train stage that imports Ray (with ray_private.py, which
holds the private APIs it uses). The TorchTrainer and its workers' rank context, the streamed row source
(Ray Data every epoch), where the workers go, and the object store's size for the plan."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer, get_device
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from components import storage
from components.progress import ProgressPrinter
from pipelines.train.data import Step, global_steps, rank_share
from pipelines.train.net import bind_to_address
from pipelines.train.plan import StagePlan
from pipelines.train.ray_private import (
    draining_nodes,
    free_resources_per_node,
    refresh_train_view,
    torch_config_binding,
    wait_until_registered,
)
from pipelines.train.watchdog import STALL_EXIT, ProgressBoard, StageStalled, stall_message
from pipelines.train.worker import Interruption, StageWorker, StepHook

log = logging.getLogger(__name__)


def object_store_bytes() -> float:
    """The cluster's object store (the plan sizes ``auto`` data against it)."""
    return ray.cluster_resources().get("object_store_memory", 0)


class StreamedSteps:
    """Large data: each epoch streams the shards through Ray Data in the shards' order (files by name, rows
    as written; each window then in the mixture's order), the first ``rows_per_epoch`` rows, cut into
    global steps window by window; this rank keeps its share of each step. Every rank streams every row
    (a step's rows do not depend on the world size, so no rank can know its rows before the window is
    cut); the same steps on every attempt and at every world size, so a resume skips exactly the steps it
    has done."""

    def __init__(self, plan: StagePlan, rank: int, world: int):
        self.plan, self.rank, self.world = plan, rank, world

    def epoch(self, epoch: int) -> Iterator[Step]:
        ds = _read_shards(self.plan.layout.data)
        ds.context.execution_options.preserve_order = True  # this dataset only, not the process's context
        left = self.plan.rows_per_epoch
        for w, batch in enumerate(ds.iter_batches(batch_size=self.plan.window, batch_format="pyarrow")):
            # in the mixture's order within the window, whatever order preprocessing's tasks wrote it in
            rows = sorted(batch.to_pylist()[:left], key=lambda r: r["position"])
            left -= len(rows)
            for step in global_steps(rows, self.plan, epoch, w):
                yield rank_share(step, self.rank, self.world)
            if left <= 0:
                return


def _read_shards(uri: str) -> ray.data.Dataset:
    """The stage's prepared Parquet shards, through Ray Data's first Parquet datasource. Its second, the
    default in 2.60, starts a pool of 32 footer-reading actors for every read, that is for every epoch of
    every rank of every attempt: about 20 s before the first row on the rig's 2-core nodes (5 s on one
    idle machine), where the first reads the shards' few footers in the calling rank (0.3 s). Set for
    this call only: the switch is Ray Data's process-wide context."""
    fs, path = storage.resolve(uri)
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(path, filesystem=fs, shuffle=None)
    finally:
        context.use_datasource_v2 = v2


class RayTrainContext:
    """The rank context of a Ray Train worker: rank, world, the checkpoint to resume from, and reports."""

    ends_process = True

    def __init__(self, board=None):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.board = board
        self._room_checked = time.monotonic()
        self._noticed: tuple | None = None
        if board is not None:
            node = ray.get_runtime_context()
            board.place.remote(self.rank, node.get_node_id(), ray.util.get_node_ip_address(), time.time())

    def note(self, phase: str) -> None:
        if self.board is not None:
            self.board.note.remote(self.rank, phase, time.time())

    def stalled(self, message: str) -> None:
        """Record the stall on the board, print every thread's stack to the worker's log, end the worker
        (a thread cannot interrupt a rank blocked in C: a collective, a lock wait)."""
        print(f"llava-ray watchdog: {message}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        if self.board is not None:
            with contextlib.suppress(Exception):
                ray.get(self.board.stalled.remote(self.rank, message), timeout=10)
        os._exit(STALL_EXIT)

    @contextlib.contextmanager
    def resume_dir(self):
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict, directory: str) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def noticed(self, notice: Interruption, step: int) -> None:
        wait_until_registered(step)  # a report only queues its checkpoint: the attempt must not end first

    def progress(self, record: dict) -> None:
        if self.board is not None:
            self.board.progress.remote(record)

    def row_source(self, plan: StagePlan) -> StreamedSteps:
        return StreamedSteps(plan, self.rank, self.world)

    def interruption(self, plan: StagePlan) -> Interruption | None:
        """A preemption notice (Ray Train's own, agreed by every worker: ``ray drain-node --reason
        PREEMPTION`` or a cloud's reclaim), each notice once; for an elastic stage below its most workers,
        room for more on nodes not being drained (rank 0 counts, every rank is told).

        An elastic stage whose survivors still make its fewest workers ends the attempt on a notice, so
        the driver starts the next one on the other nodes at once: Ray Train itself would hold the group
        until the deadline (and a rank that ended with an error would be charged as a failure). Room for
        more (looked for every ``resize_check_s``) ends the attempt too, and the driver starts the next one
        larger: Ray Train's own resize of a running group is off, since it restarts the group whenever it
        sees the room, a checkpoint taken or not."""
        recipe = plan.recipe
        info = ray.train.get_preemption_info()
        if info is not None:
            key = (tuple(info.preempted_node_ids), info.deadline_ms)
            if key != self._noticed:
                self._noticed = key
                left = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else 60.0
                survivors = self.world - len(set(info.preempted_ranks))
                return Interruption(
                    f"preemption notice for rank(s) {info.preempted_ranks}, "
                    f"{max(0.0, left):.0f} s before the deadline",
                    wait_s=max(0.0, left) + PREEMPTION_GRACE_S,
                    ends_attempt=recipe.elastic and survivors >= recipe.min_workers,
                )
        if recipe.elastic and self.world < recipe.max_workers:
            due = self.rank == 0 and time.monotonic() - self._room_checked >= recipe.resize_check_s
            if due:
                self._room_checked = time.monotonic()
            count = _room_for_workers(recipe) if due else 0
            room = torch.tensor([count], device=get_device())  # the rank's: NCCL's group takes no CPU tensor
            torch.distributed.broadcast(room, src=0)
            fits = min(int(room.item()), recipe.max_workers - self.world)
            if fits > 0:
                return Interruption(f"room for {fits} more worker(s)", wait_s=0.0, ends_attempt=True)
        return None


PREEMPTION_GRACE_S = 30.0
"""How long past a notice's deadline a checkpointed rank waits to be restarted."""


def _room_for_workers(recipe) -> int:
    """How many more training workers the free resources of the nodes not being drained hold (Ray's
    scheduler may still place them elsewhere; a rough count, for the notice only)."""
    draining = draining_nodes()
    free = [r for node, r in free_resources_per_node().items() if node not in draining]
    return _workers_in(recipe, free)


def _workers_in(recipe, nodes: list[dict]) -> int:
    """How many training workers fit in these nodes' resources, node by node."""
    need = _bundle(recipe)
    return sum(min(int(r.get(k, 0.0) // v) for k, v in need.items() if v > 0) for r in nodes)


def _attempt_max(recipe) -> int:
    """The most workers the next attempt may have: the stage's most, unless a node is being drained; then
    those that fit on the live nodes not being drained (each node's whole resources: the last attempt's
    workers may not have given theirs back yet), at least the stage's fewest. Ray Train's elastic policy
    counts a draining node's resources until it is gone, and would start the group on it again. Only then
    capped: the cap is also what Ray Train asks an autoscaler for."""
    draining = draining_nodes()
    if not recipe.elastic or not draining:
        return recipe.max_workers
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in draining]
    return max(recipe.min_workers, min(recipe.max_workers, _workers_in(recipe, nodes)))


def train_loop(config: dict) -> dict | None:
    """Runs on every Ray Train worker; rank 0's answer is the attempt's (StageWorker.train)."""
    context = RayTrainContext(config.get("board"))
    return StageWorker(config["plan"], context, config.get("step_hooks", ())).train()


def _bind_here() -> dict[str, str]:
    """On a worker, before its process group forms: bind to the node's Ray address (train/net.py)."""
    return bind_to_address(ray.util.get_node_ip_address())


def _waited_in_python(fn: Callable[[], Any], every_s: Callable[[], None] = lambda: None) -> Any:
    """``fn()`` in a daemon thread, waited for in short joins, calling ``every_s()`` about once a second. A
    ``ray.get`` runs no signal handler until its object arrives, so a driver blocked in ``fit()`` would
    ignore Ctrl-C and a test's timeout for a whole stage; waiting here keeps this thread in Python, where
    both are handled."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # handed to the waiting thread
            out["error"] = e

    worker = threading.Thread(target=run, name="llava-ray-fit", daemon=True)
    worker.start()
    polled = time.monotonic()
    while worker.is_alive():
        worker.join(0.2)
        if time.monotonic() - polled >= 1.0:
            every_s()
            polled = time.monotonic()
    if "error" in out:
        raise out["error"]
    return out["result"]


def _wait_for_room_to_spread(plan: StagePlan, workers: int, timeout_s: float = 30.0) -> bool:
    """Under SPREAD (a soft strategy), wait until each of up to ``workers`` live nodes not being drained
    (they take no new work) has room for one worker, so the stage's placement group really spreads: the
    actors of the stage's own Ray Data step give their CPUs back asynchronously, and a placement group made
    at that moment packs every rank onto the head. Probed with a STRICT_SPREAD group of one worker's bundle
    per node, removed at once. False (and the stage goes on, soft) when the room did not come within
    ``timeout_s``."""
    recipe, draining = plan.recipe, draining_nodes()
    nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["NodeID"] not in draining)
    if recipe.placement != "SPREAD" or workers < 2 or nodes < 2:
        return True
    probe = placement_group([_bundle(recipe)] * min(workers, nodes), strategy="STRICT_SPREAD")
    try:
        ready = probe.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(probe)
    if not ready:
        log.warning(
            "stage %s: no room for one worker on each of %d nodes after %.0f s; placing softly",
            plan.stage.name,
            min(workers, nodes),
            timeout_s,
        )
    return ready


def _worker_resources(recipe) -> dict:
    return {"CPU": recipe.cpus_per_worker, **recipe.worker_resources}


def _bundle(recipe) -> dict:
    """What one training worker holds (its GPU too)."""
    return {**_worker_resources(recipe), **({"GPU": 1} if recipe.use_gpu else {})}


def fit_on_ray(
    plan: StagePlan,
    max_failures: int,
    step_hooks: Sequence[StepHook] = (),
    printer: ProgressPrinter | None = None,
) -> tuple[str | None, list]:
    """The TorchTrainer of the stage, again after each attempt its ranks ended at a checkpoint (a drain
    notice, room to grow), each time at the size the nodes not being drained hold;
    returns the last checkpoint's URI and where each rank of each attempt ran. The same run name and
    storage path make Ray Train restore each attempt from the latest checkpoint. The progress board lives
    on the driver's node (a hard affinity: a lost worker node must not take with it what the driver reads
    afterwards)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(num_cpus=0)(ProgressBoard).options(scheduling_strategy=here).remote()

    alive = _alive_nodes() if plan.recipe.elastic else frozenset()

    def every_s() -> None:
        nonlocal alive
        if plan.recipe.elastic:
            with contextlib.suppress(Exception):  # the GCS busy for a moment: the next second's look
                if (now := _alive_nodes()) != alive:
                    alive = now  # a node lost: Ray Train's restart sizes the group without it at once
                    refresh_train_view()
        show_progress()

    def show_progress() -> None:  # what rank 0 is doing, or its last step, on this console
        if printer is not None:
            with contextlib.suppress(Exception):
                record = ray.get(board.latest.remote(), timeout=5)
                if record:
                    printer.update(record)
                else:
                    last, _ = ray.get(board.read.remote(), timeout=5)
                    if 0 in last:
                        printer.phase(last[0][0])

    try:
        while True:
            workers = _attempt_max(plan.recipe)
            _wait_for_room_to_spread(plan, workers)
            if plan.recipe.elastic:
                refresh_train_view()  # the attempt starts at the size the nodes hold now
            trainer = _trainer(plan, max_failures, workers, board, step_hooks)
            result = _waited_in_python(trainer.fit, every_s)
            show_progress()
            if not result.return_value:
                break
            log.info(
                "stage %s: the ranks ended the attempt at step %d (%s); starting the next",
                plan.stage.name,
                result.return_value["step"],
                result.return_value["ended"],
            )
        placements = ray.get(board.placements.remote())
    except Exception as e:
        last, stalls = ray.get(board.read.remote())
        if stalls:
            raise StageStalled(
                stall_message(plan.stage.name, plan.stage.stall_timeout_s, last, stalls, time.time())
            ) from e
        raise
    finally:
        ray.kill(board)
    uri = result.checkpoint.path if result.checkpoint else None
    if storage.is_s3(plan.layout.root) and uri and not uri.startswith("s3://"):
        uri = "s3://" + uri
    return uri, placements


def _alive_nodes() -> frozenset[str]:
    return frozenset(n["NodeID"] for n in ray.nodes() if n["Alive"])


NEVER_S = 1e9


def _trainer(plan: StagePlan, max_failures: int, workers: int, board, step_hooks) -> TorchTrainer:
    """One attempt's TorchTrainer: elastic up to ``workers`` (fixed at it for a fixed-size stage)."""
    recipe = plan.recipe
    fs, path = storage.resolve(plan.layout.checkpoints)
    config = {"plan": plan, "board": board, "step_hooks": tuple(step_hooks)}
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=torch_config_binding(_bind_here, "nccl" if recipe.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(recipe.min_workers, workers) if recipe.elastic else workers,
            use_gpu=recipe.use_gpu,
            resources_per_worker=_worker_resources(recipe),
            placement_strategy=recipe.placement,
            # never: Ray Train restarts a running group when it sees room, whether or not the ranks have
            # checkpointed; the ranks look for room themselves and end the attempt at a checkpoint
            elastic_resize_monitor_interval_s=NEVER_S,
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
