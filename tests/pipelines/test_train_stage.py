"""A stage on Ray Train + DeepSpeed (2 CPU workers): semantics, export, ZeRO-3 with text-only ranks,
fault injection and resume, checkpoints on S3 (moto) and locally, and MLflow on a real server."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_tensors

from components import storage
from components.model import ModelSpec, build_model
from components.processor import LlavaProcessor
from components.tracking import TrackingConfig
from pipelines.preprocess import PreprocessConfig, preprocess, read_output
from pipelines.recipes import load_recipe, stage_config
from pipelines.train_stage import (
    FAULT_ENV,
    _own_rows,
    cosine_with_warmup,
    epoch_windows,
    plan_stage,
    read_history,
    shard_batches,
    train_stage,
)

pytestmark = pytest.mark.slow


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def _prepare(recipe, stage, out):
    preprocess(
        PreprocessConfig(manifest=stage.data, data_root=recipe.data_root, stage=stage_config(recipe, stage)),
        out,
    )
    return out


def test_cosine_schedule_and_plan(demo_dir):
    assert cosine_with_warmup(0, 100, 0.03) == pytest.approx(1 / 3)
    assert cosine_with_warmup(3, 100, 0.03) == pytest.approx(1.0)
    assert cosine_with_warmup(99, 100, 0.03) < 0.01
    root, _ = demo_dir
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    stage = dataclasses.replace(
        recipe.stage("stage1"), global_batch=16, micro_batch=2, max_steps=None, epochs=2
    )
    plan = plan_stage(recipe, stage, 40, init_from=None, export_uri="x")
    assert (plan.grad_accum, plan.steps_per_epoch, plan.total_steps) == (4, 2, 4)
    with pytest.raises(ValueError, match="rows for one step"):
        plan_stage(recipe, stage, 10, init_from=None, export_uri="x")


def test_small_data_ranks_keep_interleaved_rows_reshuffled_each_epoch(demo_dir, ray_local, tmp_path):
    """Small data: each rank reads the shards from storage and keeps rows rank, rank+W, ... of the
    mixture's order across files; the ranks together hold every row once (minus the remainder), each
    gets the same mix of a concatenated mixture; every epoch reshuffles a rank's rows (the same way on a
    resumed attempt) into windows of the plan's size."""
    import ray

    # a mixture of two datasets, stored in 5 files in an order unlike the mixture's (as preprocessing's
    # tasks may finish): ranks take rows in the mixture's (source, index) order
    rows = [{"i": i, "source": "a_image" if i < 61 else "b_video", "index": i if i < 61 else i - 61}
            for i in range(101)]  # fmt: skip
    ray.data.from_items(rows[50:] + rows[:50]).repartition(5).write_parquet(str(tmp_path / "shards"))
    kept = {rank: _own_rows(lambda: shard_batches(str(tmp_path / "shards")), rank, 3) for rank in range(3)}
    for rank, mine in kept.items():
        assert [r["i"] for r in mine] == list(range(rank, 99, 3))  # 33 rows each: 101 // 3
        assert sum(r["source"] == "b_video" for r in mine) in (12, 13)  # of 38
    assert sorted(r["i"] for mine in kept.values() for r in mine) == list(range(99))

    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(demo_dir[0]))
    plan = plan_stage(recipe, recipe.stage("stage1"), len(rows), init_from=None, export_uri="x")
    plan = dataclasses.replace(plan, micro_batch=2, grad_accum=1, stage={**plan.stage, "group_steps": 4})
    epochs = [epoch_windows(kept[1], plan, epoch, rank=1) for epoch in range(3)]
    for windows in epochs:
        assert [len(w) for w in windows] == [8, 8, 8, 8, 1]
        assert sorted(r["i"] for w in windows for r in w) == list(range(1, 99, 3))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epoch_windows(kept[1], plan, 1, rank=1) == epochs[1]  # a resumed attempt: the same windows


def test_stage1_zero2_local_changes_only_the_projector(demo_dir, ray_local, tmp_path):
    root, _ = demo_dir
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    # 8 rows, 2 workers x micro-batch 2: two steps per epoch, two epochs; the second epoch comes from the
    # rows each worker kept in memory (keep_shard), not from a second pass of Ray Data
    manifest = {"datasets": [{**recipe.stage("stage1").data["datasets"][0], "sampling_strategy": "first:8"}]}
    stage = dataclasses.replace(
        recipe.stage("stage1"), data=manifest, max_steps=None, epochs=2, checkpoint_every=2, micro_batch=2,
        global_batch=4,
    )  # fmt: skip
    data = _prepare(recipe, stage, str(tmp_path / "run" / "stage1"))
    record = train_stage(
        recipe, stage, storage_uri=str(tmp_path), run_id="run", data_uri=data, init_from=None
    )
    assert record["steps"] == 4 and record["final_loss"] > 0
    assert storage.is_complete(record["hf_uri"])
    before = _weights(build_model(recipe.model)[0])
    from transformers import LlavaOnevisionForConditionalGeneration

    export = LlavaOnevisionForConditionalGeneration.from_pretrained(record["hf_uri"]).eval()
    after = _weights(export)
    for frozen in ("model.vision_tower.", "model.language_model.", "lm_head."):
        assert not _changed(before, after, frozen), f"{frozen} changed in Stage-1"
    assert _changed(before, after, "model.multi_modal_projector.")
    # the export gives the logits the training model gave on a fixed batch, prompted by its own processor
    processor = LlavaProcessor.from_pretrained(record["hf_uri"])
    assert processor.config == stage.processor_config(recipe.model).__class__(
        **{**stage.processor_config(recipe.model).to_dict(), "template": recipe.model.template}
    )
    with torch.no_grad():
        logits = export(**processor.probe_batch()).logits
    trained = load_tensors(storage.read_bytes(str(tmp_path / "run" / "stage1" / "probe_logits.safetensors")))[
        "logits"
    ]
    assert torch.allclose(logits, trained, atol=1e-5)
    history = read_history(str(tmp_path / "run" / "stage1" / "history"))
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert all(m["tokens_per_s"] > 0 and 0 <= m["data_wait_share"] < 1 for m in history)
    # every epoch trains on every row exactly once (tokens are summed over both ranks)
    rows = read_output(data)
    assert len(rows) == 8
    per_epoch = [sum(m["tokens"] for m in history[:2]), sum(m["tokens"] for m in history[2:])]
    assert per_epoch == [sum(len(r["input_ids"]) for r in rows)] * 2


def test_zero3_s3_text_only_ranks_fault_and_resume_with_mlflow(
    demo_dir, ray_local, s3_bucket, mlflow_server, tmp_path, monkeypatch
):
    root, manifests = demo_dir
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    stage = dataclasses.replace(
        recipe.stage("stage2_ov"),
        data={"datasets": [{"json_path": manifests["text"]}, {"json_path": manifests["single_image"], "sampling_strategy": "first:4"},
                           {"json_path": manifests["text"], "name": "text_again"}]},
        zero_stage=3, micro_batch=1, global_batch=2, max_steps=6, checkpoint_every=2, lr=1e-3, vision_lr=2e-4,
    )  # fmt: skip
    run = f"{s3_bucket}/runs"
    data = _prepare(recipe, stage, f"{run}/z3/stage2_ov")
    init = str(tmp_path / "init")
    from components.model import save_model

    model, processor = build_model(recipe.model)
    before = _weights(model)
    save_model(model, processor, init)
    monkeypatch.setenv(FAULT_ENV, f"3:1:{tmp_path / 'fault-marker'}")
    tracking = TrackingConfig(uri=mlflow_server, experiment="test-train")
    record = train_stage(recipe, stage, storage_uri=run, run_id="z3", data_uri=data, init_from=init,
                         tracking=tracking, max_failures=1)  # fmt: skip
    assert (tmp_path / "fault-marker").exists(), "the fault was injected"
    history = read_history(f"{run}/z3/stage2_ov/history")
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6] and record["steps"] == 6
    assert [m["attempt_start_step"] for m in history[2:]] == [2, 2, 2, 2], (
        "resumed from the step-2 checkpoint, not 0"
    )
    assert any(m["text_only_batches"] for m in history), "rank 0 ran a text-only batch under ZeRO-3"
    assert all(m["lr_vision"] == pytest.approx(m["lr"] / 5) for m in history)
    assert record["checkpoint_uri"].startswith("s3://") and storage.exists(record["checkpoint_uri"])
    assert storage.is_complete(record["hf_uri"]) and record["hf_uri"].startswith("s3://")
    after = _weights(build_model(ModelSpec(checkpoint=record["hf_uri"]))[0])
    for part in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head."):
        assert _changed(before, after, part), f"{part} did not change"
    # MLflow, on a real server: params, per-step metrics, artifacts, the output tag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    mlrun = client.get_run(record["mlflow_run_id"])
    assert mlrun.data.tags["llava_ray.output_uri"] == record["hf_uri"]
    assert mlrun.data.params["total_steps"] == "6" and "mixture_digest" in mlrun.data.params
    losses = client.get_metric_history(mlrun.info.run_id, "loss")
    assert sorted({m.step for m in losses}) == [1, 2, 3, 4, 5, 6]
    for name in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_wait_share"):
        assert client.get_metric_history(mlrun.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"resolved_config.json", "eval.json", "plots"} <= artifacts
    assert json.loads(storage.read_text(f"{run}/z3/stage2_ov/result.json"))["steps"] == 6


@pytest.fixture(scope="module")
def onevision_data(demo_dir, ray_local, tmp_path_factory):
    """The four tiny OneVision stages, 2 steps each, and their preprocessed data (shared by both ZeRO runs)."""
    root, _ = demo_dir
    recipe = dataclasses.replace(load_recipe("llava_onevision", "tiny", demo_dir=str(root)), eval={})
    out = tmp_path_factory.mktemp("onevision-data")
    stages, data = [], {}
    assert [s.name for s in recipe.stages] == ["stage1", "stage1_5", "stage2_si", "stage2_ov"]
    for stage in recipe.stages:
        stage = dataclasses.replace(stage, max_steps=2, checkpoint_every=1, micro_batch=2, global_batch=4)
        stages.append(stage)
        data[stage.name] = _prepare(recipe, stage, str(out / stage.name))
    return recipe, stages, data


@pytest.mark.parametrize("zero, where", [(2, "local"), (3, "s3")])
def test_every_onevision_stage_under_zero(zero, where, onevision_data, s3_bucket, tmp_path, monkeypatch):
    """The whole tiny curriculum, each stage from the previous stage's export, with 2 workers: checkpoints
    in storage after every step, and each stage changes exactly its trainable parts. Under ZeRO-2 the rows
    stream through Ray Data, split between the workers, as large data does; under ZeRO-3 every worker
    reads the small data once and keeps its rows."""
    import pipelines.train_stage

    recipe, stages, data = onevision_data
    if zero == 2:
        monkeypatch.setattr(pipelines.train_stage, "SMALL_DATA_SHARE", 0.0)
    run = f"{s3_bucket}/zero{zero}" if where == "s3" else str(tmp_path / "runs")
    before, init = _weights(build_model(recipe.model)[0]), None
    parts = {"vision_tower": ("model.vision_tower.",), "multi_modal_projector": ("model.multi_modal_projector.",),
             "language_model": ("model.language_model.", "lm_head.")}  # fmt: skip
    for stage in stages:
        stage = dataclasses.replace(stage, zero_stage=zero)
        record = train_stage(
            recipe, stage, storage_uri=run, run_id="c", data_uri=data[stage.name], init_from=init
        )
        assert record["steps"] == 2 and record["streamed"] == (zero == 2), stage.name
        assert record["checkpoint_uri"].startswith("s3://" if where == "s3" else "/")
        assert storage.exists(record["checkpoint_uri"]) and storage.is_complete(record["hf_uri"])
        resolved = json.loads(storage.read_text(storage.join(run, "c", stage.name, "result.json")))
        assert resolved["hf_uri"] == record["hf_uri"]
        after = _weights(build_model(ModelSpec(checkpoint=record["hf_uri"]))[0])
        for part, prefixes in parts.items():
            changed = any(_changed(before, after, p) for p in prefixes)
            assert changed == (part in stage.trainable), f"{stage.name} ZeRO-{zero}: {part} changed={changed}"
        history = read_history(storage.join(run, "c", stage.name, "history"))
        assert [m["step"] for m in history] == [1, 2]
        if "vision_tower" in stage.trainable:
            assert all(m["lr_vision"] == pytest.approx(m["lr"] * stage.vision_lr / stage.lr) for m in history)
        before, init = after, record["hf_uri"]


def _tiny_parts():
    from components.demo_data import tokenizer_corpus
    from components.model import TINY_LLM, TINY_VISION, build_tiny_tokenizer

    return build_tiny_tokenizer(tokenizer_corpus()), TINY_VISION, TINY_LLM


def _release(path):
    """A tiny OneVision checkpoint laid out as the llava-hf releases are, written by transformers alone:
    config, safetensors, tokenizer, image processor; none of our files."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok, vision, llm = _tiny_parts()
    pinpoints = [[56 * r, 56 * c] for r in range(1, 7) for c in range(1, 7)]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=56, patch_size=14, **vision),
        text_config=Qwen2Config(vocab_size=len(tok), **llm), image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    torch.manual_seed(1)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    LlavaOnevisionImageProcessorPil(image_grid_pinpoints=pinpoints, size={"height": 56, "width": 56},
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)  # fmt: skip


def test_a_stage_starts_from_an_hf_release_on_s3(demo_dir, ray_local, s3_bucket, tmp_path):
    """An llava-hf-style release on s3:// (transformers' own save_pretrained, none of our files): before
    any step our model gives transformers' logits and our processor its tiles; then a tiny stage trains
    from it and exports an HF checkpoint whose weights moved."""
    from transformers import AutoImageProcessor, LlavaOnevisionForConditionalGeneration

    from components.anyres import AnyResConfig
    from components.model import load_model
    from tests.conftest import random_image, upload_tree

    root, _ = demo_dir
    _release(tmp_path / "release")
    uri = f"{s3_bucket}/releases/tiny-ov"
    upload_tree(tmp_path / "release", uri)
    model, processor = load_model(uri, default_template="chatml")
    assert processor.anyres.mean == (0.5, 0.5, 0.5) and processor.anyres.tile_size == 56
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "release").eval()
    image = random_image(np.random.default_rng(0), 90, 150)
    hf_pixels = AutoImageProcessor.from_pretrained(tmp_path / "release")(image, return_tensors="np")[
        "pixel_values"
    ][0]
    assert np.abs(processor.media([image]).pixel_values - hf_pixels).max() <= 1e-5
    batch = processor.probe_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, reference(**batch).logits)

    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    anyres = AnyResConfig(tile_size=56, mean=(0.5,) * 3, std=(0.5,) * 3)
    recipe = dataclasses.replace(recipe, model=ModelSpec(checkpoint=uri, anyres=anyres), eval={})
    stage = dataclasses.replace(recipe.stage("stage2_si"), max_steps=2, micro_batch=2, global_batch=4,
                                checkpoint_every=2, epochs=1)  # fmt: skip
    stage = dataclasses.replace(
        stage, data={"datasets": [{**stage.data["datasets"][0], "sampling_strategy": "first:8"}]}
    )
    data = _prepare(recipe, stage, str(tmp_path / "run" / stage.name))
    record = train_stage(
        recipe, stage, storage_uri=str(tmp_path), run_id="run", data_uri=data, init_from=None
    )
    assert record["steps"] == 2 and storage.is_complete(record["hf_uri"])
    export = LlavaOnevisionForConditionalGeneration.from_pretrained(record["hf_uri"])
    before, after = _weights(reference), _weights(export)
    for part in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."):
        assert _changed(before, after, part), part


def test_stage1_starts_from_separate_vision_and_llm_checkpoints(demo_dir, ray_local, tmp_path):
    """Stage-1 from a SigLIP vision model and a Qwen-2 LLM directory, each saved by transformers: the
    composed model keeps SigLIP's first layers only (vision_layers, as OneVision drops the last) and gives
    before any step the vision features and text logits of the parts themselves; then Stage-1 trains the
    projector alone and exports."""
    from transformers import (
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from components.anyres import AnyResConfig

    root, _ = demo_dir
    tok, vision_cfg, llm_cfg = _tiny_parts()
    torch.manual_seed(2)
    vision = SiglipVisionModel(
        SiglipVisionConfig(image_size=56, patch_size=14, **{**vision_cfg, "num_hidden_layers": 3})
    )
    vision.save_pretrained(tmp_path / "vision")
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), **llm_cfg))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    anyres = AnyResConfig(tile_size=56, mean=(0.5,) * 3, std=(0.5,) * 3)
    spec = ModelSpec(
        vision=str(tmp_path / "vision"), llm=str(tmp_path / "llm"), vision_layers=2, anyres=anyres
    )
    model, processor = build_model(spec)
    assert len(model.model.vision_tower.encoder.layers) == 2
    pixels = torch.as_tensor(processor.media([Image.new("RGB", (56, 56), (9, 99, 199))]).pixel_values[:1])
    ids = torch.as_tensor([tok.encode("What is two plus three?")])
    with torch.no_grad():
        ours = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(ours, vision(pixels, output_hidden_states=True).hidden_states[2])
        assert torch.equal(model(input_ids=ids).logits, llm(input_ids=ids).logits)

    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    recipe = dataclasses.replace(recipe, model=spec, eval={})
    stage = dataclasses.replace(
        recipe.stage("stage1"), max_steps=2, micro_batch=2, global_batch=4, checkpoint_every=2
    )
    data = _prepare(recipe, stage, str(tmp_path / "run" / stage.name))
    record = train_stage(
        recipe, stage, storage_uri=str(tmp_path), run_id="run", data_uri=data, init_from=None
    )
    export = LlavaOnevisionForConditionalGeneration.from_pretrained(record["hf_uri"])
    before, after = _weights(model), _weights(export)
    assert _changed(before, after, "model.multi_modal_projector.")
    for frozen in ("model.vision_tower.", "model.language_model.", "lm_head."):
        assert not _changed(before, after, frozen), frozen
