"""One curriculum stage on Ray Train + DeepSpeed, as a recipe with seams.

    llava-ray stage stage1 --recipe llava_onevision --profile tiny --storage runs --run-id demo

Reads top to bottom. The driver (``train_stage``) plans the stage once (``plan_stage``: a frozen, typed
``StagePlan``, logged and tracked), starts one TorchTrainer, then evaluates the export and closes the
stage's MLflow run. Every worker runs ``train_loop``: a ``StageWorker`` with one public method per seam
(setup_model, setup_optimizer, setup_data, resume, setup_step, train_step, save_checkpoint, export) and
``train``, which calls them in order. A ``StepSource`` hides where rows come from: read once and kept in
memory (small data), or streamed through Ray Data every epoch (large data); both give each rank the same
rows in the same order on every attempt, so a resumed stage sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist
from safetensors.torch import save as save_tensors

from components import storage
from components.batching import group_rows, to_device
from components.deepspeed_ops import ensure_ops
from components.evaluation import evaluate, format_report
from components.frozen import thaw
from components.generation import MediaFiller
from components.manifest import parent_uri
from components.model import (
    LinearProjector,
    ModelSpec,
    build_model,
    enable_activation_checkpointing,
    group_of,
    load_model,
    model_from_config,
    param_groups,
    partitioned_build,
    save_model,
    set_trainable,
)
from components.processor import LlavaProcessor, ProcessorConfig
from components.tracking import TrackingConfig, loss_curve_png, make_tracker
from pipelines.layout import StageLayout
from pipelines.preprocess import shards_dataset
from pipelines.recipes import Recipe, StageSpec

log = logging.getLogger(__name__)

SMALL_DATA_SHARE = 0.1
"""In ``auto`` mode, shards smaller than this share of the object store are read into memory."""

STALL_EXIT = 75
"""A worker's exit status when its watchdog ended it (EX_TEMPFAIL)."""

StepHook = Callable[[int, int], None]
"""Called on every rank after each optimizer step (and its checkpoint, when one is due): hook(step, rank)."""


@dataclass(frozen=True)
class StagePlan:
    """Everything a worker needs, resolved once on the driver; nothing changes it afterwards. The recipe's
    settings are referred to (``recipe``, ``stage``), never copied: the model, the processor and the
    resources below are read from them. What the plan adds is what it resolves for this run."""

    recipe: Recipe
    stage: StageSpec
    layout: StageLayout
    init_from: str | None
    """The previous stage's HF export; None: build the base models (Stage-1)."""
    grad_accum: int
    rows_per_rank: int
    """Rows each rank trains on per epoch: ranks keep rows at positions rank, rank+W, ... (equal counts)."""
    steps_per_epoch: int
    total_steps: int
    data_mode: str
    """memory (read once, kept) or stream (Ray Data every epoch): the stage's ``auto`` resolved."""
    has_video: bool
    """Whether the stage's data holds video: then every micro-batch runs the video path too."""
    tracking: TrackingConfig | None = None
    mlflow_run_id: str | None = None
    step_hooks: tuple[StepHook, ...] = ()

    @property
    def model(self) -> ModelSpec:
        return self.recipe.model

    @property
    def processor(self) -> ProcessorConfig:
        """This stage's processor: template, AnyRes grid, video sampling (its export records it)."""
        return self.stage.processor_config(self.recipe.model)

    @property
    def workers(self) -> int:
        return self.recipe.workers

    @property
    def micro_batch(self) -> int:
        return self.stage.micro_batch

    @property
    def use_gpu(self) -> bool:
        return self.recipe.use_gpu

    @property
    def cpus_per_worker(self) -> float:
        return self.recipe.cpus_per_worker

    @property
    def placement(self) -> str:
        return self.recipe.placement

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.recipe.cpus_per_worker))

    @property
    def window(self) -> int:
        """Rows grouped together before they are cut into steps: ``group_steps`` optimizer steps' worth."""
        return self.micro_batch * self.grad_accum * self.stage.group_steps

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    def resolved(self) -> dict:
        """The plan as data (logged first, and an artifact of the stage's run): what the stage trains with,
        what the plan resolved, and the DeepSpeed config derived from both."""
        out = {
            "stage": self.stage,
            "model": self.model,
            "processor": self.processor,
            "layout": self.layout,
            "init_from": self.init_from,
            "workers": self.workers,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "rows_per_rank": self.rows_per_rank,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "data_mode": self.data_mode,
            "has_video": self.has_video,
            "use_gpu": self.use_gpu,
            "cpus_per_worker": self.cpus_per_worker,
            "placement": self.placement,
            "torch_threads": self.torch_threads,
            "tracking": self.tracking,
            "mlflow_run_id": self.mlflow_run_id,
            "step_hooks": [type(h).__name__ for h in self.step_hooks],
            "deepspeed": deepspeed_config(self),
        }
        return thaw({k: asdict(v) if is_dataclass(v) else v for k, v in out.items()})


def rank_counts(positions: Iterable[int], world: int) -> list[int]:
    counts = [0] * world
    for p in positions:
        counts[p % world] += 1
    return counts


def plan_stage(
    recipe: Recipe,
    stage: StageSpec,
    layout: StageLayout,
    positions: list[int],
    *,
    has_video: bool,
    init_from: str | None,
    local: bool = False,
    tracking: TrackingConfig | None = None,
    mlflow_run_id: str | None = None,
    step_hooks: tuple[StepHook, ...] = (),
) -> StagePlan:
    """Gradient accumulation to reach the global batch, each rank's rows, the exact step count, and the
    stage's data mode (``auto``: memory when ``local`` or the shards are small, else stream)."""
    workers, micro = recipe.workers, stage.micro_batch
    accum = max(1, stage.global_batch // (micro * workers))
    rows_per_rank = min(rank_counts(positions, workers))
    steps_per_epoch = rows_per_rank // (micro * accum)
    if steps_per_epoch < 1:
        raise ValueError(
            f"stage {stage.name}: expected at least {micro * accum * workers} rows for one step "
            f"({workers} workers x {micro} micro-batch x {accum} accumulation), found {len(positions)}"
        )
    data_mode = stage.data_mode
    if data_mode == "auto":  # a local run has no Ray to stream with, nor an object store to size against
        data_mode = "memory" if local or _small(storage.dir_bytes(layout.data)) else "stream"
    return StagePlan(
        recipe=recipe,
        stage=stage,
        layout=layout,
        init_from=init_from,
        grad_accum=accum,
        rows_per_rank=rows_per_rank,
        steps_per_epoch=steps_per_epoch,
        total_steps=stage.max_steps or steps_per_epoch * stage.epochs,
        data_mode=data_mode,
        has_video=has_video,
        tracking=tracking,
        mlflow_run_id=mlflow_run_id,
        step_hooks=tuple(step_hooks),
    )


def _small(nbytes: int) -> bool:
    """Small data is read by every worker straight from storage, once, and kept for every epoch: no Ray Data
    pipeline to start (seconds per stage), and no epoch restarts the reads. Large data streams from storage
    through Ray Data every epoch."""
    import ray  # Ray is imported by the stages that run on it, never by a local run

    return nbytes <= ray.cluster_resources().get("object_store_memory", 0) * SMALL_DATA_SHARE


def deepspeed_config(plan: StagePlan) -> dict:
    stage = plan.stage
    zero: dict = {"stage": stage.zero_stage}
    if stage.zero_stage >= 2 and not plan.use_gpu:
        # the contiguous gradient buffer fights GPU memory fragmentation; on CPU it only adds a copy of
        # every gradient per step (~8% of a tiny model's step, benchmarks/train_overhead.py)
        zero["contiguous_gradients"] = False
    if stage.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.workers,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": plan.use_gpu},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cosine_with_warmup(step: int, total: int, warmup_ratio: float) -> float:
    """The LR multiplier: linear warm-up over warmup_ratio of the steps, then cosine to 0."""
    warmup = max(1, math.ceil(total * warmup_ratio)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---- where a rank's rows come from --------------------------------------------------------------


def steps_of(rows: list[dict], plan: StagePlan, epoch: int, w: int) -> list[list[list[dict]]]:
    """Window ``w`` of an epoch's rows -> optimizer steps of ``grad_accum`` micro-batches. Grouped
    (group_by_modality): the window is sorted by (modality, frames, length) before it is cut (LLaVA's
    megabatch grouping; see benchmarks/padding.py), and the micro-batches are dealt to steps in an order
    seeded by the stage seed, the epoch and the window."""

    n_steps = len(rows) // plan.rows_per_step
    rows = rows[: n_steps * plan.rows_per_step]
    count = n_steps * plan.grad_accum
    if plan.stage.group_by_modality:
        micro = group_rows(rows, plan.micro_batch, count)
        random.Random(plan.stage.seed + 1000 * epoch + w).shuffle(micro)
    else:
        micro = [rows[i * plan.micro_batch : (i + 1) * plan.micro_batch] for i in range(count)]
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

    def epoch(self, epoch: int) -> Iterator[list[list[dict]]]:
        rows = list(self.rows)
        random.Random(f"{self.plan.stage.seed}:{epoch}:{self.rank}").shuffle(rows)
        windows = [rows[i : i + self.plan.window] for i in range(0, len(rows), self.plan.window)]
        for w, window in enumerate(windows):
            yield from steps_of(window, self.plan, epoch, w)


class StreamedSteps:
    """Large data: each epoch streams the shards through Ray Data; this rank keeps the rows at its positions
    (rank, rank+W, ...), in the shards' order (files by name, rows as written), the first rows_per_rank.
    The same rows in the same order on every attempt: a resume skips exactly the steps it has done."""

    def __init__(self, plan: StagePlan, rank: int, world: int):
        self.plan, self.rank, self.world = plan, rank, world

    def epoch(self, epoch: int) -> Iterator[list[list[dict]]]:
        import ray  # Ray is imported by the stages that run on it, never by a local run

        fs, path = storage.resolve(self.plan.layout.data)
        rank, world = self.rank, self.world
        ds = ray.data.read_parquet(path, filesystem=fs, shuffle=None)
        ds.context.execution_options.preserve_order = True  # this dataset only, not the process's context
        mine = ds.map_batches(
            lambda t: t.filter(np.asarray(t.column("position")) % world == rank), batch_format="pyarrow"
        )
        left = self.plan.rows_per_rank
        for w, batch in enumerate(mine.iter_batches(batch_size=self.plan.window, batch_format="pyarrow")):
            rows = batch.to_pylist()[:left]
            left -= len(rows)
            yield from steps_of(rows, self.plan, epoch, w)
            if left <= 0:
                return


# ---- the worker side ----------------------------------------------------------------------------


class StageStalled(Exception):
    """A stage's workers made no progress for ``stall_timeout_s``; the message names what each was doing."""


class ProgressBoard:
    """Every rank's last phase and when it began, and the stalls its watchdogs reported: one Ray actor per
    stage attempt (``num_cpus=0``), so that the driver can name what each worker was doing when a stage
    stalled, whichever node it ran on."""

    def __init__(self):
        self.last: dict[int, tuple[str, float]] = {}
        self.stalls: dict[int, str] = {}
        self.placed: list[dict] = []

    def place(self, rank: int, node_id: str, node_ip: str, at: float) -> None:
        """Where a rank's worker runs: recorded by each rank of each attempt, in the stage's record."""
        self.placed.append({"rank": rank, "node_id": node_id, "node_ip": node_ip, "time": round(at, 3)})

    def placements(self) -> list[dict]:
        return self.placed

    def note(self, rank: int, phase: str, at: float) -> None:
        self.last[rank] = (phase, at)

    def stalled(self, rank: int, message: str) -> None:
        self.stalls[rank] = message

    def read(self) -> tuple[dict, dict]:
        return self.last, self.stalls


def stall_message(stage: str, timeout_s: float, last: dict, stalls: dict, now: float) -> str:
    ranks = "; ".join(
        f"rank {rank}: {phase!r} for {now - at:.0f} s" + (" (its watchdog fired)" if rank in stalls else "")
        for rank, (phase, at) in sorted(last.items())
    )
    return (
        f"stage {stage}: expected every worker to make progress within stall_timeout_s={timeout_s:g} s, "
        f"found none for that long; last phase per worker: {ranks or 'none reported'}"
    )


class Watchdog:
    """What this rank is doing now (``phase``) and since when. A daemon thread acts when one phase lasts
    longer than ``timeout_s`` (a stale build lock, a peer lost in a collective, a hung read): it tells the
    context (``stalled``: a Ray Train worker records it and ends its process), and where the rank runs in
    this process's main thread (``LocalContext``) it raises StageStalled there, through a signal that
    also interrupts a blocking sleep or wait. Every phase is also sent to the context (``note``)."""

    def __init__(self, context, timeout_s: float, stage: str):

        self.context, self.timeout_s, self.stage = context, timeout_s, stage
        self.phase, self.since, self.fired = "starting", time.monotonic(), None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="llava-ray-watchdog", daemon=True)
        in_main = threading.current_thread() is threading.main_thread()
        self._main = threading.main_thread().ident if in_main and not context.ends_process else None
        self._previous = None

    def __call__(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()
        self.context.note(phase)

    def __enter__(self):

        if self._main is not None:
            self._previous = signal.signal(signal.SIGUSR1, self._raise)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:

        self._done.set()
        if self._main is not None:
            signal.signal(signal.SIGUSR1, self._previous)

    def _raise(self, signum, frame) -> None:
        if self.fired and not self._done.is_set():
            raise StageStalled(f"stage {self.stage}: {self.fired}")

    def _watch(self) -> None:

        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.since
            if idle > self.timeout_s:
                self.fired = f"rank {self.context.rank}: no progress for {idle:.0f} s in {self.phase!r}"
                self.context.stalled(self.fired)
                if self._main is not None:
                    signal.pthread_kill(self._main, signal.SIGUSR1)
                return


class RayTrainContext:
    """The recipe's view of Ray Train: rank, world, the checkpoint to resume from, and reports."""

    ends_process = True
    """A stalled rank ends its worker process (Ray Train then sees the worker lost)."""

    def __init__(self, board=None):
        import ray.train  # Ray is imported by the stages that run on it, never by a local run

        self.ray = ray
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.board = board
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
                self.ray.get(self.board.stalled.remote(self.rank, message), timeout=10)
        os._exit(STALL_EXIT)

    @contextlib.contextmanager
    def resume_dir(self):
        checkpoint = self.ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict, directory: str) -> None:
        train = self.ray.train
        train.report(metrics, checkpoint=train.Checkpoint.from_directory(directory))


def init_one_rank_group(cuda: bool) -> bool:
    """A process group of this process alone on 127.0.0.1 (NCCL on a GPU, gloo on the CPU), for the recipe
    run without Ray (``LocalContext``); True when it made one, False when one already exists (DeepSpeed
    keeps the group it first saw)."""

    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    return True


class LocalContext:
    """One process and no Ray (``llava-ray run --local``, tests, the GPU machine): checkpoints go to
    ``root/<step>`` (a local directory or s3://, through the URI layer, published with a manifest), and
    the newest complete one is resumed from."""

    ends_process = False
    """A stalled rank raises StageStalled: the process is the caller's."""

    def __init__(self, root: str, rank: int = 0, world: int = 1):
        self.root, self.rank, self.world = storage.absolute(root), rank, world

    def note(self, phase: str) -> None:
        pass

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
        storage.upload_dir(directory, storage.join(self.root, str(metrics["step"])))


class StageWorker:
    """One stage on one rank, seam by seam; ``train`` reads top to bottom."""

    def __init__(self, plan: StagePlan, context):
        self.plan, self.context = plan, context
        self.rank, self.world = context.rank, context.world

    def train(self) -> None:
        """The stage on this rank, under a watchdog (``stall_timeout_s``) that names the phase it stalled
        in."""
        with Watchdog(self.context, self.plan.stage.stall_timeout_s, self.plan.stage.name) as self.progress:
            self._train()

    def _train(self) -> None:

        progress = self.progress
        torch.set_num_threads(self.plan.torch_threads)
        torch.manual_seed(self.plan.stage.seed + self.rank)
        progress("setting up: DeepSpeed's ops (built once per node, under a lock a dead holder releases)")
        ensure_ops(on_wait=progress)
        progress("setting up: the model")
        model, processor = self.setup_model()
        progress("setting up: the optimizer (deepspeed.initialize)")
        engine, optimizer = self.setup_optimizer(model)
        progress("setting up: the data")
        source = self.setup_data()
        progress("resuming from the last checkpoint")
        step = self.resume(engine)
        self.setup_step(engine, optimizer, processor, start_step=step)
        tracker, history = self.tracker(), []
        while step < self.plan.total_steps:
            epoch, done = divmod(step, self.plan.steps_per_epoch)
            steps = iter(source.epoch(epoch))
            for _ in range(done):  # a resumed epoch: skip what the interrupted attempt trained on
                next(steps)
            last_end = time.perf_counter()
            for micro_batches in steps:
                waited = time.perf_counter() - last_end
                progress(f"step {step + 1}")
                step, metrics = self.train_step(micro_batches, step, waited, last_end)
                history.append(metrics)
                tracker.log_metrics(_loggable(metrics), step=step)
                if step % self.plan.stage.checkpoint_every == 0 or step == self.plan.total_steps:
                    progress(f"saving the checkpoint of step {step}")
                    self.save_checkpoint(engine, step, metrics, history)
                    history = []
                progress(f"step hooks after step {step}")
                for hook in self.plan.step_hooks:
                    hook(step, self.rank)
                last_end = time.perf_counter()
                if step == self.plan.total_steps or step % self.plan.steps_per_epoch == 0:
                    break
            progress(f"reading the data of epoch {step // self.plan.steps_per_epoch}")
        progress("exporting the HF checkpoint")
        self.export(engine, processor)

    def setup_model(self):
        """(model, processor): the previous stage's export (or the base models) prompted with this stage's
        processor, its AnyRes grid in the config, LoRA applied, the stage's parts trainable."""

        plan = self.plan
        dtype = torch.bfloat16 if plan.use_gpu else torch.float32  # the engine's: never a whole fp32 copy
        with partitioned_build(deepspeed_config(plan)):  # ZeRO-3: each rank builds only its partition
            model, processor = (
                load_model(plan.init_from, dtype=dtype) if plan.init_from else build_model(plan.model)
            )
        if processor.config.arch != plan.processor.arch:
            raise ValueError(
                f"{plan.init_from or plan.model.checkpoint}: expected a {plan.processor.arch} "
                f"checkpoint (the recipe's arch), found {processor.config.arch}"
            )
        processor = LlavaProcessor(plan.processor, processor.tokenizer)
        processor.arch.set_stage_config(model.config, processor.anyres)  # Stage-1.5: 729 x 5, Stage-2: x 10
        if plan.stage.lora:
            apply_lora(model, plan.stage.lora)
        set_trainable(model, plan.stage.trainable)
        if plan.stage.lora:  # LoRA: only the adapters of the LLM train, beside the other trainable parts
            for name, p in model.model.language_model.named_parameters():
                p.requires_grad_("lora_" in name)
        enable_activation_checkpointing(model, plan.stage.activation_checkpointing)
        return model, processor

    def setup_optimizer(self, model):
        """DeepSpeed around the model, AdamW over one group per (LR, decay), the cosine schedule; every
        trainable parameter must be in exactly one group (checked)."""
        import deepspeed  # in the training process only: it probes the accelerator and its ops at import

        stage = self.plan.stage
        groups = param_groups(
            model,
            stage.lr,
            vision_lr=stage.vision_lr,
            projector_lr=stage.projector_lr,
            weight_decay=stage.weight_decay,
        )
        grouped = [p for g in groups for p in g["params"]]
        trainable = [p for p in model.parameters() if p.requires_grad]
        if len(grouped) != len({id(p) for p in grouped}) or {id(p) for p in grouped} != {
            id(p) for p in trainable
        }:
            raise RuntimeError(
                f"optimizer groups: expected each of {len(trainable)} trainable parameters once, "
                f"found {len(grouped)} in groups ({len({id(p) for p in grouped})} distinct)"
            )
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        total, warmup = self.plan.total_steps, stage.warmup_ratio
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_with_warmup(s, total, warmup)
        )
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(self.plan)
        )
        return engine, optimizer

    def setup_data(self):
        source = InMemorySteps if self.plan.data_mode == "memory" else StreamedSteps
        return source(self.plan, self.rank, self.world)

    def resume(self, engine) -> int:
        """The step of the newest checkpoint (0 without one), weights, optimizer and schedule restored."""
        with self.context.resume_dir() as d:
            if d is None:
                return 0
            _, client = engine.load_checkpoint(d)  # the tag named in its "latest" file
        step = int(client["step"])
        if self.rank == 0:
            print(f"resumed from checkpoint at step {step}")
        return step

    def setup_step(self, engine, optimizer, processor, start_step: int) -> None:
        """What every step of this attempt shares: the engine, how rows become the model's inputs, the
        optimizer groups whose LRs are logged, and the step the attempt started from (after a failure Ray
        Train restarts the worker group, and the new attempt resumes from the last checkpoint)."""

        # the fillers keep every rank's collectives in step (ZeRO-3); one rank has no one to wait for, and a
        # filler padded to a long row's length would double a micro-batch of one's compute
        self.filler = MediaFiller(processor, with_video=self.plan.has_video) if self.world > 1 else list
        self.engine, self.processor, self.start_step = engine, processor, start_step
        self.main_group = group_of(optimizer.param_groups, "language_model") or group_of(
            optimizer.param_groups, "multi_modal_projector"
        )
        self.vision_group = group_of(optimizer.param_groups, "vision_tower")

    def make_batch(self, micro: list[dict]) -> dict:
        """Rows of one micro-batch -> the model's inputs (media filled in, collated, on the device; bf16 on
        a GPU, fp32 on the CPU)."""

        engine = self.engine
        return to_device(
            self.processor.collate(self.filler(micro)), engine.device, engine.get_data_types()[0]
        )

    def train_step(self, micro_batches: list[list[dict]], step: int, waited: float, last_end: float):
        """One optimizer step over its micro-batches; returns (step, metrics). Throughput counts every
        rank's tokens over the wall-clock interval since the previous step ended (data wait, logging and
        checkpointing included)."""

        # every rank's own rows: batches differ in length between ranks, so the step's totals need every
        # rank's counts. They are known before the step, so their all-reduce runs in the background (gloo's
        # thread) under the forward pass instead of adding one more cross-rank wait after the step.
        counts = torch.tensor(
            [
                sum(len(r["input_ids"]) for micro in micro_batches for r in micro),
                sum(map(len, micro_batches)),
            ],
            dtype=torch.float64,
        )
        summed = torch.distributed.all_reduce(counts, async_op=True) if self.world > 1 else None
        engine, losses, micro_modalities = self.engine, [], []
        for micro in micro_batches:
            micro_modalities.append({r["modality"] for r in micro})
            out = engine(**self.make_batch(micro))
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach()))
        if summed is not None:
            summed.wait()
        tokens, samples = int(counts[0]), int(counts[1])
        interval = time.perf_counter() - last_end
        return step + 1, {
            "step": step + 1,
            "loss": sum(losses) / len(losses),
            "lr": self.main_group["lr"],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens": tokens,
            "step_s": interval,
            "tokens_per_s": tokens / interval,
            "samples_per_s": samples / interval,
            "data_wait_share": min(1.0, waited / interval),
            "lr_vision": self.vision_group["lr"] if self.vision_group else None,
            "attempt_start_step": self.start_step,
            "text_only_batches": sum(1 for m in micro_modalities if m == {"text"}),
            "modalities": sorted(set().union(*micro_modalities)),
        }

    def tracker(self):

        return make_tracker(self.plan.tracking, rank=self.rank, run_id=self.plan.mlflow_run_id)

    def save_checkpoint(self, engine, step: int, metrics: dict, history: list[dict]) -> None:
        """Every rank saves its shard; rank 0 writes the steps since the last checkpoint to the history."""
        if self.rank == 0:
            storage.write_text(
                storage.join(self.plan.layout.history, f"{step:07d}.json"), json.dumps(history)
            )
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=f"step{step}", client_state={"step": step})
            self.context.report(metrics, d)

    def export(self, engine, processor) -> None:
        """Gather full weights (ZeRO-3 shards them), merge LoRA, save an HF checkpoint from rank 0 with the
        stage's processor (prompted with the model's conversational template), and the probe logits the
        training model gives, which the export must reproduce."""
        import deepspeed  # in the training process only: it probes the accelerator and its ops at import

        plan, model = self.plan, engine.module
        processor = processor.replace(template=plan.model.template)
        model.eval()
        with torch.no_grad():  # every rank runs the same probe forward (ZeRO-3 gathers collectively)
            probe = to_device(processor.probe_batch(), engine.device, engine.get_data_types()[0])
            logits = model(**probe).logits.float().cpu()
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(
            params, modifier_rank=None, enabled=plan.stage.zero_stage == 3
        ):
            if self.rank == 0:
                state = {
                    k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()
                }
        if self.rank == 0:
            storage.write_bytes(plan.layout.probe_logits, save_tensors({"logits": logits.contiguous()}))
            export = _model_like(model.config, plan)
            export.load_state_dict(state, strict=True)
            if plan.stage.lora:
                export.model.language_model = export.model.language_model.merge_and_unload()
            save_model(export.to(torch.float32), processor, plan.layout.export)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def _model_like(config, plan: StagePlan):
    """An empty model of the trained one's class and config (with LoRA when it trained with LoRA), for
    the gathered weights: no checkpoint is read and no tokenizer built again."""

    model = model_from_config(config, linear_projector=plan.model.projector == "linear")
    if plan.stage.lora:
        apply_lora(model, plan.stage.lora)
    assert plan.model.projector != "linear" or isinstance(model.model.multi_modal_projector, LinearProjector)
    return model


def apply_lora(model, lora) -> None:
    from peft import LoraConfig, get_peft_model  # LoRA stages only (peft loads much of transformers)

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    model.model.language_model = get_peft_model(model.model.language_model, config)


def _loggable(metrics: dict) -> dict:
    """The step's numbers, as MLflow metrics (the step is their x; the rest is history only)."""
    skip = ("step", "attempt_start_step")
    return {
        k: v
        for k, v in metrics.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    StageWorker(config["plan"], RayTrainContext(config.get("board"))).train()


@dataclass(frozen=True)
class FailOnce:
    """A step hook for tests: kills ``rank`` once, right after ``step`` (and its checkpoint, when one is
    due); ``marker`` (a path or s3:// URI, which every node reaches) records that it happened. Ray Train
    then restarts the worker group from the last checkpoint, as after a lost node."""

    step: int
    rank: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not storage.exists(self.marker):
            storage.write_text(self.marker, "")
            time.sleep(5)  # let the controller register the last checkpoint, as a later crash would
            os._exit(1)


@dataclass(frozen=True)
class PauseOnce:
    """A step hook for tests: every rank stops for ``seconds`` right after ``step`` and its checkpoint
    (registered by Ray Train's controller, when under it), unless ``marker`` (a path or s3:// URI) exists;
    rank 0 writes it first. A test waits for the marker and then does something to the cluster (kills a
    node), at a known point of the stage."""

    step: int
    marker: str
    seconds: float

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or storage.exists(self.marker):
            return
        if rank == 0:
            _wait_until_ray_train_holds(step)
            storage.write_text(self.marker, str(time.time()))
        time.sleep(self.seconds)


def _wait_until_ray_train_holds(step: int, timeout_s: float = 60.0) -> None:
    """Under Ray Train, wait until its controller has registered the checkpoint of ``step``. A worker's
    report only queues it: the controller takes it when it next polls the workers (every 2 s), then writes
    its snapshot to storage. A node lost in between loses that checkpoint too, and the stage resumes from
    the one before; a test that kills a node "after the checkpoint" must wait for this. Nothing to wait
    for outside Ray Train."""
    import ray.train  # only under Ray Train, where it is already loaded

    try:
        run_storage = ray.train.get_context().get_storage()
    except Exception:  # not a Ray Train worker (the local context)
        return
    fs, path = run_storage.storage_filesystem, run_storage.checkpoint_manager_snapshot_path
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with fs.open_input_stream(path) as f:
                latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("step") == step:
                return
        except (FileNotFoundError, OSError, ValueError):
            pass  # not written yet
        time.sleep(0.5)
    raise TimeoutError(f"Ray Train did not register the step-{step} checkpoint within {timeout_s:.0f} s")


@dataclass(frozen=True)
class HangOnce:
    """A step hook for tests: ``rank`` stops making progress for ``seconds`` right after ``step`` (a hung
    worker: a lost peer, a stale lock), once per process."""

    step: int
    rank: int
    seconds: float

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank:
            time.sleep(self.seconds)


# ---- the driver side ----------------------------------------------------------------------------


def read_history(history_uri: str) -> list[dict]:
    steps = {}
    for rel in storage.list_files(history_uri):
        for m in json.loads(storage.read_text(storage.join(history_uri, rel))):
            steps[m["step"]] = m
    return [steps[k] for k in sorted(steps)]


def evaluate_export(recipe: Recipe, hf_uri: str) -> dict | None:
    """Greedy generation on the held-out split, per task and modality (None when the recipe has none)."""

    if not recipe.eval.manifest:
        return None
    text = storage.read_text(recipe.eval.manifest)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    model, processor = load_model(hf_uri)  # prompted as the export says: its template, grid, video sampling
    return evaluate(
        model, processor, records, parent_uri(recipe.eval.manifest), max_new_tokens=recipe.eval.max_new_tokens
    )


def data_stats(layout: StageLayout) -> tuple[list[int], dict[str, int]]:
    """(every row's position, rows per modality) of the stage's shards: two columns read."""

    table = shards_dataset(layout.data).to_table(columns=["position", "modality"])
    return table.column("position").to_pylist(), dict(Counter(table.column("modality").to_pylist()))


def train_stage(
    recipe: Recipe,
    stage: StageSpec,
    layout: StageLayout,
    *,
    init_from: str | None,
    tracking: TrackingConfig | None = None,
    parent_run_id: str | None = None,
    mlflow_run_id: str | None = None,
    max_failures: int = 1,
    step_hooks: tuple[StepHook, ...] = (),
    local: bool = False,
) -> dict:
    """Train one stage; returns its record (steps, final loss, checkpoint and HF URIs, MLflow run, eval).
    ``mlflow_run_id``: the stage's run from an interrupted attempt, continued (one curve, one run).
    ``local``: in this process on one rank (the recipe's workers must be 1), no Ray: small runs, debugging,
    a machine without a cluster; an interrupted local stage resumes from its last checkpoint too."""

    start = time.monotonic()
    tracking = tracking or TrackingConfig()
    tracker = make_tracker(tracking, run_id=mlflow_run_id)
    if mlflow_run_id:
        tracker.resume_run()
    else:
        tracker.start_run(stage.name, parent_run_id=parent_run_id, tags={"llava_ray.recipe": recipe.name})
    try:
        positions, modalities = data_stats(layout)
        if local and recipe.workers != 1:
            raise ValueError(
                f"stage {stage.name}: a local run trains on one rank: expected workers 1, "
                f"found {recipe.workers}"
            )
        plan = plan_stage(
            recipe,
            stage,
            layout,
            positions,
            has_video="video" in modalities,
            init_from=init_from,
            local=local,
            tracking=tracking,
            mlflow_run_id=tracker.run_id,
            step_hooks=step_hooks,
        )
        _log_plan(plan, tracker)
        if local:
            checkpoint_uri, placements = _fit_here(plan), [{"rank": 0, "node_id": None, "node_ip": "local"}]
        else:
            checkpoint_uri, placements = _fit(plan, max_failures)
        record = _finish(recipe, plan, tracker, checkpoint_uri)
        record["workers"] = placements
    except BaseException as e:
        tracker.fail(e)
        raise
    record["seconds"] = round(time.monotonic() - start, 1)
    storage.write_text(layout.result, json.dumps(record, indent=1))
    return record


def _log_plan(plan: StagePlan, tracker) -> None:
    resolved = plan.resolved()
    log.info("stage %s resolved plan: %s", plan.stage.name, json.dumps(resolved, default=str))
    tracker.log_params(
        {
            "stage": asdict(plan.stage),
            "model": asdict(plan.model),
            "workers": plan.workers,
            "grad_accum": plan.grad_accum,
            "total_steps": plan.total_steps,
            "data_mode": plan.data_mode,
        }
    )
    tracker.log_dict(json.loads(json.dumps(resolved, default=str)), "resolved_config.json")
    if storage.exists(plan.layout.mixture):
        tracker.log_dict(json.loads(storage.read_text(plan.layout.mixture)), "mixture.json")


def _fit_here(plan: StagePlan) -> str | None:
    """The stage in this process, one rank, no Ray Train (``--local``); returns its last checkpoint's URI.
    The process group (gloo, or NCCL on a GPU) is made once and kept for the process: DeepSpeed keeps the
    group it first saw. The caller's torch thread count is restored afterwards."""

    init_one_rank_group(plan.use_gpu)
    context = LocalContext(storage.join(plan.layout.checkpoints, "local"))
    threads = torch.get_num_threads()
    try:
        StageWorker(plan, context).train()
    finally:
        torch.set_num_threads(threads)
    done = context.checkpoints()
    return storage.join(context.root, str(done[-1])) if done else None


def _waited_in_python(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a daemon thread, waited for in short joins. A ``ray.get`` runs no signal handler until its
    object arrives (measured: an alarm during a 30 s get fired only after it), so a driver blocked in
    ``fit()`` would ignore Ctrl-C and a test's timeout for a whole stage; waiting here keeps this thread in
    Python, where both are handled."""

    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # handed to the waiting thread
            out["error"] = e

    worker = threading.Thread(target=run, name="llava-ray-fit", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in out:
        raise out["error"]
    return out["result"]


def node_interface(ip: str) -> str | None:
    """The network interface that holds ``ip`` on this machine (None: none does)."""

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            return name
    return None


def bind_to_node_address() -> dict[str, str]:
    """In a training worker, before its process group forms: gloo and NCCL's bootstrap use the interface of
    the node's Ray address. Left alone, gloo binds the address of the machine's hostname, and where that
    names loopback (Debian's /etc/hosts maps the hostname to 127.0.1.1) or an address other nodes cannot
    route to, every rank on another node times out connecting ("Gloo connectFullMesh failed ... remote=
    [127.0.0.1]", seen on the two-node rig). A user's own GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME wins."""
    import ray  # Ray is imported by the stages that run on it, never by a local run

    name = node_interface(ray.util.get_node_ip_address())
    chosen = {}
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if name and not os.environ.get(var):
            os.environ[var] = chosen[var] = name
    return chosen


def _torch_config(plan: StagePlan):
    """Ray Train's TorchConfig whose backend first binds each worker to its node's address."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class NodeAddressBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            worker_group.execute(bind_to_node_address)
            super().on_start(worker_group, backend_config)

    class NodeAddressTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return NodeAddressBackend

    return NodeAddressTorchConfig(backend="nccl" if plan.use_gpu else "gloo")


def _wait_for_room_to_spread(plan: StagePlan, timeout_s: float = 30.0) -> bool:
    """Under SPREAD (a soft strategy), wait until each of up to ``plan.workers`` live nodes has room for one
    worker, so the stage's placement group really spreads. The actors of the stage's own Ray Data step give
    their CPUs back asynchronously; a placement group made at that moment packed every rank onto the head
    (seen on the two-node rig). Probed with a STRICT_SPREAD group of one worker's bundle per node, removed at
    once. False (and the stage goes on, soft) when the room did not come within ``timeout_s``."""
    import ray  # Ray is imported by the stages that run on it, never by a local run
    from ray.util.placement_group import placement_group, remove_placement_group

    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if plan.placement != "SPREAD" or plan.workers < 2 or nodes < 2:
        return True
    bundle = {"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})}
    probe = placement_group([dict(bundle)] * min(plan.workers, nodes), strategy="STRICT_SPREAD")
    try:
        ready = probe.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(probe)
    if not ready:
        log.warning(
            "stage %s: no room for one worker on each of %d nodes after %.0f s; placing softly",
            plan.stage.name,
            min(plan.workers, nodes),
            timeout_s,
        )
    return ready


def _fit(plan: StagePlan, max_failures: int) -> tuple[str | None, list[dict]]:
    """The TorchTrainer of the stage; returns its last checkpoint's URI and where each rank of each attempt
    ran. The same run name and storage path make Ray Train restore an interrupted run from its latest
    checkpoint. The progress board lives on the driver's node: a lost worker node must not take with it
    what the driver reads afterwards."""
    import ray  # Ray is imported by the stages that run on it, never by a local run
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fs, path = storage.resolve(plan.layout.checkpoints)
    # hard: a soft affinity let it land on a worker node (seen on the two-node rig), which then took it along
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(num_cpus=0)(ProgressBoard).options(scheduling_strategy=here).remote()
    _wait_for_room_to_spread(plan)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan, "board": board},
        torch_config=_torch_config(plan),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers,
            use_gpu=plan.use_gpu,
            resources_per_worker={"CPU": plan.cpus_per_worker},
            placement_strategy=plan.placement,
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = _waited_in_python(trainer.fit)
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


def _finish(recipe: Recipe, plan: StagePlan, tracker, checkpoint_uri: str | None) -> dict:
    """The stage's record, its evaluation (printed, logged, an artifact) and loss curve; the run closed."""

    history = read_history(plan.layout.history)
    record = {
        "stage": plan.stage.name,
        "steps": history[-1]["step"] if history else 0,
        "final_loss": history[-1]["loss"] if history else None,
        "checkpoint_uri": checkpoint_uri,
        "hf_uri": plan.layout.export,
        "mlflow_run_id": tracker.run_id,
        "trainable": plan.stage.trainable,
        "data_mode": plan.data_mode,
    }
    report = evaluate_export(recipe, plan.layout.export)
    if report:
        print(f"stage {plan.stage.name} evaluation:\n{format_report(report)}")
        record["eval"] = {key: report[key] for key in ("overall", "modalities", "tasks", "probes", "skipped")}
        metrics = {f"eval/{k}/accuracy": v["accuracy"] for k, v in report["tasks"].items()}
        metrics.update(
            {f"eval/modality/{k}/accuracy": v["accuracy"] for k, v in report["modalities"].items()}
        )
        metrics.update({f"eval/reversed/{k}/accuracy": v["accuracy"] for k, v in report["probes"].items()})
        tracker.log_metrics(metrics, step=record["steps"])
        tracker.log_dict(report, "eval.json")
    if history:
        png = loss_curve_png(
            [m["step"] for m in history], [m["loss"] for m in history], f"{recipe.name} / {plan.stage.name}"
        )
        tracker.log_artifact(png, "plots")
        os.unlink(png)
    tracker.set_tags(
        {"llava_ray.output_uri": plan.layout.export, "llava_ray.checkpoint_uri": checkpoint_uri or ""}
    )
    tracker.end_run()
    return record
