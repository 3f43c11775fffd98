"""One stage on one rank: ``StageWorker``, with one public method per seam (setup_model, setup_optimizer,
setup_data, resume, setup_step, make_batch, train_step, save_checkpoint, export) and ``train``, which calls
them in order under a watchdog. The rank's surroundings (rank, world, checkpoints, reports) come from a
``RankContext``: Ray Train's (pipelines/train/on_ray.py) or one process's (pipelines/train/local.py).

Words: ``ds_model`` is the model as DeepSpeed wraps it (its "engine"); ``context`` is the rank context.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from components import storage
from components.batching import to_device
from components.conversation import IGNORE_INDEX
from components.deepspeed_ops import ensure_ops
from components.generation import MediaFiller
from components.model import (
    LinearProjector,
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
from components.processor import LlavaProcessor
from components.progress import eta_s
from components.tracking import make_tracker
from pipelines.train import portable
from pipelines.train.data import InMemorySteps, RowSource, Step
from pipelines.train.plan import StagePlan, cosine_with_warmup, deepspeed_config
from pipelines.train.watchdog import Watchdog

StepHook = Callable[[int, int], None]
"""A run option, not part of the plan: called on every rank after each optimizer step (and its
checkpoint, when one is due) as hook(step, rank). Tests inject faults through it (tests/faults.py)."""


@dataclass(frozen=True)
class Interruption:
    """This attempt is about to end: a node's preemption notice, or room for more workers."""

    reason: str
    wait_s: float
    """How long to wait for Ray Train's restart after the checkpoint before going on."""
    ends_attempt: bool = False
    """The ranks end the attempt themselves after the checkpoint (the driver starts the next one at the
    size that fits) rather than wait for Ray Train to end it."""


class RankContext(Protocol):
    rank: int
    world: int
    ends_process: bool
    """True: a stalled rank ends its process (Ray Train then sees the worker lost); False: the watchdog
    raises StageStalled in the rank, whose process is the caller's."""

    def note(self, phase: str) -> None:
        """What the rank is doing now (for the stall message)."""

    def stalled(self, message: str) -> None:
        """The watchdog fired."""

    def resume_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """The newest checkpoint as a local directory (None: there is none)."""

    def report(self, metrics: dict, directory: str) -> None:
        """Publish a checkpoint written to ``directory`` with its step's metrics."""

    def progress(self, record: dict) -> None:
        """Rank 0's progress after a step, for the driver's console."""

    def row_source(self, plan: StagePlan) -> RowSource:
        """Where this rank's rows come from (the plan's data mode)."""

    def interruption(self, plan: StagePlan) -> Interruption | None:
        """After each step, on every rank (the same answer on each): whether the attempt is about to end."""

    def noticed(self, notice: Interruption, step: int) -> None:
        """After the checkpoint of ``step`` that ``notice`` asked for, before anything may end the attempt:
        that checkpoint is the one the next attempt resumes from."""


def _deepspeed():
    import deepspeed  # in the training process only: it probes the accelerator and its ops at import

    return deepspeed


class StageWorker:
    """One stage on one rank, seam by seam; ``train`` reads top to bottom."""

    def __init__(self, plan: StagePlan, context: RankContext, step_hooks: Sequence[StepHook] = ()):
        self.plan, self.context, self.step_hooks = plan, context, tuple(step_hooks)
        self.rank, self.world = context.rank, context.world
        self.replayed = 0
        """Steps trained again after a restart, over every attempt of the stage so far."""

    def train(self) -> dict | None:
        """The stage on this rank, under a watchdog (``stall_timeout_s``) that names the phase it stalled
        in. None when the stage is done; ``{"ended": reason, "step": step}`` when the ranks ended the
        attempt at a checkpoint for the driver to start the next."""
        with Watchdog(self.context, self.plan.stage.stall_timeout_s, self.plan.stage.name) as self.progress:
            return self._train()

    def _train(self) -> dict | None:
        """The stage's seams in order; the node's system metrics recorded from the first to the last
        (set-up and export included: a stage's memory peaks while it builds and saves)."""
        tracker = self.tracker()
        tracker.start_system_metrics()
        try:
            return self._seams(tracker)
        finally:
            tracker.stop_system_metrics()

    def _seams(self, tracker) -> dict | None:
        plan, progress = self.plan, self.progress
        torch.set_num_threads(plan.torch_threads)
        torch.manual_seed(plan.recipe.seed + self.rank)
        progress("setting up: DeepSpeed's ops (built once per node, under a lock a dead holder releases)")
        ensure_ops(on_wait=progress)
        progress("setting up: the model")
        model, processor = self.setup_model()
        progress("setting up: the optimizer (deepspeed.initialize)")
        ds_model, optimizer = self.setup_optimizer(model)
        progress("setting up: the data")
        source = self.setup_data()
        progress("resuming from the last checkpoint")
        step = self.resume(ds_model)
        self.setup_step(ds_model, optimizer, processor, start_step=step)
        ended = self._steps_until_done(ds_model, source, tracker, [], step)
        if ended is not None:
            return ended
        progress("exporting the HF checkpoint")
        self.export(ds_model, processor)
        return None

    def _steps_until_done(
        self, ds_model, source: RowSource, tracker, history: list[dict], step: int
    ) -> dict | None:
        """Every step left, each logged, checkpointed when due, and followed by the step hooks; or the
        steps until a notice that ends the attempt (returned, with the step checkpointed)."""
        plan, progress = self.plan, self.progress
        while step < plan.total_steps:
            for micro_batches, waited, last_end in self._steps(source, step):
                progress(f"step {step + 1}")
                step, metrics = self.train_step(micro_batches, step, waited, last_end)
                history.append(metrics)
                tracker.log_metrics(_loggable(metrics), step=step)
                if self.rank == 0:
                    self.report_progress(metrics)
                saved = step % plan.stage.checkpoint_every == 0 or step == plan.total_steps
                if saved:
                    progress(f"saving the checkpoint of step {step}")
                    self.save_checkpoint(ds_model, step, metrics, history)
                    history = []
                notice = self.context.interruption(plan) if step < plan.total_steps else None
                if notice is not None:  # the group is about to restart: nothing trained after this is lost
                    if not saved:
                        progress(f"saving the checkpoint of step {step} ({notice.reason})")
                        self.save_checkpoint(ds_model, step, metrics, history)
                        history = []
                    self.context.noticed(notice, step)
                    if not notice.ends_attempt:
                        self.await_restart(notice)
                progress(f"step hooks after step {step}")
                for hook in self.step_hooks:
                    hook(step, self.rank)
                if notice is not None and notice.ends_attempt:
                    if self.rank == 0:
                        print(f"stage {plan.stage.name}: {notice.reason}: checkpointed, ending this attempt")
                    return {"ended": notice.reason, "step": step}
                if step == plan.total_steps or step % plan.steps_per_epoch == 0:
                    break
            progress(f"reading the data of epoch {step // plan.steps_per_epoch}")
        return None

    def _steps(self, source: RowSource, step: int) -> Iterator[tuple[Step, float, float]]:
        """The rest of ``step``'s epoch: (micro-batches, seconds waited for them, when the previous step
        ended); a resumed epoch skips what the interrupted attempt trained on."""
        epoch, done = divmod(step, self.plan.steps_per_epoch)
        steps = iter(source.epoch(epoch))
        for _ in range(done):
            next(steps)
        last_end = time.perf_counter()
        for micro_batches in steps:
            yield micro_batches, time.perf_counter() - last_end, last_end
            last_end = time.perf_counter()

    def await_restart(self, notice: Interruption) -> None:
        """After the checkpoint a notice asked for: wait for Ray Train to end this attempt (a preempted node
        reclaimed, a group resized), the watchdog told; if no restart comes within the notice's wait, the
        stage goes on from here."""
        if self.rank == 0:
            print(f"stage {self.plan.stage.name}: {notice.reason}: checkpointed, waiting for the restart")
        end = time.monotonic() + notice.wait_s
        while time.monotonic() < end:
            self.progress(f"waiting for Ray Train to restart the workers ({notice.reason})")
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))

    def setup_model(self):
        """(model, processor): the previous stage's export (or the base models) prompted with this stage's
        processor, its AnyRes grid in the config, LoRA applied, the stage's parts trainable."""
        plan = self.plan
        dtype = torch.bfloat16 if plan.recipe.use_gpu else torch.float32  # never a whole fp32 copy on a GPU
        with partitioned_build(
            deepspeed_config(plan, self.world)
        ):  # ZeRO-3: each rank builds only its partition
            if plan.init_from:
                model, processor = load_model(plan.init_from, dtype=dtype)
            else:
                model, processor = build_model(plan.recipe.model, seed=plan.recipe.seed)
        if processor.config.arch != plan.processor.arch:
            raise ValueError(
                f"{plan.init_from or plan.recipe.model.checkpoint}: expected a {plan.processor.arch} "
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
        trainable parameter must be in exactly one group (checked). Returns (ds_model, optimizer)."""
        stage = self.plan.stage
        groups = param_groups(
            model,
            stage.lr,
            vision_lr=stage.vision_lr,
            projector_lr=stage.projector_lr,
            weight_decay=stage.weight_decay,
        )
        grouped = [p for g in groups for p in g["params"]]
        distinct = {id(p) for p in grouped}
        trainable = [p for p in model.parameters() if p.requires_grad]
        if len(grouped) != len(distinct) or distinct != {id(p) for p in trainable}:
            raise RuntimeError(
                f"optimizer groups: expected each of {len(trainable)} trainable parameters once, "
                f"found {len(grouped)} in groups ({len(distinct)} distinct)"
            )
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        total, warmup = self.plan.total_steps, stage.warmup_ratio
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_with_warmup(s, total, warmup)
        )
        ds_model, optimizer, _, _ = _deepspeed().initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=deepspeed_config(self.plan, self.world),
        )
        return ds_model, optimizer

    def setup_data(self) -> RowSource:
        if self.plan.data_mode == "memory":
            return InMemorySteps(self.plan, self.rank, self.world)
        return self.context.row_source(self.plan)

    def resume(self, ds_model) -> int:
        """The step of the newest checkpoint (0 without one): weights, optimizer moments and step count, LR
        schedule and RNG restored at whatever world size this attempt has, then checked against the
        checkpoint bit for bit before the first step (pipelines/train/portable.py). Steps an earlier
        attempt trained past that checkpoint are counted as replayed (from the progress record rank 0
        keeps in the stage's storage)."""
        with self.context.resume_dir() as d:
            meta = None
            if d is not None:
                meta = portable.load(ds_model, d, self.rank)
                portable.verify(ds_model, d, self.rank)
        step = int(meta["step"]) if meta else 0
        self.replayed = (meta or {}).get("replayed", 0) + max(0, self._last_trained_step() - step)
        if meta and self.rank == 0:
            print(
                f"resumed from checkpoint at step {step} (saved at world {meta['world']}, now {self.world}; "
                f"{self.replayed} step(s) replayed in all)"
            )
        return step

    def _last_trained_step(self) -> int:
        """The last step an earlier attempt of this stage finished (its progress record), 0 if none."""
        layout = self.plan.layout
        if not storage.exists(layout.progress):
            return 0
        record = json.loads(storage.read_text(layout.progress))
        return int(record.get("step", 0)) if record.get("stage") == self.plan.stage.name else 0

    def setup_step(self, ds_model, optimizer, processor, start_step: int) -> None:
        """What every step of this attempt shares: the DeepSpeed model, how rows become the model's
        inputs, the optimizer groups whose LRs are logged, and the step the attempt started from (after a
        failure Ray Train restarts the worker group, and the new attempt resumes from the last
        checkpoint)."""
        # the fillers keep every rank's collectives in step (ZeRO-3); one rank has no one to wait for, and a
        # filler padded to a long row's length would double a micro-batch of one's compute
        self.filler = MediaFiller(processor, with_video=self.plan.has_video) if self.world > 1 else list
        self.ds_model, self.processor, self.start_step = ds_model, processor, start_step
        self.main_group = group_of(optimizer.param_groups, "language_model") or group_of(
            optimizer.param_groups, "multi_modal_projector"
        )
        self.vision_group = group_of(optimizer.param_groups, "vision_tower")
        self.started = time.monotonic()
        self.first_step_at: float | None = None

    def make_batch(self, micro: list[dict]) -> dict:
        """Rows of one micro-batch -> the model's inputs (media filled in, collated, on the device; bf16 on
        a GPU, fp32 on the CPU)."""
        ds_model = self.ds_model
        return to_device(
            self.processor.collate(self.filler(micro)), ds_model.device, ds_model.get_data_types()[0]
        )

    def train_step(self, micro_batches: Step, step: int, waited: float, last_end: float):
        """One optimizer step over its micro-batches; returns (step, metrics). The step's objective is the
        global batch's: every supervised token's loss (all ranks, all micro-batches) summed and divided by
        the global batch's supervised-token count, so the gradient and the logged loss are the same at any
        world size and accumulation. Throughput counts every rank's tokens over the wall-clock interval
        since the previous step ended (data wait, logging and checkpointing included)."""
        ds_model, world = self.ds_model, self.world
        # every rank's counts, summed before the first forward: the loss's denominator is the global one
        counts = torch.tensor(
            [
                sum(len(r["input_ids"]) for micro in micro_batches for r in micro),
                sum(map(len, micro_batches)),
                sum(supervised_tokens(r) for micro in micro_batches for r in micro),
            ],
            dtype=torch.float64,
        )
        if world > 1:
            torch.distributed.all_reduce(counts)
        tokens, samples, supervised = (int(c) for c in counts)
        denominator = torch.tensor(float(max(1, supervised)))
        share, micro_modalities = torch.zeros((), dtype=torch.float64), []
        for micro in micro_batches:
            micro_modalities.append({r["modality"] for r in micro})
            out = ds_model(**self.make_batch(micro), num_items_in_batch=denominator)
            # out.loss: this micro-batch's summed token losses over the global count. DeepSpeed averages
            # gradients over the ranks (undone by x world) and divides by the accumulation unless told not
            # to; told so, DeepSpeed 0.19 still divides when the tensor given is the model's output itself
            # (its output hook runs first), so the backward is of a new tensor, at every world size
            objective = out.loss * world
            ds_model.backward(objective, scale_wrt_gas=False)
            ds_model.step()
            share += float(out.loss.detach())
        ids = [r.get("sample_id") for micro in micro_batches for r in micro]
        if world > 1:
            torch.distributed.all_reduce(share)
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, ids)
            ids = [i for rank_ids in gathered for i in rank_ids]
        interval = time.perf_counter() - last_end
        return step + 1, {
            "step": step + 1,
            "loss": float(share),
            "lr": self.main_group["lr"],
            "grad_norm": float(ds_model.get_global_grad_norm() or 0.0),
            "tokens": tokens,
            "supervised_tokens": supervised,
            "world": world,
            "sample_ids": sorted(ids),
            "step_s": interval,
            "tokens_per_s": tokens / interval,
            "samples_per_s": samples / interval,
            "data_wait_share": min(1.0, waited / interval),
            "lr_vision": self.vision_group["lr"] if self.vision_group else None,
            "attempt_start_step": self.start_step,
            "replayed_steps": self.replayed,
            "text_only_batches": sum(1 for m in micro_modalities if m == {"text"}),
            "modalities": sorted(set().union(*micro_modalities)),
        }

    def report_progress(self, metrics: dict) -> None:
        """Rank 0, after each step: the progress record, to the stage's storage (``llava-ray status``) and
        to the driver's console (through the rank context). ETA: the pace of this attempt's steps."""
        now = time.monotonic()
        if self.first_step_at is None:
            self.first_step_at = now - metrics["step_s"]
        step, total = metrics["step"], self.plan.total_steps
        record = {
            "stage": self.plan.stage.name,
            "step": step,
            "total": total,
            "loss": metrics["loss"],
            "tokens_per_s": metrics["tokens_per_s"],
            "elapsed_s": round(now - self.started, 3),
            "eta_s": eta_s(now - self.first_step_at, step, total, self.start_step),
            "world": self.world,
            "time": time.time(),
        }
        storage.write_text(self.plan.layout.progress, json.dumps(record))
        self.context.progress(record)

    def tracker(self):
        return make_tracker(self.plan.tracking, rank=self.rank, run_id=self.plan.mlflow_run_id)

    def save_checkpoint(self, ds_model, step: int, metrics: dict, history: list[dict]) -> None:
        """Every rank saves its shard; rank 0 writes the steps since the last checkpoint to the history."""
        if self.rank == 0:
            storage.write_text(
                storage.join(self.plan.layout.history, f"{step:07d}.json"), json.dumps(history)
            )
        with tempfile.TemporaryDirectory() as d:
            portable.save(ds_model, d, step, self.rank, self.world, extra={"replayed": self.replayed})
            self.context.report(metrics, d)

    def export(self, ds_model, processor) -> None:
        """Gather full weights (ZeRO-3 shards them), merge LoRA, save an HF checkpoint from rank 0 with the
        stage's processor (prompted with the model's conversational template), and the probe logits the
        training model gives, which the export must reproduce."""
        plan, model = self.plan, ds_model.module
        processor = processor.replace(template=plan.recipe.model.template)
        model.eval()
        with torch.no_grad():  # every rank runs the same probe forward (ZeRO-3 gathers collectively)
            probe = to_device(processor.probe_batch(), ds_model.device, ds_model.get_data_types()[0])
            logits = model(**probe).logits.float().cpu()
        params = list(model.parameters())
        with _deepspeed().zero.GatheredParameters(
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
    linear = plan.recipe.model.projector == "linear"
    model = model_from_config(config, linear_projector=linear)
    if plan.stage.lora:
        apply_lora(model, plan.stage.lora)
    assert not linear or isinstance(model.model.multi_modal_projector, LinearProjector)
    return model


def apply_lora(model, lora) -> None:
    from peft import LoraConfig, get_peft_model  # LoRA stages only (peft loads much of transformers)

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    model.model.language_model = get_peft_model(model.model.language_model, config)


def supervised_tokens(row: dict) -> int:
    """Tokens of a row that its loss counts: labels after the one-token shift that are not ignored (as
    transformers' causal-LM loss counts them)."""
    return int((np.asarray(row["labels"])[1:] != IGNORE_INDEX).sum())


def _loggable(metrics: dict) -> dict:
    """The step's numbers, as MLflow metrics (the step is their x; the rest is history only)."""
    skip = ("step", "attempt_start_step")
    return {
        k: v
        for k, v in metrics.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
