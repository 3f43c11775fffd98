"""The MLflow store audit that `make demo` and the kill/resume e2e test run on a finished pipeline, here on
a real sqlite store written through our tracker: it passes on a store written as the pipeline writes
one, and names each thing a broken store gets wrong."""

import json

import pytest

from components.tracking import MlflowTracker, TrackingConfig, audit_pipeline_run


def _pipeline_store(tmp_path, *, leave_running: str | None = None, skip_mixture: str | None = None):
    """A parent run, two stage runs under it, the last one's export registered: as run_pipeline writes."""
    config = TrackingConfig(uri=str(tmp_path / "mlflow"))
    parent = MlflowTracker(config)
    parent.start_run("pipeline:r")
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    (export / "model.safetensors").write_bytes(b"\0" * 16)
    records = []
    for stage in ("stage2_si", "stage2_ov"):
        child = MlflowTracker(config)
        child.start_run(stage, parent_run_id=parent.run_id)
        if stage != skip_mixture:
            child.log_dict({"datasets": []}, "mixture.json")
        if stage != leave_running:
            child.end_run()
        records.append({"stage": stage, "mlflow_run_id": child.run_id, "hf_uri": str(export)})
    version = parent.register_model("onevision", records[-1])
    parent.end_run()
    summary = {
        "mlflow_parent_run_id": parent.run_id,
        "stages": records,
        "registered_model": {"name": "onevision", "version": version},
    }
    return config, summary


@pytest.mark.timeout(120)
def test_audit_passes_a_store_written_as_the_pipeline_writes_it(tmp_path):
    config, summary = _pipeline_store(tmp_path)
    assert audit_pipeline_run(config, summary) == []


@pytest.mark.timeout(120)
def test_audit_names_a_run_left_running_a_missing_manifest_and_a_wrong_link(tmp_path):
    """Each check switched on by breaking the store once: a stage run left RUNNING, a stage run without
    its mixture manifest, a registered version said to belong to another run."""
    config, summary = _pipeline_store(tmp_path, leave_running="stage2_si", skip_mixture="stage2_ov")
    summary["stages"][-1]["mlflow_run_id"] = summary["stages"][0]["mlflow_run_id"]
    problems = audit_pipeline_run(config, summary)
    assert any("stage2_si" in p and "found RUNNING" in p for p in problems)
    assert any("stage run stage2_ov" in p and "mixture.json" in p for p in problems)
    assert any("registered onevision v1: expected run" in p for p in problems)
