"""The pipeline DAG end to end: a run killed in stage 3 resumes there; a re-run skips everything done."""

import json
import os

import pytest

from components import storage
from pipelines.dag import PipelineConfig, run_pipeline
from pipelines.train_stage import FAULT_ENV

pytestmark = pytest.mark.slow
RECIPE = os.path.join(os.path.dirname(__file__), "tiny3.yaml")


def _manifests(summary):
    return {
        r["stage"]: storage.read_text(storage.join(r["hf_uri"], "MANIFEST.json")) for r in summary["stages"]
    }


def _events(storage_uri, run_id):
    state = json.loads(storage.read_text(storage.join(storage_uri, run_id, "state.json")))
    return [(e["node"], e["event"]) for e in state["events"]]


def test_killed_in_stage_3_resumes_there_and_reruns_skip(demo_dir, ray_local, tmp_path, monkeypatch):
    root, _ = demo_dir
    cfg = PipelineConfig(recipe=RECIPE, profile="tiny", storage=str(tmp_path / "runs"), run_id="r",
                         tracking_uri=str(tmp_path / "mlflow"), demo_dir=str(root), max_failures=0)  # fmt: skip
    monkeypatch.setenv(FAULT_ENV, f"stage2_ov:1:0:{tmp_path / 'killed'}")
    with pytest.raises(Exception, match="fail|Fail|died|error"):
        run_pipeline(cfg)
    assert (tmp_path / "killed").exists()
    events = _events(cfg.storage, "r")
    assert ("train:stage2_si", "completed") in events and ("train:stage2_ov", "completed") not in events

    summary = run_pipeline(cfg)  # the same run id: stages 1-2 skipped, stage 3 resumed
    events = _events(cfg.storage, "r")[len(events) :]
    assert events[:4] == [("preprocess:stage1", "skipped"), ("train:stage1", "skipped"),
                          ("preprocess:stage2_si", "skipped"), ("train:stage2_si", "skipped")]  # fmt: skip
    assert ("train:stage2_ov", "resumed") in events and ("train:stage2_ov", "completed") in events
    assert [r["stage"] for r in summary["stages"]] == ["stage1", "stage2_si", "stage2_ov"]
    assert all(r["steps"] == 2 for r in summary["stages"])
    assert summary["stages"][2]["hf_uri"].endswith("stage2_ov/hf") and summary["registered_model"]["version"]
    # each stage took the URI the previous one recorded
    state = json.loads(storage.read_text(storage.join(cfg.storage, "r", "state.json")))
    assert state["nodes"]["train:stage2_ov"]["init_from"] == state["nodes"]["train:stage2_si"]["hf_uri"]

    # LoRA (stage2_si) was merged: its export is a plain HF checkpoint whose LLM weights moved
    from safetensors import safe_open

    with safe_open(os.path.join(summary["stages"][1]["hf_uri"], "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k]
    from mlflow.tracking import MlflowClient

    from components.tracking import TrackingConfig

    client = MlflowClient(tracking_uri=TrackingConfig(uri=cfg.tracking_uri).resolved()[0])
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.tags["node.train:stage2_ov.output_uri"] == summary["final_model"]
    assert parent.data.tags["node.preprocess:stage1.status"] == "completed"

    before = _manifests(summary)
    again = run_pipeline(cfg)
    events2 = _events(cfg.storage, "r")
    assert all(e == "skipped" for _, e in events2[-6:])
    assert _manifests(again) == before

    resumed = run_pipeline(PipelineConfig(**{**cfg.__dict__, "from_stage": "stage2_ov"}))
    assert [r["stage"] for r in resumed["stages"]] == ["stage2_ov"]
