"""Every tiny recipe through the pipeline DAG, each export loaded by transformers alone. The five recipes
(LLaVA with its linear projector and plain/vicuna_v0 templates, LLaVA-1.5 with a ZeRO-3 finetune,
LLaVA-1.5-HD as LlavaNext, Interleave, OneVision's four stages) run in this process (``--local``: one
rank, no Ray Train start-up per stage), and so does a run that fails after a checkpoint and is resumed
there by the DAG in the same MLflow run, then re-run with everything skipped (LLaVA-1.5 below). What needs
a cluster (Ray Train workers across nodes, a node lost mid-stage, a pipeline submitted as a Ray job) runs
in the cluster tier, tests/cluster. Every stage is capped at a few optimizer steps
(``PipelineConfig.max_steps``): these check the plumbing; the accuracies the full tiny recipes reach,
seeds 0 and 1, are in the README."""

import contextlib
import io
import json
import os
import re

import pytest
import torch

from components import storage
from pipelines.cli import main as cli_main
from pipelines.dag import PipelineConfig, run_pipeline
from pipelines.layout import RunLayout
from pipelines.train.stage import read_history

pytestmark = pytest.mark.slow
CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


class CrashOnce:
    """A step hook: the run crashes once, right after ``step`` and its checkpoint (``marker`` records it)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(f"injected failure after step {step}")


class StatusAt:
    """A step hook: ``llava-ray status`` run at ``step`` (the stage still running), its output kept."""

    def __init__(self, step: int, storage_uri: str, run_id: str):
        self.step, self.args, self.out = step, ["status", run_id, "--storage", storage_uri], None

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and self.out is None:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert cli_main(self.args) == 0
            self.out = out.getvalue()


def _events(layout):
    return [(e["node"], e["event"]) for e in json.loads(storage.read_text(layout.state))["events"]]


def _loads_in_transformers(record: dict) -> str:
    """A stage's export loads with AutoModelForImageTextToText alone, no missing or unexpected keys, and
    gives the logits that the model being trained gave on a fixed batch (its processor's probe), which the
    stage wrote before it saved the export (``probe_logits.safetensors``): an independent reference, so a
    weight or a config field lost on export (LlavaNext's ``image_newline``, its unpadding) shows.
    Returns the class name. Guards: the export's weights; fails with ``model.image_newline`` zeroed on
    save."""
    from safetensors.torch import load as load_tensors
    from transformers import AutoModelForImageTextToText

    from components.processor import LlavaProcessor

    export = record["hf_uri"]
    hf, info = AutoModelForImageTextToText.from_pretrained(export, output_loading_info=True)
    assert not any(info.values()), info
    batch = LlavaProcessor.from_pretrained(export).probe_batch()
    trained = load_tensors(
        storage.read_bytes(storage.join(os.path.dirname(export), "probe_logits.safetensors"))
    )
    with torch.no_grad():
        logits = hf.eval()(**batch).logits
    assert torch.allclose(logits, trained["logits"], atol=1e-5), (logits - trained["logits"]).abs().max()
    return type(hf).__name__


@pytest.mark.parametrize(
    "name", ["llava_v1", "llava_v1_5", "llava_v1_5_hd", "llava_next_interleave", "llava_onevision"]
)
@pytest.mark.timeout(600)
def test_tiny_recipe_runs_and_its_export_loads_in_transformers(name, demo_dir, tmp_path):
    """The whole recipe through the DAG in this process (``local``): every stage preprocessed, trained
    (2 steps), exported and evaluated; each asked only what its architecture takes; every stage's export
    a drop-in transformers checkpoint of the architecture's class with the trained model's logits."""
    root, _ = demo_dir
    summary = run_pipeline(
        PipelineConfig(
            recipe=name,
            profile="tiny",
            storage=str(tmp_path / "runs"),
            run_id="r",
            demo_dir=str(root),
            max_steps=2,
            local=True,
        )
    )
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
        assert _loads_in_transformers(record) == CLASSES[recipe.model.arch]
    assert summary["final_model"] == summary["stages"][-1]["hf_uri"]


def test_a_run_failed_after_a_checkpoint_resumes_there_in_its_mlflow_run(
    demo_dir, tmp_path, capfd, monkeypatch
):
    """LLaVA-1.5's two stages in this process (the finetune under ZeRO-3), 4 steps each, failing in the
    finetune right after its step-2 checkpoint (a step hook that raises), fails with every MLflow run
    FAILED and the error tagged; the re-run skips the done stage and resumes the last from that
    checkpoint: its history continues at step 3 in the same MLflow run, whose loss curve is exactly steps
    1-4 (no step twice, none lost), and the run ends. Guards: the resume from the last checkpoint; fails
    with the step hook run before the step's checkpoint instead of after it. Afterwards no run is left
    RUNNING, each stage has one run with its mixture manifest and MLflow's system metrics, the registered
    model version links to its run and its files, and the export loads in transformers with the trained
    model's logits. A third run skips everything and changes nothing. While the finetune runs, ``llava-ray
    status`` shows its step, loss and ETA from the run's storage, and the console shows each stage's
    progress lines (plain: this is no terminal)."""
    from mlflow.tracking import MlflowClient

    from components.tracking import TrackingConfig, audit_pipeline_run

    # MLflow publishes a sample once a whole interval has passed: 0.2 s, well within a stage's set-up
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    root, _ = demo_dir
    layout = RunLayout(tmp_path / "runs", "r")
    hook = CrashOnce(step=2, marker=str(tmp_path / "killed"))
    status = StatusAt(2, str(tmp_path / "runs"), "r")
    cfg = PipelineConfig(
        recipe="llava_v1_5",
        profile="tiny",
        storage=str(tmp_path / "runs"),
        run_id="r",
        tracking_uri=str(tmp_path / "mlflow"),
        demo_dir=str(root),
        max_failures=0,
        max_steps=4,
        step_hooks={"finetune": (status, hook)},
        local=True,
        progress_every_s=0.0,
    )
    with pytest.raises(RuntimeError, match="injected failure after step 2"):
        run_pipeline(cfg)
    assert (tmp_path / "killed").exists()
    assert re.search(
        r"train:finetune +started *\n +step 2/4, loss \d+\.\d{4}, ETA \d+:\d\d, world 1", status.out
    )
    captured = capfd.readouterr()
    for stage in ("pretrain", "finetune"):
        assert re.search(rf"stage {stage}: 1 workers x \d+ micro-batch x \d+ accumulation = ", captured.out)
        for step in (1, 2) if stage == "finetune" else (1, 2, 3, 4):
            assert re.search(
                rf"stage {stage}: step {step}/4  loss \d+\.\d{{4}}  [\d,]+ tokens/s  elapsed \d+:\d\d  "
                r"ETA \d+:\d\d  world 1",
                captured.err,
            ), (stage, step, captured.err[-2000:])
    client = MlflowClient(tracking_uri=TrackingConfig(uri=cfg.tracking_uri).resolved()[0])
    experiment = client.get_experiment_by_name("llava-ray").experiment_id
    failed = [r for r in client.search_runs([experiment]) if r.info.status == "FAILED"]
    assert {r.info.run_name for r in failed} == {"finetune", "llava_v1_5:r"}
    assert all("llava_ray.error" in r.data.tags for r in failed)
    events = _events(layout)
    assert ("train:pretrain", "completed") in events and ("train:finetune", "completed") not in events

    summary = run_pipeline(cfg)  # the same run id: the done stage skipped, the last resumed
    events = _events(layout)[len(events) :]
    assert events[:2] == [("preprocess:pretrain", "skipped"), ("train:pretrain", "skipped")]
    assert ("train:finetune", "resumed") in events
    history = read_history(layout.stage("finetune").history)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert [m["attempt_start_step"] for m in history] == [0, 0, 2, 2], "resumed from the step-2 checkpoint"
    runs = client.search_runs([experiment])
    assert not [r.info.run_name for r in runs if r.info.status != "FINISHED"]
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_parent_run_id"]]
    assert sorted(r.info.run_name for r in stage_runs) == ["finetune", "pretrain"]
    for run in stage_runs:
        assert {"mixture.json", "plan.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "system/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    last = next(r for r in stage_runs if r.info.run_name == "finetune")
    assert sorted(m.step for m in client.get_metric_history(last.info.run_id, "loss")) == [1, 2, 3, 4]
    version = client.get_model_version("llava_v1_5", summary["registered_model"]["version"])
    assert version.run_id == last.info.run_id and version.source.startswith("models:/")
    model_id = version.source.removeprefix("models:/")  # sqlite's registry returns model_id=None
    assert client.get_logged_model(model_id).source_run_id == last.info.run_id
    model_files = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert {"config.json", "model.safetensors", "llava_ray_processor.json"} <= model_files
    assert _loads_in_transformers(summary["stages"][-1]) == CLASSES["llava"]
    assert audit_pipeline_run(TrackingConfig(uri=cfg.tracking_uri), summary) == []  # what make demo checks

    before = {
        r["stage"]: storage.read_text(storage.join(r["hf_uri"], "MANIFEST.json")) for r in summary["stages"]
    }
    again = run_pipeline(cfg)
    assert all(e == "skipped" for _, e in _events(layout)[-4:])
    assert {
        r["stage"]: storage.read_text(storage.join(r["hf_uri"], "MANIFEST.json")) for r in again["stages"]
    } == before
    assert not [r for r in client.search_runs([experiment]) if r.info.status != "FINISHED"]
    assert os.path.exists(layout.summary)
