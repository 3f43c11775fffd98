"""Where everything of a run lives: one object that knows every URI, used by the DAG, the stage, the
status command and the demo, so that no two places build the same path.

    layout = RunLayout("s3://bucket/runs", "ov-7b")
    layout.stage("stage2_si").export          # s3://bucket/runs/ov-7b/stage2_si/hf

    <storage>/<run_id>/
        state.json  summary.json
        <stage>/
            data/  rejects/  mixture.json  summary.json     preprocessing's output
            train/                                          Ray Train's checkpoints (its run name: "train")
            plan.json  progress.json  history/  probe_logits.safetensors  hf/  result.json
"""

from __future__ import annotations

from dataclasses import dataclass

from components import storage


@dataclass(frozen=True)
class StageLayout:
    """The URIs of one stage of a run."""

    root: str

    @property
    def data(self) -> str:
        """The Parquet shards preprocessing wrote."""
        return storage.join(self.root, "data")

    @property
    def rejects(self) -> str:
        return storage.join(self.root, "rejects")

    @property
    def mixture(self) -> str:
        """The pinned mixture: every sample's dataset, id and content hash."""
        return storage.join(self.root, "mixture.json")

    @property
    def preprocess_summary(self) -> str:
        return storage.join(self.root, "summary.json")

    @property
    def checkpoints(self) -> str:
        """Ray Train's storage path for this stage (its run is named ``train``)."""
        return self.root

    @property
    def history(self) -> str:
        """Per-step metrics, written by rank 0 at every checkpoint."""
        return storage.join(self.root, "history")

    @property
    def probe_logits(self) -> str:
        return storage.join(self.root, "probe_logits.safetensors")

    @property
    def export(self) -> str:
        """The HF checkpoint the stage exports."""
        return storage.join(self.root, "hf")

    @property
    def result(self) -> str:
        return storage.join(self.root, "result.json")

    @property
    def plan(self) -> str:
        """The stage's resolved plan, written by the driver before it trains."""
        return storage.join(self.root, "plan.json")

    @property
    def progress(self) -> str:
        """Rank 0's last step (step, total, loss, tokens/s, elapsed, ETA, world), rewritten every step:
        ``llava-ray status`` reads it from any machine that reads the storage."""
        return storage.join(self.root, "progress.json")


@dataclass(frozen=True)
class RunLayout:
    """The URIs of a run: ``<storage>/<run_id>``; local paths are made absolute (Ray's workers run in other
    directories)."""

    storage: str
    run_id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", storage.absolute(self.storage))

    @property
    def root(self) -> str:
        return storage.join(self.storage, self.run_id)

    @property
    def state(self) -> str:
        """The run-state file: each node's status and outputs, and the event log."""
        return storage.join(self.root, "state.json")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "summary.json")

    def stage(self, name: str) -> StageLayout:
        return StageLayout(storage.join(self.root, name))
