"""The driver of one curriculum stage:

    llava-ray stage stage1 --recipe llava_onevision --profile tiny --storage runs --run-id demo

``train_stage`` measures the stage's data, plans it once (pipelines/train/plan.py: a frozen, typed
``StagePlan``, logged and tracked), trains it on Ray Train (pipelines/train/on_ray.py) or in this process
(pipelines/train/local.py), then evaluates the export and closes the stage's MLflow run."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

from components import storage
from components.evaluation import evaluate, format_report
from components.manifest import parent_uri
from components.model import load_model
from components.progress import ProgressPrinter
from components.tracking import TrackingConfig, loss_curve_png, make_tracker
from pipelines.layout import StageLayout
from pipelines.preprocess import shards_dataset
from pipelines.recipes import Recipe, StageSpec
from pipelines.train.local import fit_here
from pipelines.train.plan import StagePlan, accumulation, plan_stage
from pipelines.train.worker import StepHook

log = logging.getLogger(__name__)


def read_history(history_uri: str) -> list[dict]:
    """Every step's record of a stage, each once (a resumed attempt rewrites the steps it replayed)."""
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
    step_hooks: Sequence[StepHook] = (),
    local: bool = False,
    progress_every_s: float = 30.0,
) -> dict:
    """Train one stage; returns its record (steps, final loss, checkpoint and HF URIs, MLflow run, eval).
    ``mlflow_run_id``: the stage's run from an interrupted attempt, continued (one curve, one run).
    ``step_hooks``: called on every rank after each step (pipelines/train/worker.py's StepHook).
    ``progress_every_s``: away from a terminal, a progress line this often (a terminal gets a live bar).
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
        if local and recipe.workers != 1:
            raise ValueError(
                f"stage {stage.name}: a local run trains on one rank: expected workers 1, "
                f"found {recipe.workers}"
            )
        plan = _plan(recipe, stage, layout, init_from, local, tracking, tracker.run_id)
        _log_plan(plan, tracker)
        printer = ProgressPrinter(stage.name, plan.total_steps, every_s=progress_every_s)
        try:
            if local:
                checkpoint_uri = fit_here(plan, step_hooks, printer)
                placements = [{"rank": 0, "node_id": None, "node_ip": "local"}]
            else:
                from pipelines.train.on_ray import fit_on_ray  # Ray only where the stage runs on it

                checkpoint_uri, placements = fit_on_ray(plan, max_failures, step_hooks, printer)
        finally:
            printer.close()
        record = _finish(recipe, plan, tracker, checkpoint_uri)
        record["workers"] = placements
    except BaseException as e:
        tracker.fail(e)
        raise
    record["seconds"] = round(time.monotonic() - start, 1)
    storage.write_text(layout.result, json.dumps(record, indent=1))
    return record


def _plan(recipe, stage, layout, init_from, local, tracking, run_id) -> StagePlan:
    """The stage's plan from what the driver measured: the data's positions and modalities, and for an
    ``auto`` data mode on Ray, the shards' size and the object store's."""
    positions, modalities = data_stats(layout)
    store = None
    if not local and stage.data_mode == "auto":
        from pipelines.train.on_ray import object_store_bytes  # Ray only where the stage runs on it

        store = object_store_bytes()
    return plan_stage(
        recipe,
        stage,
        layout,
        positions,
        has_video="video" in modalities,
        init_from=init_from,
        data_bytes=storage.dir_bytes(layout.data) if store is not None else 0,
        object_store_bytes=store,
        tracking=tracking,
        mlflow_run_id=run_id,
    )


def _log_plan(plan: StagePlan, tracker) -> None:
    """The resolved plan to the stage's storage (plan.json) and to MLflow (params, and the JSON as an
    artifact); the console gets its gist."""
    resolved = json.loads(json.dumps(plan.resolved(), default=str))
    storage.write_text(plan.layout.plan, json.dumps(resolved, indent=1))
    print(plan_summary(plan), flush=True)
    tracker.log_params(
        {
            "stage": asdict(plan.stage),
            "model": asdict(plan.recipe.model),
            "workers": plan.recipe.workers,
            "grad_accum": plan.grad_accum,
            "total_steps": plan.total_steps,
            "data_mode": plan.data_mode,
        }
    )
    tracker.log_dict(resolved, "plan.json")
    if storage.exists(plan.layout.mixture):
        tracker.log_dict(json.loads(storage.read_text(plan.layout.mixture)), "mixture.json")


def _workers(recipe: Recipe) -> str:
    return f"{recipe.min_workers}-{recipe.max_workers}" if recipe.elastic else str(recipe.max_workers)


def _accumulations(plan: StagePlan) -> str:
    recipe = plan.recipe
    if not recipe.elastic:
        return str(plan.grad_accum)
    return f"{accumulation(plan, recipe.max_workers)}-{accumulation(plan, recipe.min_workers)}"


def plan_summary(plan: StagePlan) -> str:
    """Two lines: the batch arithmetic and the stage's shape, and where the whole plan is."""
    recipe, stage = plan.recipe, plan.stage
    epochs = plan.total_steps / plan.steps_per_epoch
    return (
        f"stage {stage.name}: {_workers(recipe)} workers x {stage.micro_batch} micro-batch x "
        f"{_accumulations(plan)} accumulation = {plan.global_rows} global batch; "
        f"{plan.total_steps} steps ({epochs:.3g} epochs); data {plan.data_mode}; ZeRO-{stage.zero_stage}\n"
        f"stage {stage.name}: the resolved plan is in {plan.layout.plan}"
    )


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
