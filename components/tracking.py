"""One tracking interface: MLflow when a tracking URI is given, a no-op otherwise; rank 0 only.

A pipeline has a parent run; each stage is a nested run under it. Workers never create runs: the
driver creates them and hands the run id to rank 0, which logs into it. MLflow (seconds to import) is
imported where a tracker is made with tracking on; a run without tracking, and every rank but 0, never
loads it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass

from components import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs go. ``uri`` None (or "") turns tracking off."""

    uri: str | None = None
    """An MLflow tracking URI (sqlite:///..., http://host:5000, ...) or a local directory, which
    becomes a sqlite store in it (MLflow's plain-file store is retired)."""
    experiment: str = "llava-ray"
    artifact_location: str | None = None
    """Where a new experiment's artifacts go; for a local store, beside its database."""
    system_metrics_s: float = 10.0
    """Seconds between samples of the training node's CPU, memory, disk, network and GPU (MLflow's own
    system-metrics monitor, in each stage's run, from rank 0's node, set-up to export); 0: none. MLflow
    publishes a sample once a whole interval has passed."""

    def resolved(self) -> tuple[str, str | None]:
        """(tracking URI, artifact location) with a local directory turned into a sqlite store."""
        uri = self.uri or ""
        if "://" not in uri and not uri.startswith("sqlite:"):
            os.makedirs(uri, exist_ok=True)
            uri = f"sqlite:///{os.path.abspath(uri)}/mlflow.db"
        artifacts = self.artifact_location
        if artifacts is None and uri.startswith("sqlite:///"):
            artifacts = os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "artifacts")
        return uri, artifacts

    @property
    def enabled(self) -> bool:
        return bool(self.uri)

    @property
    def local(self) -> bool:
        """A store on this machine's disk (a directory, sqlite:, file:), which no other node can reach."""
        uri = self.uri or ""
        return self.enabled and (uri.startswith(("sqlite:", "file:")) or "://" not in uri)


class NoopTracker:
    """Stands in when tracking is off, and on every rank but 0."""

    run_id: str | None = None
    enabled = False

    def start_run(
        self, name: str, *, parent_run_id: str | None = None, tags: dict | None = None
    ) -> str | None:
        return None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_dict(self, data: dict, name: str) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def end_run(self, status: str = "FINISHED") -> None: ...
    def resume_run(self) -> None: ...
    def fail(self, error: BaseException) -> None: ...
    def start_system_metrics(self) -> None: ...
    def stop_system_metrics(self) -> None: ...


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker(NoopTracker):
    """MLflow through its client, bound to one run at a time (a new run, or an existing one by id)."""

    enabled = True

    def __init__(self, config: TrackingConfig, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.config = config
        uri, artifacts = config.resolved()
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # no process-wide mlflow state
        experiment = self.client.get_experiment_by_name(config.experiment)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(config.experiment, artifact_location=artifacts)
        else:
            self.experiment_id = experiment.experiment_id
        self.run_id = run_id
        self.monitor = None

    def start_system_metrics(self) -> None:
        """MLflow's system-metrics monitor on this run ("system/..." metrics: CPU, memory, disk, network,
        and the GPU where NVML is present), sampling this node every ``system_metrics_s``."""
        if not self.config.system_metrics_s or self.monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.config.system_metrics_s,
            resume_logging=True,  # a resumed attempt continues the run's system-metric steps
            tracking_uri=self.config.resolved()[0],
        )
        self.monitor.start()

    def stop_system_metrics(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None

    def start_run(self, name: str, *, parent_run_id: str | None = None, tags: dict | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict) -> None:
        flat = {
            k: (json.dumps(v) if isinstance(v, (list, tuple)) else v) for k, v in _flatten(params).items()
        }
        for key, value in flat.items():
            self.client.log_param(self.run_id, key[:250], str(value)[:6000])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        for key, value in metrics.items():
            if value is not None:
                self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_dict(self, data: dict, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def end_run(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status)

    def resume_run(self) -> None:
        """The bound run (an interrupted attempt's) is running again: its curve continues in it."""
        self.client.update_run(self.run_id, status="RUNNING")

    def fail(self, error: BaseException) -> None:
        """The run ends FAILED, with the error as a tag."""
        if self.run_id:
            self.client.set_tag(
                self.run_id, "llava_ray.error", f"{type(error).__name__}: {str(error)[:4000]}"
            )
            self.end_run("FAILED")

    def register_model(self, name: str, record: dict) -> str:
        """A logged model from the stage's export (its files, under the stage's run), registered as a new
        version of ``name``: the registry links to the run and to the files. Returns the version."""
        from mlflow.exceptions import MlflowException

        model = self.client.create_logged_model(
            self.experiment_id,
            name=name,
            source_run_id=record["mlflow_run_id"],
            tags={"llava_ray.export_uri": record["hf_uri"], "llava_ray.stage": record["stage"]},
        )
        with tempfile.TemporaryDirectory() as tmp:
            self.client.log_model_artifacts(model.model_id, storage.download_dir(record["hf_uri"], tmp))
        self.client.finalize_logged_model(model.model_id, "READY")
        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        # MLflow resolves a models:/ source through the process-wide tracking URI, not this client's: point
        # it at ours for this one call (and back), so that two stores in one process stay apart
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(self.client.tracking_uri):
            version = self.client.create_model_version(
                name, f"models:/{model.model_id}", run_id=record["mlflow_run_id"], model_id=model.model_id
            )
        return version.version


def make_tracker(config: TrackingConfig | None, *, rank: int = 0, run_id: str | None = None):
    """The tracker for this process: MLflow on rank 0 when enabled, else a no-op."""
    if config is None or not config.enabled or rank != 0:
        return NoopTracker()
    return MlflowTracker(config, run_id=run_id)


def audit_pipeline_run(config: TrackingConfig, summary: dict) -> list[str]:
    """What a finished pipeline's MLflow store must show, as a list of what it does not (empty: all true):
    no run of the experiment left RUNNING; one run per stage under the pipeline's run, FINISHED, with the
    mixture manifest among its artifacts; the registered version linked to the last stage's run, its
    source a logged model of that run holding the export's files."""
    from mlflow.tracking import MlflowClient

    uri, _ = config.resolved()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        return [f"experiment {config.experiment!r}: expected in {uri}, found none"]
    runs = client.search_runs([experiment.experiment_id], max_results=10000)
    problems = [
        f"run {r.info.run_name} ({r.info.run_id}): expected ended, found RUNNING"
        for r in runs
        if r.info.status == "RUNNING"
    ]
    parent = summary.get("mlflow_parent_run_id")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    expected = [record["stage"] for record in summary["stages"]]
    if sorted(r.info.run_name for r in children) != sorted(expected):
        problems.append(
            f"stage runs under {parent}: expected one each of {expected}, "
            f"found {sorted(r.info.run_name for r in children)}"
        )
    for run in children:
        if run.info.status != "FINISHED":
            problems.append(f"stage run {run.info.run_name}: expected FINISHED, found {run.info.status}")
        if "mixture.json" not in {a.path for a in client.list_artifacts(run.info.run_id)}:
            problems.append(f"stage run {run.info.run_name}: expected the artifact mixture.json, found none")
    problems += _audit_registration(client, summary)
    return problems


def _audit_registration(client, summary: dict) -> list[str]:
    registered = summary.get("registered_model")
    if not registered:
        return ["registered model: expected one in the summary, found none"]
    last_run = summary["stages"][-1]["mlflow_run_id"]
    version = client.get_model_version(registered["name"], registered["version"])
    problems = []
    if version.run_id != last_run:
        problems.append(
            f"registered {registered['name']} v{registered['version']}: expected run {last_run}, "
            f"found {version.run_id}"
        )
    if not version.source.startswith("models:/"):
        return problems + [
            f"registered {registered['name']} v{registered['version']}: expected a models:/ "
            f"source, found {version.source!r}"
        ]
    model_id = version.source.removeprefix("models:/")  # sqlite's registry returns model_id=None
    if client.get_logged_model(model_id).source_run_id != last_run:
        problems.append(f"logged model {model_id}: expected source run {last_run}")
    files = {a.path for a in client.list_logged_model_artifacts(model_id)}
    if not {"config.json", "model.safetensors"} <= files:
        problems.append(
            f"logged model {model_id}: expected config.json and model.safetensors, found {sorted(files)}"
        )
    return problems


def loss_curve_png(steps: list[int], losses: list[float], title: str) -> str:
    """A loss-curve PNG in a temporary file (matplotlib, headless); the caller logs and deletes it."""
    import matplotlib  # only for this figure, and headless: not at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fd, path = tempfile.mkstemp(suffix=".png", prefix="loss-")
    os.close(fd)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
