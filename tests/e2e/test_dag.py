"""Every tiny recipe through the pipeline DAG, each export loaded by transformers alone: LLaVA (the Llava
architecture, linear projector, plain/vicuna_v0 templates), LLaVA-1.5-HD (LlavaNext) and Interleave here;
OneVision's four stages killed in the last after a checkpoint, resumed there in the same MLflow runs and
re-run with everything skipped (below); LLaVA-1.5 submitted whole as a Ray job (test_submit.py). Every
stage is capped at a few optimizer steps (``PipelineConfig.max_steps``): these check the plumbing; the
accuracies the full tiny recipes reach, seeds 0 and 1, are in the README."""

import json
import os

import pytest
import torch

from components import storage
from pipelines.dag import PipelineConfig, run_pipeline
from pipelines.layout import RunLayout
from pipelines.train_stage import FailOnce, read_history

pytestmark = pytest.mark.slow
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration"}  # fmt: skip


def _events(layout):
    return [(e["node"], e["event"]) for e in json.loads(storage.read_text(layout.state))["events"]]


def _loads_in_transformers(export: str) -> str:
    """The export loads with AutoModelForImageTextToText, no missing or unexpected keys, and gives the logits
    of our own loader's model on a fixed batch (its processor's probe); returns the class name."""
    from transformers import AutoModelForImageTextToText

    from components.model import load_model

    hf, info = AutoModelForImageTextToText.from_pretrained(export, output_loading_info=True)
    assert not any(info.values()), info
    ours, processor = load_model(export)
    batch = processor.probe_batch()
    with torch.no_grad():
        assert torch.equal(hf.eval()(**batch).logits, ours.eval()(**batch).logits)
    return type(hf).__name__


@pytest.mark.parametrize("name", ["llava_v1", "llava_v1_5_hd", "llava_next_interleave"])
@pytest.mark.timeout(900)
def test_tiny_recipe_runs_and_its_export_loads_in_transformers(name, demo_dir, ray_local, tmp_path):
    root, _ = demo_dir
    summary = run_pipeline(PipelineConfig(recipe=name, profile="tiny", storage=str(tmp_path / "runs"), run_id="r",
                                          demo_dir=str(root), max_steps=2))  # fmt: skip
    from pipelines.recipes import load_recipe

    recipe = load_recipe(name, "tiny", demo_dir=str(root))
    assert [r["stage"] for r in summary["stages"]] == [s.name for s in recipe.stages]
    for record in summary["stages"]:
        assert record["steps"] == 2 and storage.is_complete(record["hf_uri"])
        ev = record["eval"]
        if recipe.model.arch == "llava_onevision":
            assert "video" in ev["modalities"] and not ev["skipped"]
        else:  # asked only what the architecture takes, and says what it skipped and why
            assert "video" not in ev["modalities"] and {"video_end_color", "video_start_color"} == set(
                ev["skipped"]
            )
            assert all("takes no video" in s["reason"] for s in ev["skipped"].values())
    assert _loads_in_transformers(summary["final_model"]) == CLASSES[recipe.model.arch]


@pytest.mark.timeout(1200)
def test_onevision_killed_after_a_checkpoint_resumes_there_in_its_mlflow_run(demo_dir, ray_local, tmp_path):
    """The tiny OneVision recipe through the DAG (its four stages, 4 steps each), killed in the last right
    after its step-2 checkpoint (a step hook), fails with every MLflow run FAILED and the error tagged; the
    re-run skips the three done stages and resumes the last from that checkpoint: its history continues at
    step 3 in the same MLflow run, and the run ends. This is the OneVision recipe's run in the e2e tier.
    Checked once (on the earlier two-stage recipe) with the step hook run before the step's checkpoint
    instead of after it: the resumed attempts all started at step 0 ([0, 0, 0, 0]) and this test failed.
    Afterwards no run is left RUNNING, each stage has one run with its mixture manifest, the registered
    model version links to its run and its files, and the export loads in transformers. A third run
    skips everything and changes nothing."""
    from mlflow.tracking import MlflowClient

    from components.tracking import TrackingConfig, audit_pipeline_run

    root, _ = demo_dir
    layout = RunLayout(tmp_path / "runs", "r")
    hook = FailOnce(step=2, rank=0, marker=str(tmp_path / "killed"))
    cfg = PipelineConfig(recipe="llava_onevision", profile="tiny", storage=str(tmp_path / "runs"), run_id="r",
                         tracking_uri=str(tmp_path / "mlflow"), demo_dir=str(root), max_failures=0, max_steps=4,
                         step_hooks={"stage2_ov": (hook,)})  # fmt: skip
    with pytest.raises(Exception, match="fail|Fail|died|error"):
        run_pipeline(cfg)
    assert (tmp_path / "killed").exists()
    client = MlflowClient(tracking_uri=TrackingConfig(uri=cfg.tracking_uri).resolved()[0])
    experiment = client.get_experiment_by_name("llava-ray").experiment_id
    failed = [r for r in client.search_runs([experiment]) if r.info.status == "FAILED"]
    assert {r.info.run_name for r in failed} == {"stage2_ov", "llava_onevision:r"}
    assert all("llava_ray.error" in r.data.tags for r in failed)
    events = _events(layout)
    assert ("train:stage2_si", "completed") in events and ("train:stage2_ov", "completed") not in events

    summary = run_pipeline(cfg)  # the same run id: the done stages skipped, the last resumed
    events = _events(layout)[len(events) :]
    done = ("stage1", "stage1_5", "stage2_si")
    assert events[:6] == [
        (f"{node}:{stage}", "skipped") for stage in done for node in ("preprocess", "train")
    ]
    assert ("train:stage2_ov", "resumed") in events
    history = read_history(layout.stage("stage2_ov").history)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert [m["attempt_start_step"] for m in history] == [0, 0, 2, 2], "resumed from the step-2 checkpoint"
    runs = client.search_runs([experiment])
    assert not [r.info.run_name for r in runs if r.info.status != "FINISHED"]
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_parent_run_id"]]
    assert sorted(r.info.run_name for r in stage_runs) == ["stage1", "stage1_5", "stage2_ov", "stage2_si"]
    for run in stage_runs:
        assert "mixture.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    ov = next(r for r in stage_runs if r.info.run_name == "stage2_ov")
    assert sorted(m.step for m in client.get_metric_history(ov.info.run_id, "loss"))[-2:] == [3, 4]
    version = client.get_model_version("llava_onevision", summary["registered_model"]["version"])
    assert version.run_id == ov.info.run_id and version.source.startswith("models:/")
    model_id = version.source.removeprefix("models:/")  # sqlite's registry returns model_id=None
    assert client.get_logged_model(model_id).source_run_id == ov.info.run_id
    model_files = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert {"config.json", "model.safetensors", "llava_ray_processor.json"} <= model_files
    assert _loads_in_transformers(summary["final_model"]) == CLASSES["llava_onevision"]
    assert audit_pipeline_run(TrackingConfig(uri=cfg.tracking_uri), summary) == []  # what make demo checks

    before = {
        r["stage"]: storage.read_text(storage.join(r["hf_uri"], "MANIFEST.json")) for r in summary["stages"]
    }
    again = run_pipeline(cfg)
    assert all(e == "skipped" for _, e in _events(layout)[-8:])
    assert {
        r["stage"]: storage.read_text(storage.join(r["hf_uri"], "MANIFEST.json")) for r in again["stages"]
    } == before
    assert not [r for r in client.search_runs([experiment]) if r.info.status != "FINISHED"]
    assert os.path.exists(layout.summary)
