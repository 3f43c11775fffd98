"""The end-to-end run: for each stage, preprocess -> train (+ eval), in order; then register and deploy.

    llava-ray run --recipe llava_onevision --profile tiny --storage runs --tracking-uri runs/mlflow

Each node records its status and output URI in a run-state file (``<storage>/<run>/state.json``,
with an event log) and in MLflow. A re-run of the same run id skips completed nodes after checking
that their outputs exist and their manifests are complete, and resumes an interrupted training node
from its last checkpoint. A stage never guesses a path: it takes the URI the previous stage recorded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

from components import storage
from components.tracking import TrackingConfig, make_tracker
from pipelines.preprocess import PreprocessConfig, preprocess
from pipelines.recipes import Recipe, ensure_demo_data, load_recipe, stage_config
from pipelines.train_stage import train_stage

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """One pipeline run."""

    recipe: str = "llava_onevision"
    profile: str = "tiny"
    storage: str = "runs"
    """Where everything goes: a local directory or s3://bucket/prefix."""
    run_id: str = "default"
    """Re-running the same id skips what is done."""
    tracking_uri: str | None = None
    experiment: str = "llava-ray"
    from_stage: str | None = None
    until_stage: str | None = None
    demo_dir: str = "demo_out/data"
    max_failures: int = 1
    register_as: str | None = None
    """Register the final HF export in the MLflow model registry under this name (default: the recipe's)."""


def _record_node(tracker, name: str, status: str, output_uri: str) -> None:
    """Each node's status and output URI, as tags on the pipeline's parent MLflow run."""
    if tracker.enabled:
        tracker.set_tags({f"node.{name}.status": status, f"node.{name}.output_uri": output_uri})


class RunState:
    """The run-state file: per node, its status and outputs; plus an append-only event log."""

    def __init__(self, uri: str):
        self.uri = uri
        self.data = json.loads(storage.read_text(uri)) if storage.exists(uri) else {"nodes": {}, "events": []}

    def node(self, name: str) -> dict:
        return self.data["nodes"].get(name, {})

    def set(self, name: str, **fields) -> None:
        self.data["nodes"].setdefault(name, {}).update(fields)
        self.save()

    def event(self, node: str, event: str, **extra) -> None:
        self.data["events"].append({"time": round(time.time(), 3), "node": node, "event": event, **extra})
        self.save()

    def save(self) -> None:
        storage.write_text(self.uri, json.dumps(self.data, indent=1))


def _stages(recipe: Recipe, cfg: PipelineConfig):
    names = [s.name for s in recipe.stages]
    for bound in (cfg.from_stage, cfg.until_stage):
        if bound and bound not in names:
            raise ValueError(f"--from/--until: expected one of {names}, found {bound!r}")
    lo = names.index(cfg.from_stage) if cfg.from_stage else 0
    hi = names.index(cfg.until_stage) if cfg.until_stage else len(names) - 1
    return recipe.stages[lo : hi + 1]


def _preprocess_done(node: dict, out_uri: str) -> bool:
    return node.get("status") == "completed" and storage.exists(storage.join(out_uri, "summary.json"))


def _train_done(node: dict) -> bool:
    return (
        node.get("status") == "completed" and bool(node.get("hf_uri")) and storage.is_complete(node["hf_uri"])
    )


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) the recipe's DAG; returns the summary with one record per stage."""
    recipe = load_recipe(cfg.recipe, cfg.profile, demo_dir=cfg.demo_dir)
    if cfg.profile == "tiny":
        ensure_demo_data(cfg.demo_dir, recipe.model.anyres.tile_size)
    log.info("pipeline config: %s", json.dumps(asdict(cfg)))
    run_uri = storage.join(cfg.storage, cfg.run_id)
    state = RunState(storage.join(run_uri, "state.json"))
    tracking = TrackingConfig(uri=cfg.tracking_uri, experiment=cfg.experiment)
    tracker = make_tracker(tracking)
    parent = state.data.get("mlflow_parent_run_id")
    if tracker.enabled and not parent:
        parent = tracker.start_run(f"{recipe.name}:{cfg.run_id}", tags={"llava_ray.recipe": recipe.name})
        tracker.log_params({"recipe": recipe.name, "profile": cfg.profile, "storage": cfg.storage})
        state.data["mlflow_parent_run_id"] = parent
        state.save()
    elif tracker.enabled:
        tracker.run_id = parent

    records = []
    previous = _previous_export(recipe, cfg, state)
    for stage in _stages(recipe, cfg):
        pre_name, train_name = f"preprocess:{stage.name}", f"train:{stage.name}"
        data_uri = storage.join(run_uri, stage.name)
        if _preprocess_done(state.node(pre_name), data_uri):
            state.event(pre_name, "skipped")
        else:
            state.event(pre_name, "started")
            config = PreprocessConfig(
                manifest=stage.data, data_root=recipe.data_root, stage=stage_config(recipe, stage)
            )
            summary = preprocess(config, data_uri)
            state.set(pre_name, status="completed", output_uri=data_uri, accepted=summary["accepted"],
                      rejected=summary["rejected"], mixture_digest=summary["mixture_digest"])  # fmt: skip
            state.event(pre_name, "completed")
            _record_node(tracker, pre_name, "completed", data_uri)
        node = state.node(train_name)
        if _train_done(node):
            state.event(train_name, "skipped")
            record = json.loads(storage.read_text(storage.join(data_uri, "result.json")))
        else:
            state.event(train_name, "resumed" if node.get("status") == "started" else "started")
            state.set(train_name, status="started")
            record = train_stage(
                recipe, stage, storage_uri=cfg.storage, run_id=cfg.run_id, data_uri=data_uri, init_from=previous,
                tracking=tracking, parent_run_id=parent, max_failures=cfg.max_failures,
                mixture_digest=state.node(pre_name).get("mixture_digest"),
            )  # fmt: skip
            state.set(train_name, status="completed", hf_uri=record["hf_uri"], checkpoint_uri=record["checkpoint_uri"],
                      mlflow_run_id=record["mlflow_run_id"], init_from=previous)  # fmt: skip
            state.event(train_name, "completed")
            _record_node(tracker, train_name, "completed", record["hf_uri"])
            if tracker.enabled:
                tracker.log_metrics(
                    {f"{stage.name}/final_loss": record["final_loss"] or 0.0}, step=len(records)
                )
        previous = record["hf_uri"]
        records.append(record)

    summary = {"run_id": cfg.run_id, "recipe": recipe.name, "stages": records, "final_model": previous,
               "mlflow_parent_run_id": parent, "state_uri": state.uri}  # fmt: skip
    if tracker.enabled and records and not cfg.until_stage:
        version = tracker.register_model(cfg.register_as or recipe.name, previous)
        summary["registered_model"] = {"name": cfg.register_as or recipe.name, "version": version}
        tracker.set_tags({"llava_ray.final_model": previous})
    storage.write_text(storage.join(run_uri, "summary.json"), json.dumps(summary, indent=1))
    return summary


def _previous_export(recipe: Recipe, cfg: PipelineConfig, state: RunState) -> str | None:
    """For --from STAGE: the HF export recorded by the stage before it (never a guessed path)."""
    if not cfg.from_stage:
        return None
    names = [s.name for s in recipe.stages]
    index = names.index(cfg.from_stage)
    if index == 0:
        return None
    before = state.node(f"train:{names[index - 1]}")
    if not _train_done(before):
        raise RuntimeError(
            f"--from {cfg.from_stage}: expected stage {names[index - 1]} completed in run {cfg.run_id!r} "
            f"with a complete HF export, found status {before.get('status', 'absent')!r}"
        )
    return before["hf_uri"]


def format_summary(summary: dict) -> str:
    lines = [
        f"{'stage':12s} {'steps':>5s} {'loss':>7s} {'eval acc':>8s} {'chance':>7s}  checkpoint / MLflow run"
    ]
    for r in summary["stages"]:
        ev = (r.get("eval") or {}).get("overall", {})
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-"
        acc = f"{ev.get('accuracy', 0):.3f}" if ev else "-"
        chance = f"{ev.get('chance', 0):.3f}" if ev else "-"
        lines.append(f"{r['stage']:12s} {r['steps']:5d} {loss:>7s} {acc:>8s} {chance:>7s}  {r['hf_uri']}")
        lines.append(f"{'':43s}  mlflow run {r.get('mlflow_run_id') or '-'}")
    return "\n".join(lines)
