"""A stage's plan: what every worker trains with, resolved once on the driver, and the configs derived
from it (DeepSpeed's, the LR schedule). Pure: the driver passes in what it measured (the rows'
positions, the shards' size, the object store's size); nothing here asks Ray or reads storage."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass

from components.frozen import thaw
from components.model import torch_threads
from components.processor import ProcessorConfig
from components.tracking import TrackingConfig
from pipelines.layout import StageLayout
from pipelines.recipes import Recipe, StageSpec

SMALL_DATA_SHARE = 0.1
"""In ``auto`` mode, shards smaller than this share of the object store are read into memory."""


@dataclass(frozen=True)
class StagePlan:
    """Everything a worker needs, resolved once on the driver; nothing changes it afterwards. The recipe's
    settings are referred to (``recipe``, ``stage``), never copied; what the plan adds is what it resolves
    for this run."""

    recipe: Recipe
    stage: StageSpec
    layout: StageLayout
    init_from: str | None
    """The previous stage's HF export; None: build the base models (Stage-1)."""
    grad_accum: int
    """Micro-batches per rank per step at the recipe's ``workers``: ``micro_batches_per_step / workers``."""
    steps_per_epoch: int
    total_steps: int
    data_mode: str
    """memory (read once, kept) or stream (Ray Data every epoch): the stage's ``auto`` resolved."""
    has_video: bool
    """Whether the stage's data holds video: then every micro-batch runs the video path too."""
    tracking: TrackingConfig | None = None
    mlflow_run_id: str | None = None

    @property
    def processor(self) -> ProcessorConfig:
        """This stage's processor: template, AnyRes grid, video sampling (its export records it)."""
        return self.stage.processor_config(self.recipe.model)

    @property
    def torch_threads(self) -> int:
        return torch_threads(self.recipe.cpus_per_worker)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of one global step (every rank's): the global batch over the micro-batch; each of
        W ranks trains on 1/W of them (the virtual shards), whatever W is."""
        return self.stage.global_batch // self.stage.micro_batch

    @property
    def global_rows(self) -> int:
        """Rows of one optimizer step, every rank's together: the global batch."""
        return self.stage.micro_batch * self.micro_batches_per_step

    @property
    def rows_per_epoch(self) -> int:
        return self.global_rows * self.steps_per_epoch

    @property
    def window(self) -> int:
        """Rows grouped together before they are cut into steps: ``group_steps`` global steps' worth."""
        return self.global_rows * self.stage.group_steps

    def resolved(self) -> dict:
        """The plan as data (logged first, and an artifact of the stage's run): what the stage trains with,
        what the plan resolved, and the DeepSpeed config derived from both."""
        recipe = self.recipe
        out = {
            "stage": self.stage,
            "model": recipe.model,
            "processor": self.processor,
            "layout": self.layout,
            "init_from": self.init_from,
            "workers": recipe.workers,
            "micro_batch": self.stage.micro_batch,
            "grad_accum": self.grad_accum,
            "global_batch": self.global_rows,
            "rows_per_epoch": self.rows_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "data_mode": self.data_mode,
            "has_video": self.has_video,
            "use_gpu": recipe.use_gpu,
            "cpus_per_worker": recipe.cpus_per_worker,
            "placement": recipe.placement,
            "torch_threads": self.torch_threads,
            "tracking": self.tracking,
            "mlflow_run_id": self.mlflow_run_id,
            "deepspeed": deepspeed_config(self),
        }
        return thaw({k: asdict(v) if is_dataclass(v) else v for k, v in out.items()})


def world_sizes(stage: StageSpec) -> list[int]:
    """The world sizes that hold the stage's global batch: those that divide its micro-batches per step."""
    per_step = stage.global_batch // stage.micro_batch
    return [w for w in range(1, per_step + 1) if per_step % w == 0]


def accumulation(plan: StagePlan, world: int) -> int:
    """Micro-batches each of ``world`` ranks accumulates per step: the global batch held at any size the
    plan allows."""
    return plan.micro_batches_per_step // world


def plan_stage(
    recipe: Recipe,
    stage: StageSpec,
    layout: StageLayout,
    positions: list[int],
    *,
    has_video: bool,
    init_from: str | None,
    data_bytes: int = 0,
    object_store_bytes: float | None = None,
    tracking: TrackingConfig | None = None,
    mlflow_run_id: str | None = None,
) -> StagePlan:
    """Gradient accumulation to reach the global batch, each rank's rows, the exact step count, and the
    stage's data mode. ``auto`` is memory when there is no object store to stream through
    (``object_store_bytes`` None: a local run) or the shards (``data_bytes``) are small beside it, else
    stream: small data is read by every worker once and kept for every epoch (no Ray Data pipeline to
    start, no epoch restarting the reads); large data streams through Ray Data every epoch."""
    workers, micro = recipe.max_workers, stage.micro_batch
    sizes = range(recipe.min_workers, recipe.max_workers + 1)
    held = world_sizes(stage) if stage.global_batch % micro == 0 else []
    if any(w not in held for w in sizes):
        raise ValueError(
            f"stage {stage.name}: global_batch {stage.global_batch} cannot be held at "
            f"{' or '.join(str(w) for w in sizes if w not in held)} workers x micro-batch {micro}: expected "
            f"a global batch that is a multiple of the micro-batch and workers among {held}"
        )
    accum = stage.global_batch // (micro * workers)
    steps_per_epoch = len(positions) // stage.global_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"stage {stage.name}: expected at least {stage.global_batch} rows for one step "
            f"({workers} workers x {micro} micro-batch x {accum} accumulation), found {len(positions)}"
        )
    data_mode = stage.data_mode
    if data_mode == "auto":
        small = object_store_bytes is None or data_bytes <= object_store_bytes * SMALL_DATA_SHARE
        data_mode = "memory" if small else "stream"
    return StagePlan(
        recipe=recipe,
        stage=stage,
        layout=layout,
        init_from=init_from,
        grad_accum=accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=stage.max_steps or steps_per_epoch * stage.epochs,
        data_mode=data_mode,
        has_video=has_video,
        tracking=tracking,
        mlflow_run_id=mlflow_run_id,
    )


def deepspeed_config(plan: StagePlan, world: int | None = None) -> dict:
    """DeepSpeed's config at ``world`` ranks (None: the recipe's most workers)."""
    stage, use_gpu = plan.stage, plan.recipe.use_gpu
    world = world or plan.recipe.max_workers
    zero: dict = {"stage": stage.zero_stage}
    if stage.zero_stage >= 2 and not use_gpu:
        # the contiguous gradient buffer fights GPU memory fragmentation; on CPU it only adds a copy of
        # every gradient per step (~8% of a tiny model's step, benchmarks/train_overhead.py)
        zero["contiguous_gradients"] = False
    if stage.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": accumulation(plan, world),
        "train_batch_size": plan.global_rows,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_gpu},
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
