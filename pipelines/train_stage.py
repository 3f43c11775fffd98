"""One curriculum stage on Ray Train + DeepSpeed, from one stage config.

    llava-ray stage stage1 --recipe llava_onevision --profile tiny --storage runs --run-id demo

Reads top to bottom: ``train_stage`` (driver) sizes the run from the preprocessed shards and starts a
TorchTrainer; ``train_loop`` (every worker) builds the model from the previous stage's HF export,
sets the trainable parts and LR groups, wraps it in DeepSpeed, iterates its Ray Data shard in
modality-grouped micro-batches, checkpoints every N steps (every rank saves its shard, then
``ray.train.report``), resumes from ``ray.train.get_checkpoint()``, and finally exports an HF
checkpoint (safetensors) to ``<storage>/<run>/<stage>/hf``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from components import storage
from components.model import ModelSpec
from components.tracking import TrackingConfig
from pipelines.recipes import Recipe, StageSpec

log = logging.getLogger(__name__)

FAULT_ENV = "LLAVA_RAY_FAULT_AT_STEP"
"""Fault injection for tests: "[STAGE:]STEP:RANK:MARKER" kills that rank once, at that step of that stage
(of any stage without STAGE); the marker file records that it happened."""


@dataclass
class StagePlan:
    """Everything a worker needs, resolved on the driver (logged first, shipped as a dict)."""

    stage: dict
    model: dict
    processor: dict
    """The stage's ProcessorConfig: template, AnyRes grid, video sampling (the export records it)."""
    init_from: str | None
    """The previous stage's HF export; None: build the base models (Stage-1)."""
    export_uri: str
    workers: int
    micro_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    use_gpu: bool = False
    tracking: dict = field(default_factory=dict)
    mlflow_run_id: str | None = None
    fault: str | None = None
    torch_threads: int = 1
    has_video: bool = False
    """Whether the stage's data holds video: then every micro-batch runs the video path too."""
    shards_uri: str | None = None
    """Small data only: the Parquet shards preprocessing wrote (``<data>/data``). Each rank reads them
    once and keeps its rows in memory for every epoch (``_own_rows``, reshuffled each epoch; no Ray Data
    restart, which stalls every rank at each epoch boundary). None: the rows stream from Ray Data, split
    between the workers."""
    history_uri: str | None = None
    """Rank 0 writes the per-step metrics here at every checkpoint (the loss curve's source)."""

    @property
    def keep_shard(self) -> bool:
        return self.shards_uri is not None

    @property
    def window(self) -> int:
        """Rows grouped together before they are cut into steps: ``group_steps`` optimizer steps' worth."""
        return self.micro_batch * self.grad_accum * self.stage["group_steps"]


def plan_stage(
    recipe: Recipe, stage: StageSpec, rows: int, *, init_from: str | None, export_uri: str
) -> StagePlan:
    """Gradient accumulation to reach the global batch, and the exact step count."""
    workers = recipe.workers
    micro = stage.micro_batch
    accum = max(1, stage.global_batch // (micro * workers))
    rows_per_step = micro * accum
    steps_per_epoch = (rows // workers) // rows_per_step
    if steps_per_epoch < 1:
        raise ValueError(
            f"stage {stage.name}: expected at least {rows_per_step * workers} rows for one step "
            f"({workers} workers x {micro} micro-batch x {accum} accumulation), found {rows}"
        )
    total = stage.max_steps or steps_per_epoch * stage.epochs
    model = asdict(recipe.model)
    model["anyres"] = asdict(stage.anyres_config(recipe.model.anyres))
    model.pop("tokenizer_corpus", None)
    processor = stage.processor_config(recipe.model).to_dict()
    return StagePlan(
        stage=asdict(stage), model=model, processor=processor, init_from=init_from, export_uri=export_uri, workers=workers,
        micro_batch=micro, grad_accum=accum, steps_per_epoch=steps_per_epoch, total_steps=total,
        use_gpu=recipe.use_gpu, torch_threads=max(1, int(recipe.cpus_per_worker)),
    )  # fmt: skip


def deepspeed_config(plan: StagePlan) -> dict:
    stage = plan.stage
    zero: dict = {"stage": stage["zero_stage"]}
    if stage["zero_stage"] >= 2 and not plan.use_gpu:
        # the contiguous gradient buffer fights GPU memory fragmentation; on CPU it only adds a copy of
        # every gradient per step (~8% of a tiny model's step, benchmarks/train_overhead.py)
        zero["contiguous_gradients"] = False
    if stage["offload"]:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage["zero_stage"] == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.workers,
        "gradient_clipping": stage["grad_clip"],
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


# ---- the worker side -------------------------------------------------------------------------


def _build(plan: StagePlan):
    """(spec, model, processor) of the stage: the previous stage's export (or the base models), prompted
    with this stage's processor (template, AnyRes grid, video sampling)."""
    from components.model import build_model, load_model
    from components.processor import LlavaProcessor, ProcessorConfig

    spec = ModelSpec(**plan.model)
    model, processor = load_model(plan.init_from) if plan.init_from else build_model(spec)
    stage_config = ProcessorConfig(**plan.processor)
    if processor.config.arch != stage_config.arch:
        source = plan.init_from or spec.checkpoint
        raise ValueError(
            f"{source}: expected a {stage_config.arch} checkpoint (the recipe's arch), found {processor.config.arch}"
        )
    processor = LlavaProcessor(stage_config, processor.tokenizer)
    # this stage's AnyRes grid (Stage-1.5: up to 729 x 5, Stage-2: 729 x 10) lives in the model's config
    processor.arch.set_stage_config(model.config, processor.anyres)
    return spec, model, processor


def _batch_maker(filler, processor, engine) -> Callable[[list[dict]], dict]:
    """Rows of one micro-batch -> the model's inputs: media filled in, collated, and on the engine's
    device in the dtype it trains in (DeepSpeed's: bf16 on GPU, fp32 on CPU; Ray Train picked the
    worker's GPU and DeepSpeed moved the weights there)."""
    from components.batching import to_device

    device, dtype = engine.device, engine.get_data_types()[0]
    return lambda micro: to_device(processor.collate(filler(micro)), device, dtype)


def _apply_lora(model, lora: dict):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.get("r", 8),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    model.model.language_model = get_peft_model(model.model.language_model, config)


def _steps(rows: list[dict], plan: StagePlan, epoch: int, w: int) -> list[list[list[dict]]]:
    """Window ``w`` of an epoch's rows -> optimizer steps of ``grad_accum`` micro-batches. Grouped
    (group_by_modality): the whole window is sorted by (modality, frames, length) before it is cut (LLaVA's
    megabatch grouping; see benchmarks/padding.py), and the micro-batches are dealt to steps in a random
    order seeded by the stage seed, the epoch and the window."""
    import random

    from components.batching import group_rows

    group, seed = plan.stage["group_by_modality"], plan.stage["seed"] + 1000 * epoch + w

    n_steps = len(rows) // (plan.micro_batch * plan.grad_accum)
    rows = rows[: n_steps * plan.micro_batch * plan.grad_accum]
    count = n_steps * plan.grad_accum
    if group:
        micro = group_rows(rows, plan.micro_batch, count)
        random.Random(seed).shuffle(micro)
    else:
        micro = [rows[i * plan.micro_batch : (i + 1) * plan.micro_batch] for i in range(count)]
    return [micro[s * plan.grad_accum : (s + 1) * plan.grad_accum] for s in range(n_steps)]


def shard_batches(uri: str):
    """Record batches of the Parquet shards under a URI (local or s3://), read with pyarrow."""
    from pipelines.preprocess import shards_dataset

    return shards_dataset(uri).to_batches(batch_size=1024)


def _own_rows(batches: Callable[[], Iterable], rank: int, world: int) -> list[dict]:
    """Small data (``keep_shard``): every worker reads the shards (``batches()``: Arrow record batches)
    twice, once for the row keys, once for its rows, and keeps rows rank, rank+W, ... of the mixture's
    order, (source, index). That order, not the order of the stored files (which depends on how
    preprocessing's tasks finished), makes a run reproducible; interleaving gives every rank the same mix
    of datasets and modalities (a mixture lists its datasets one after the other)."""
    from pipelines.stages import mixture_order

    def batches_with_keys():
        for batch in batches():
            yield batch, [mixture_order(r) for r in batch.select(["source", "index"]).to_pylist()]

    keys = [key for _, batch_keys in batches_with_keys() for key in batch_keys]
    share = len(keys) // world  # the same count on every rank
    wanted = set(sorted(keys)[rank::world][:share])
    mine = []
    for batch, batch_keys in batches_with_keys():
        take = [i for i, key in enumerate(batch_keys) if key in wanted]
        if take:
            mine.extend(batch.take(take).to_pylist())
    return sorted(mine, key=mixture_order)[:share]


def epoch_windows(rows: list[dict], plan: StagePlan, epoch: int, rank: int) -> list[list[dict]]:
    """A rank's kept rows for one epoch: reshuffled every epoch (seeded by the stage seed, the epoch and
    the rank, so a resumed attempt sees the same windows), then cut into windows."""
    import random

    rows = list(rows)
    random.Random(f"{plan.stage['seed']}:{epoch}:{rank}").shuffle(rows)
    return [rows[i : i + plan.window] for i in range(0, len(rows), plan.window)]


def _export(engine, model, processor, plan: StagePlan, rank: int) -> None:
    """Gather full weights (ZeRO-3 shards them), merge LoRA, and save an HF checkpoint from rank 0."""
    import deepspeed
    import torch
    from safetensors.torch import save as save_tensors

    from components.batching import to_device
    from components.model import save_model

    spec = ModelSpec(**plan.model)
    processor = processor.replace(template=spec.template)  # the export is prompted conversationally
    probe = processor.probe_batch()
    model.eval()
    with torch.no_grad():  # every rank runs the same probe forward (ZeRO-3 gathers collectively)
        logits = model(**to_device(probe, engine.device, engine.get_data_types()[0])).logits.float().cpu()
    if rank == 0 and plan.history_uri:
        probe_uri = storage.join(plan.history_uri.rsplit("/", 1)[0], "probe_logits.safetensors")
        storage.write_bytes(probe_uri, save_tensors({"logits": logits.contiguous()}))
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=plan.stage["zero_stage"] == 3):
        if rank == 0:
            state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()}
    if rank == 0:
        export = _build(plan)[1]
        if plan.stage.get("lora"):
            _apply_lora(export, plan.stage["lora"])
        export.load_state_dict(state, strict=True)
        if plan.stage.get("lora"):
            export.model.language_model = export.model.language_model.merge_and_unload()
        export.to(torch.float32)
        save_model(export, processor, plan.export_uri)
    torch.distributed.barrier()


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed
    import ray.train
    import torch

    from components.generation import MediaFiller
    from components.model import group_of, param_groups, set_trainable
    from components.tracking import make_tracker

    plan = StagePlan(**config)
    stage = plan.stage
    torch.set_num_threads(plan.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(stage["seed"] + rank)
    spec, model, processor = _build(plan)
    if stage.get("lora"):
        _apply_lora(model, stage["lora"])
    set_trainable(model, stage["trainable"])
    if stage.get("lora"):  # LoRA: only the adapters of the LLM train, beside the other trainable parts
        for name, p in model.model.language_model.named_parameters():
            p.requires_grad_("lora_" in name)
    groups = param_groups(model, stage["lr"], vision_lr=stage["vision_lr"], projector_lr=stage["projector_lr"],
                          weight_decay=stage["weight_decay"])  # fmt: skip
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, plan.total_steps, stage["warmup_ratio"])
    )
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(plan)
    )

    step = 0
    vision_group = group_of(optimizer.param_groups, "vision_tower")
    main_group = group_of(optimizer.param_groups, "language_model") or group_of(
        optimizer.param_groups, "multi_modal_projector"
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d)  # the tag named in its "latest" file
        step = int(client["step"])
        if rank == 0:
            print(f"resumed from checkpoint at step {step}")
    tracker = make_tracker(TrackingConfig(**plan.tracking) if plan.tracking else None, rank=rank,
                           run_id=plan.mlflow_run_id)  # fmt: skip
    fault = (plan.fault or "").split(":")
    filler = MediaFiller(processor, with_video=plan.has_video)
    attempt = _Attempt(
        engine,
        _batch_maker(filler, processor, engine),
        world,
        main_group,
        vision_group,
        start_step=step,
    )
    shard = None if plan.keep_shard else ray.train.get_dataset_shard("train")
    history = []
    kept: list[dict] = []  # small data: this rank's rows for every epoch
    while step < plan.total_steps:
        epoch, skip = divmod(step, plan.steps_per_epoch)  # resume mid-epoch: skip what was consumed
        last_end = wait_start = time.perf_counter()
        if plan.keep_shard and not kept:
            kept = _own_rows(lambda: shard_batches(plan.shards_uri), rank, world)
        if kept:
            windows = epoch_windows(kept, plan, epoch, rank)
        else:
            windows = shard.iter_batches(batch_size=plan.window, batch_format="pyarrow")
        in_epoch = 0
        for w, window in enumerate(windows):
            waited = time.perf_counter() - wait_start
            rows = window if kept else window.to_pylist()
            steps = _steps(rows, plan, epoch, w)
            for micro_batches in steps:
                if in_epoch < skip:
                    in_epoch += 1
                    continue
                if in_epoch >= plan.steps_per_epoch or step >= plan.total_steps:
                    break
                in_epoch += 1
                step, metrics = attempt.train_step(micro_batches, step, waited, last_end)
                waited = 0.0
                last_end = time.perf_counter()
                history.append(metrics)
                tracker.log_metrics(
                    {k: v for k, v in metrics.items() if k not in ("step", "attempt_start_step")}, step=step
                )
                if (
                    fault[0]
                    and step == int(fault[0])
                    and rank == int(fault[1])
                    and not os.path.exists(fault[2])
                ):
                    open(fault[2], "w").close()
                    time.sleep(5)  # let the controller register the last checkpoint, as a later crash would
                    os._exit(1)  # a killed worker: Ray Train restarts the group from the last checkpoint
                if step % stage["checkpoint_every"] == 0 or step == plan.total_steps:
                    if rank == 0 and plan.history_uri:
                        storage.write_text(
                            storage.join(plan.history_uri, f"{step:07d}.json"), json.dumps(history)
                        )
                    # Ray Train hears from us only here: each report is a cross-rank barrier plus a hand-off
                    # that waits for the controller's poll (every 2 s), far longer than a small step
                    with tempfile.TemporaryDirectory() as d:
                        engine.save_checkpoint(d, tag=f"step{step}", client_state={"step": step})
                        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                    history = []
            if in_epoch >= plan.steps_per_epoch or step >= plan.total_steps:
                break
            wait_start = time.perf_counter()
    _export(engine, engine.module, processor, plan, rank)


@dataclass
class _Attempt:
    """What every step of one attempt shares (after a failure Ray Train restarts the worker group, and the
    new attempt resumes from the last checkpoint at ``start_step``)."""

    engine: Any
    make_batch: Callable[[list[dict]], dict]
    """Rows of one micro-batch -> the model's inputs (media filled in, collated)."""
    world: int
    main_group: dict
    vision_group: dict | None
    start_step: int

    def train_step(self, micro_batches: list[list[dict]], step: int, waited: float, last_end: float):
        """One optimizer step over its micro-batches; returns (step, metrics). Throughput counts every
        rank's tokens over the wall-clock interval since the previous step ended (data wait, logging and
        checkpointing included)."""
        import torch

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
        }


# ---- the driver side -------------------------------------------------------------------------


def read_history(history_uri: str) -> list[dict]:
    steps = {}
    for rel in storage.list_files(history_uri):
        for m in json.loads(storage.read_text(storage.join(history_uri, rel))):
            steps[m["step"]] = m
    return [steps[k] for k in sorted(steps)]


def evaluate_export(recipe: Recipe, hf_uri: str) -> dict | None:
    """Greedy generation on the held-out split, per task and modality (None when the recipe has none)."""
    from components.evaluation import evaluate
    from components.manifest import parent_uri
    from components.model import load_model

    manifest = recipe.eval.get("manifest")
    if not manifest:
        return None
    records = [json.loads(line) for line in storage.read_text(manifest).splitlines() if line.strip()]
    model, processor = load_model(hf_uri)  # prompted as the export says: its template, grid, video sampling
    max_new_tokens = int(recipe.eval.get("max_new_tokens", 8))
    return evaluate(model, processor, records, parent_uri(manifest), max_new_tokens=max_new_tokens)


SMALL_DATA_SHARE = 0.1
"""Shards smaller than this share of the object store count as small data (``StagePlan.keep_shard``)."""


def _small(nbytes: int) -> bool:
    """Small data is read by every worker straight from storage, once, and kept for every epoch: no Ray Data
    pipeline, split coordinator or materialized copy to start (seconds per stage), and no epoch restarts
    the reads (a stall of seconds at every epoch boundary, with all workers waiting). Large data streams
    from storage through Ray Data every epoch, split between the workers."""
    import ray

    small = nbytes <= ray.cluster_resources().get("object_store_memory", 0) * SMALL_DATA_SHARE
    how = "read once by every worker and kept" if small else "streamed through Ray Data every epoch"
    log.info("%.1f MiB of shards: %s", nbytes / 2**20, how)
    return small


def train_stage(
    recipe: Recipe,
    stage: StageSpec,
    *,
    storage_uri: str,
    run_id: str,
    data_uri: str,
    init_from: str | None,
    tracking: TrackingConfig | None = None,
    parent_run_id: str | None = None,
    max_failures: int = 1,
    mixture_digest: str | None = None,
) -> dict:
    """Train one stage; returns its record (steps, final loss, checkpoint and HF URIs, MLflow run, eval)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from components.evaluation import format_report
    from components.tracking import loss_curve_png, make_tracker
    from pipelines.preprocess import modality_counts

    start = time.monotonic()
    storage_uri, data_uri = storage.absolute(storage_uri), storage.absolute(data_uri)
    init_from = storage.absolute(init_from) if init_from else None
    stage_uri = storage.join(storage_uri, run_id, stage.name)
    hf_uri = storage.join(stage_uri, "hf")
    shards_uri = storage.join(data_uri, "data")  # what preprocess wrote
    modalities = modality_counts(shards_uri)
    plan = plan_stage(recipe, stage, sum(modalities.values()), init_from=init_from, export_uri=hf_uri)
    plan.has_video = "video" in modalities
    plan.history_uri = storage.join(stage_uri, "history")
    fault = os.environ.get(FAULT_ENV, "").split(":")
    if len(fault) == 4:  # aimed at one stage
        fault = fault[1:] if fault[0] == stage.name else []
    plan.fault = ":".join(fault) or None
    tracking = tracking or TrackingConfig()
    tracker = make_tracker(tracking)
    plan.tracking = asdict(tracking)
    plan.mlflow_run_id = tracker.start_run(
        stage.name,
        parent_run_id=parent_run_id,
        tags={"llava_ray.recipe": recipe.name, "llava_ray.run_id": run_id},
    )
    plan.shards_uri = shards_uri if _small(storage.dir_bytes(shards_uri)) else None
    datasets = {}
    if not plan.keep_shard:
        data_fs, data_path = storage.resolve(shards_uri)
        datasets["train"] = ray.data.read_parquet(data_path, filesystem=data_fs)
    resolved = {"plan": {k: v for k, v in asdict(plan).items() if k not in ("tracking",)},
                "deepspeed": deepspeed_config(plan), "mixture_digest": mixture_digest}  # fmt: skip
    log.info("stage %s resolved config: %s", stage.name, json.dumps(resolved, default=str))
    tracker.log_params({"stage": asdict(stage), "model": plan.model, "workers": plan.workers,
                        "grad_accum": plan.grad_accum, "total_steps": plan.total_steps,
                        "mixture_digest": mixture_digest or ""})  # fmt: skip
    tracker.log_dict(resolved, "resolved_config.json")

    fs, path = storage.resolve(stage_uri)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(plan),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers,
            use_gpu=plan.use_gpu,
            resources_per_worker={"CPU": recipe.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,  # none for small data: each worker reads its interleaved rows (_own_rows)
    )  # same name + storage path: Ray Train restores an interrupted run from its latest checkpoint
    result = trainer.fit()
    history = read_history(plan.history_uri)
    checkpoint_uri = result.checkpoint.path if result.checkpoint else None
    if storage.is_s3(stage_uri) and checkpoint_uri and not checkpoint_uri.startswith("s3://"):
        checkpoint_uri = "s3://" + checkpoint_uri
    record = {
        "stage": stage.name,
        "steps": history[-1]["step"] if history else 0,
        "final_loss": history[-1]["loss"] if history else None,
        "checkpoint_uri": checkpoint_uri,
        "hf_uri": hf_uri,
        "mlflow_run_id": plan.mlflow_run_id,
        "trainable": stage.trainable,
        "streamed": not plan.keep_shard,
    }
    report = evaluate_export(recipe, hf_uri)
    if report:
        print(f"stage {stage.name} evaluation:\n{format_report(report)}")
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
            [m["step"] for m in history], [m["loss"] for m in history], f"{recipe.name} / {stage.name}"
        )
        tracker.log_artifact(png, "plots")
        os.unlink(png)
    record["seconds"] = round(time.monotonic() - start, 1)
    tracker.set_tags({"llava_ray.output_uri": hf_uri, "llava_ray.checkpoint_uri": checkpoint_uri or ""})
    tracker.end_run()
    storage.write_text(storage.join(stage_uri, "result.json"), json.dumps(record, indent=1))
    return record
