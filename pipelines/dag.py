"""The end-to-end run: for each stage, preprocess -> train (+ eval), in order; then register the model.

    llava-ray run --recipe llava_onevision --profile tiny --storage runs --tracking-uri runs/mlflow

Each node records its status and output URI in a run-state file (``RunLayout.state``, with an event log)
and in MLflow. A re-run of the same run id skips completed nodes after checking that their outputs exist
and their manifests are complete, and resumes an interrupted training node from its last checkpoint, in
the same MLflow run. A stage never guesses a path: it takes the URI the previous stage recorded. Every
MLflow run ends FINISHED, or FAILED with the error as a tag.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace

from components import storage
from components.tracking import TrackingConfig, make_tracker
from pipelines.layout import RunLayout
from pipelines.preprocess import PreprocessConfig, preprocess
from pipelines.recipes import Recipe, RecipeError, ensure_demo_data, load_recipe, step_config
from pipelines.train.stage import train_stage
from pipelines.train.worker import StepHook

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
    data_mode: str | None = None
    """memory or stream for every stage; None: each stage's own (``auto``: by size)."""
    max_steps: int | None = None
    """Cap every stage at this many optimizer steps (a quick run of a whole recipe); None: the recipe's."""
    workers: int | None = None
    """Train every stage on this many workers (a smaller or larger machine than the profile's); None: the
    recipe's. The global batch stays the recipe's: fewer workers accumulate more micro-batches."""
    seed: int | None = None
    """The model's initialisation and every stage's seed (data order, mixture sampling); None: the
    recipe's."""
    placement: str | None = None
    """PACK, SPREAD or STRICT_SPREAD for every stage's training workers; None: the recipe's (PACK)."""
    local: bool = False
    """Run every node in this process, without Ray: preprocessing in-process and training on one rank
    (the global batch kept by accumulation). For small runs, debugging and a machine without a cluster;
    the run state, MLflow runs, exports and resume are the same."""
    progress_every_s: float = 30.0
    """Away from a terminal (CI, ``ray job logs``, a file), a progress line this often; a terminal gets a
    live bar."""
    step_hooks: dict[str, tuple[StepHook, ...]] = field(default_factory=dict)
    """Per stage name, hooks run on every rank after each step (tests inject faults with them)."""


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


def select_stages(recipe: Recipe, from_stage: str | None, until_stage: str | None):
    """The stages from..until, in order; a name not in the recipe is an error that lists the recipe's."""
    names = [s.name for s in recipe.stages]
    for flag, bound in (("--from", from_stage), ("--until", until_stage)):
        if bound and bound not in names:
            raise RecipeError(
                f"{flag}: expected a stage of recipe {recipe.name} ({', '.join(names)}), found {bound!r}"
            )
    lo = names.index(from_stage) if from_stage else 0
    hi = names.index(until_stage) if until_stage else len(names) - 1
    if lo > hi:
        raise RecipeError(f"--from/--until: expected {from_stage!r} no later than {until_stage!r} in {names}")
    return recipe.stages[lo : hi + 1]


def _preprocess_done(node: dict, out_uri: str) -> bool:
    return node.get("status") == "completed" and storage.exists(out_uri)


def _train_done(node: dict) -> bool:
    return (
        node.get("status") == "completed" and bool(node.get("hf_uri")) and storage.is_complete(node["hf_uri"])
    )


def with_overrides(recipe: Recipe, cfg: PipelineConfig) -> Recipe:
    """The recipe with the run's caps, data mode, workers and seed: ``max_steps`` caps every stage (a
    checkpoint half-way, so that a quick run can still be resumed from one); ``data_mode`` replaces every
    stage's; ``workers`` replaces the profile's; ``seed`` replaces the recipe's one seed."""
    if cfg.max_steps:
        cap = cfg.max_steps
        recipe = replace(
            recipe,
            stages=[
                replace(
                    s,
                    max_steps=min(s.max_steps or cap, cap),
                    checkpoint_every=max(1, min(s.checkpoint_every, cap // 2)),
                )
                for s in recipe.stages
            ],
        )
    if cfg.data_mode:
        recipe = replace(recipe, stages=[replace(s, data_mode=cfg.data_mode) for s in recipe.stages])
    if cfg.workers or cfg.local:
        recipe = replace(recipe, workers=1 if cfg.local else cfg.workers)
    if cfg.placement:
        recipe = replace(recipe, placement=cfg.placement)
    if cfg.seed is not None:
        recipe = replace(recipe, seed=cfg.seed)
    return recipe


class ClusterPathError(RecipeError):
    """A run on a cluster of several nodes was given a location that only one node's disk has."""


def _is_local(uri: str | None) -> bool:
    return bool(uri) and not storage.is_s3(uri) and "://" not in uri.replace("file://", "", 1)


def local_locations(recipe: Recipe, stages, cfg: PipelineConfig) -> list[str]:
    """Each setting of the run that names a path on one machine's disk, with what to use instead: on a
    cluster, the workers that read the data, the ranks that log to MLflow and write checkpoints, and the
    replicas that load the export run on other nodes, which cannot see it."""
    found = []
    if _is_local(cfg.storage):
        found.append(f"storage: expected s3://BUCKET/PREFIX, found the local path {cfg.storage!r}")
    if TrackingConfig(cfg.tracking_uri).local:
        found.append(
            "tracking_uri: expected an MLflow server (http://HOST:5000), found the local store "
            f"{cfg.tracking_uri!r}"
        )
    if _is_local(recipe.data_root):
        found.append(f"data_root: expected s3://..., found the local path {recipe.data_root!r}")
    for stage in stages:
        for dataset in (stage.data or {}).get("datasets", []):
            path = dataset.get("json_path") or dataset.get("parquet_path")
            if _is_local(path):
                found.append(f"stage {stage.name} manifest: expected s3://..., found the local path {path!r}")
    if _is_local(recipe.eval.manifest):
        found.append(f"eval manifest: expected s3://..., found the local path {recipe.eval.manifest!r}")
    return found


def check_cluster_locations(recipe: Recipe, stages, cfg: PipelineConfig) -> None:
    """On a Ray cluster of more than one node, refuse local paths before any work, naming each; a single
    node (the demo, a laptop) and ``--local`` keep them."""
    if cfg.local:
        return
    import ray

    if not ray.is_initialized():
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    found = local_locations(recipe, stages, cfg) if nodes > 1 else []
    if found:
        raise ClusterPathError(
            f"run {cfg.run_id!r} on a cluster of {nodes} nodes: every location must be reachable from every "
            "node (the nodes share no disk):\n  " + "\n  ".join(found)
        )


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) the recipe's DAG; returns the summary with one record per stage."""
    recipe = with_overrides(load_recipe(cfg.recipe, cfg.profile, demo_dir=cfg.demo_dir), cfg)
    stages = select_stages(recipe, cfg.from_stage, cfg.until_stage)
    check_cluster_locations(recipe, stages, cfg)
    if cfg.profile == "tiny":
        ensure_demo_data(cfg.demo_dir, recipe.model.anyres.tile_size)
    log.info("pipeline config: %s", json.dumps({**asdict(cfg), "step_hooks": list(cfg.step_hooks)}))
    layout = RunLayout(cfg.storage, cfg.run_id)
    state = RunState(layout.state)
    tracking = TrackingConfig(uri=cfg.tracking_uri, experiment=cfg.experiment)
    parent = _parent_run(recipe, cfg, state, tracking)
    try:
        records, final = _run_stages(recipe, stages, cfg, layout, state, tracking, parent)
        summary = {
            "run_id": cfg.run_id,
            "recipe": recipe.name,
            "stages": records,
            "final_model": final,
            "mlflow_parent_run_id": parent.run_id,
            "state_uri": state.uri,
        }
        if parent.enabled and records and not cfg.until_stage:
            name = cfg.register_as or recipe.name
            summary["registered_model"] = {"name": name, "version": parent.register_model(name, records[-1])}
            parent.set_tags({"llava_ray.final_model": final})
    except BaseException as e:
        parent.fail(e)
        raise
    parent.end_run()
    storage.write_text(layout.summary, json.dumps(summary, indent=1))
    return summary


def _parent_run(recipe: Recipe, cfg: PipelineConfig, state: RunState, tracking: TrackingConfig):
    """The pipeline's MLflow run: a new one, or the interrupted run of the same run id, running again."""
    tracker = make_tracker(tracking, run_id=state.data.get("mlflow_parent_run_id"))
    if tracker.enabled and tracker.run_id:
        tracker.resume_run()
    elif tracker.enabled:
        tracker.start_run(f"{recipe.name}:{cfg.run_id}", tags={"llava_ray.recipe": recipe.name})
        tracker.log_params({"recipe": recipe.name, "profile": cfg.profile, "storage": cfg.storage})
        state.data["mlflow_parent_run_id"] = tracker.run_id
        state.save()
    return tracker


def _run_stages(recipe, stages, cfg, layout, state, tracking, parent) -> tuple[list[dict], str | None]:
    records, previous = [], _previous_export(recipe, cfg, state)
    for stage in stages:
        stage_layout = layout.stage(stage.name)
        pre_name, train_name = f"preprocess:{stage.name}", f"train:{stage.name}"
        if _preprocess_done(state.node(pre_name), stage_layout.preprocess_summary):
            state.event(pre_name, "skipped")
        else:
            state.event(pre_name, "started")
            config = PreprocessConfig(
                manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)
            )
            summary = preprocess(config, stage_layout, local=cfg.local)
            state.set(
                pre_name,
                status="completed",
                output_uri=stage_layout.root,
                accepted=summary["accepted"],
                rejected=summary["rejected"],
                mixture_digest=summary["mixture_digest"],
            )
            state.event(pre_name, "completed")
            parent.set_tags(
                {f"node.{pre_name}.status": "completed", f"node.{pre_name}.output_uri": stage_layout.root}
            )
        node = state.node(train_name)
        if _train_done(node):
            state.event(train_name, "skipped")
            record = json.loads(storage.read_text(stage_layout.result))
        else:
            record = _train(recipe, stage, stage_layout, cfg, state, tracking, parent, init_from=previous)
        previous = record["hf_uri"]
        records.append(record)
    return records, previous


def _train(recipe, stage, stage_layout, cfg, state, tracking, parent, *, init_from) -> dict:
    """One training node: its MLflow run is created (or, after an interruption, continued) first and
    recorded, so that a resumed attempt logs into the same run."""
    name, node = f"train:{stage.name}", state.node(f"train:{stage.name}")
    resumed = node.get("status") == "started"
    run_id = node.get("mlflow_run_id")
    if parent.enabled and not run_id:
        child = make_tracker(tracking)
        run_id = child.start_run(
            stage.name,
            parent_run_id=parent.run_id,
            tags={"llava_ray.recipe": recipe.name, "llava_ray.run_id": state.uri},
        )
    state.event(name, "resumed" if resumed else "started")
    state.set(name, status="started", mlflow_run_id=run_id, init_from=init_from)
    record = train_stage(
        recipe,
        stage,
        stage_layout,
        init_from=init_from,
        tracking=tracking,
        parent_run_id=parent.run_id,
        mlflow_run_id=run_id,
        max_failures=cfg.max_failures,
        step_hooks=cfg.step_hooks.get(stage.name, ()),
        local=cfg.local,
        progress_every_s=cfg.progress_every_s,
    )
    state.set(
        name,
        status="completed",
        hf_uri=record["hf_uri"],
        checkpoint_uri=record["checkpoint_uri"],
        mlflow_run_id=record["mlflow_run_id"],
    )
    state.event(name, "completed")
    parent.set_tags({f"node.{name}.status": "completed", f"node.{name}.output_uri": record["hf_uri"]})
    parent.log_metrics({f"{stage.name}/final_loss": record["final_loss"] or 0.0})
    return record


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
