"""A stage on Ray Train + DeepSpeed (2-3 CPU workers): the plan, each rank's rows, the frozen parts, ZeRO-3
with ranks that hold one modality each, exact resume on both data paths, checkpoints on S3 (moto) and
locally, MLflow on a real server, and stages that start from the ecosystem's checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_tensors

from components import storage
from components.model import ModelSpec, build_model
from components.processor import LlavaProcessor
from components.tracking import TrackingConfig
from pipelines.layout import RunLayout
from pipelines.preprocess import PreprocessConfig, preprocess, read_output
from pipelines.recipes import load_recipe, step_config
from pipelines.train.data import InMemorySteps
from pipelines.train.local import LocalContext
from pipelines.train.plan import plan_stage
from pipelines.train.stage import read_history, train_stage
from pipelines.train.worker import StageWorker

pytestmark = pytest.mark.slow


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def _prepare(recipe, stage, layout):
    preprocess(
        PreprocessConfig(manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)),
        layout,
    )
    return layout


def test_cosine_schedule_and_plan(demo_dir, tmp_path, monkeypatch):
    """The LR schedule, the resolved plan (frozen), an elastic range's sizes, and the next attempt's size
    below a draining node. Guards: the attempt's cap (on_ray._attempt_max); fails with draining nodes
    counted."""
    from pipelines.train.plan import cosine_with_warmup

    assert cosine_with_warmup(0, 100, 0.03) == pytest.approx(1 / 3)
    assert cosine_with_warmup(3, 100, 0.03) == pytest.approx(1.0)
    assert cosine_with_warmup(99, 100, 0.03) < 0.01
    root, _ = demo_dir
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    stage = dataclasses.replace(
        recipe.stage("stage1"), global_batch=16, micro_batch=2, max_steps=None, epochs=2
    )
    layout = RunLayout(tmp_path, "r").stage("stage1")
    plan = plan_stage(recipe, stage, layout, list(range(41)), has_video=False, init_from=None)
    assert (plan.grad_accum, plan.rows_per_epoch, plan.steps_per_epoch, plan.total_steps) == (4, 32, 2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.total_steps = 5  # the plan is resolved once; nobody changes it afterwards
    with pytest.raises(TypeError, match="cannot change"):  # nor anything inside it, at any depth
        plan.stage.data["datasets"][0]["json_path"] = "elsewhere.jsonl"
    with pytest.raises(TypeError, match="cannot change"):
        plan.recipe.model.llm["num_hidden_layers"] = 40
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.recipe.model.anyres.max_tiles = 1
    assert isinstance(plan.stage.trainable, tuple) and isinstance(plan.recipe.stages, tuple)
    # the plan refers to the recipe's settings instead of copying them
    assert (plan.recipe, plan.stage) == (recipe, stage)
    assert plan.processor == stage.processor_config(recipe.model)
    assert plan.resolved()["deepspeed"]["train_batch_size"] == 2 * 4 * recipe.workers
    with pytest.raises(ValueError, match="rows for one step"):
        plan_stage(recipe, stage, layout, list(range(10)), has_video=False, init_from=None)
    # an elastic range: every size in it must hold the global batch (8 micro-batches a step)
    elastic = plan_stage(
        dataclasses.replace(recipe, workers=[1, 2]),
        stage,
        layout,
        list(range(41)),
        has_video=False,
        init_from=None,
    )
    assert elastic.recipe.workers == (1, 2) and elastic.resolved()["deepspeed"]["train_batch_size"] == 16
    from pipelines.train.plan import deepspeed_config

    assert [deepspeed_config(elastic, w)["gradient_accumulation_steps"] for w in (1, 2)] == [8, 4]
    with pytest.raises(ValueError, match=r"cannot be held at 3 workers.*among \[1, 2, 4, 8\]"):
        plan_stage(
            dataclasses.replace(recipe, workers=[2, 4]),
            dataclasses.replace(stage, global_batch=16, micro_batch=2),
            layout,
            list(range(41)),
            has_video=False,
            init_from=None,
        )
    with pytest.raises(ValueError, match="data_mode: expected"):
        dataclasses.replace(stage, data_mode="disk")
    # after a drain notice the next attempt counts only the nodes not being drained (Ray Train's elastic
    # policy counts a draining node until it is gone); with none draining, the range is left whole
    from pipelines.train import on_ray

    slot = dataclasses.replace(recipe, workers=[1, 4], worker_resources={"slot": 1}, cpus_per_worker=1)
    nodes = [{"NodeID": n, "Alive": True, "Resources": {"CPU": 8, "slot": 2}} for n in "abc"]
    nodes.append({"NodeID": "d", "Alive": False, "Resources": {"CPU": 8, "slot": 2}})
    cases = [({}, 4), ({"a": 1}, 4), ({"a": 1, "b": 1}, 2), ({"a": 1, "b": 1, "c": 1}, 1)]
    for draining, most in cases:
        monkeypatch.setattr(on_ray, "draining_nodes", lambda d=draining: d)
        monkeypatch.setattr(on_ray.ray, "nodes", lambda: nodes)
        assert on_ray._attempt_max(slot) == most, draining


def _global_ids(source_of, world: int, epochs: int) -> list[list[list[str]]]:
    """Each epoch's global steps as every rank of ``world`` trains them: step s = the sample ids of its
    micro-batch slots, rank r's k-th micro-batch in slot k * world + r."""
    shares = [[list(source_of(rank, world).epoch(e)) for rank in range(world)] for e in range(epochs)]
    out = []
    for per_rank in shares:
        steps = []
        for s in range(len(per_rank[0])):
            assert len({len(per_rank[r]) for r in range(world)}) == 1  # every rank the same step count
            slots = [None] * sum(len(per_rank[r][s]) for r in range(world))
            for r in range(world):
                for k, micro in enumerate(per_rank[r][s]):
                    slots[k * world + r] = [row["sample_id"] for row in micro]
            steps.append(slots)
        out.append(steps)
    return out


def test_each_step_holds_the_same_rows_at_any_world_size(demo_dir, ray_local, tmp_path):
    """Which rows make up global step s depends on the seed, the epoch and s only: at W = 1, 2 and 4 every
    step holds the same sample ids in the same micro-batches, exactly, on the in-memory path (reshuffled each
    epoch) and the streamed one (Ray Data, the shards' order), epoch after epoch and on a resumed attempt;
    each rank trains on 1/W of a step's micro-batches. A world size that cannot hold the global batch is
    refused when the plan is made, naming those that can.
    Guards: global_steps/rank_share (the world-independent order); fails with rank-strided rows instead."""
    import ray

    from pipelines.train.on_ray import StreamedSteps

    # a mixture of two datasets of rows of many lengths, stored in 5 files in an order unlike the
    # mixture's (as preprocessing's tasks may finish)
    rows = [
        {
            "sample_id": f"s{i}",
            "position": i,
            "source": "a_image" if i < 61 else "b_video",
            "modality": "image" if i % 3 else "text",
            "input_ids": [1] * (i * 7 % 23 + 1),
        }
        for i in range(101)
    ]
    ray.data.from_items(rows[50:] + rows[:50]).repartition(5).write_parquet(
        str(tmp_path / "r" / "s" / "data")
    )
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(demo_dir[0]))
    stage = dataclasses.replace(
        recipe.stage("stage1"), micro_batch=2, global_batch=8, group_steps=3, group_by_modality=True
    )
    layout = RunLayout(tmp_path, "r").stage("s")

    def plan(world):
        return plan_stage(
            dataclasses.replace(recipe, workers=world),
            stage,
            layout,
            list(range(101)),
            has_video=False,
            init_from=None,
        )

    for name, source in (("memory", InMemorySteps), ("stream", StreamedSteps)):

        def source_of(rank, world, source=source):
            return source(plan(world), rank, world)

        epochs = 2 if name == "memory" else 1  # the streamed order is each epoch's the same
        ids = {w: _global_ids(source_of, w, epochs) for w in (1, 2, 4)}
        assert plan(4).grad_accum == 1 and plan(1).grad_accum == 4
        for w in (2, 4):
            assert ids[w] == ids[1], f"{name}: the steps at W={w} differ from W=1's"
        for steps in ids[1]:
            assert len(steps) == plan(1).steps_per_epoch == 12  # 101 rows // 8
            assert len({i for step in steps for micro in step for i in micro}) == 96
        if name == "memory":
            assert ids[1][0] != ids[1][1]  # every epoch reshuffles
        assert _global_ids(source_of, 2, epochs) == ids[2]  # a resumed attempt: the same steps
    with pytest.raises(ValueError, match=r"cannot be held at 3 workers.*\[1, 2, 4\]"):
        plan(3)


def _one_modality_per_rank(root):
    """One manifest whose positions cycle image, text, video: with 3 ranks and micro-batches of one row in
    the mixture's order (no grouping), rank 0 gets only images, rank 1 only text and rank 2 only video."""
    import json as _json

    split = {
        k: [_json.loads(line) for line in open(root / f"{k}.jsonl")]
        for k in ("single_image", "text", "video")
    }
    records = [split[k][i] for i in range(4) for k in ("single_image", "text", "video")]
    path = root / "one_modality_per_rank.jsonl"
    path.write_text("".join(_json.dumps(r) + "\n" for r in records))
    return str(path)


def test_zero3_ranks_with_one_modality_each_streamed_on_s3_and_mlflow(
    demo_dir, ray_local, s3_bucket, mlflow_server, tmp_path
):
    """ZeRO-3 gathers each module's parameters collectively, so every rank must run the same modules each
    step: rank 0 holds only images, rank 1 only text, rank 2 only video, and MediaFiller gives each
    micro-batch the media it lacks. Guards: MediaFiller; fails with it left out of the batch maker.

    The rows stream through Ray Data (the large-data path): every rank cuts the same global steps from the
    shards' order and keeps its share; checkpoints go to S3 (moto). The stage's MLflow run (a real server)
    holds exactly one loss curve, steps 1-4, the mixture manifest and the resolved plan, and ends FINISHED.
    (A lost rank resumed from S3 with an undisturbed run's losses: the cluster tier's elastic test.)"""
    root, _ = demo_dir
    # 3 workers x 0.25 CPU leave a CPU for the Ray Data reads that each rank's stream runs (at 0.5 each, the
    # reads waited for a CPU that never came); a stall fails within 120 s instead of at the test's timeout
    recipe = dataclasses.replace(
        load_recipe("llava_onevision", "tiny", demo_dir=str(root)), workers=3, cpus_per_worker=0.25
    )
    recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, manifest=None))
    stage = dataclasses.replace(
        recipe.stage("stage2_ov"),
        data={"datasets": [{"json_path": _one_modality_per_rank(root)}]},
        zero_stage=3,
        micro_batch=1,
        global_batch=3,
        max_steps=4,
        checkpoint_every=2,
        lr=1e-3,
        vision_lr=2e-4,
        stall_timeout_s=120.0,
        data_mode="stream",
    )
    layout = _prepare(recipe, stage, RunLayout(f"{s3_bucket}/runs", "z3").stage("stage2_ov"))
    from pipelines.train.on_ray import StreamedSteps
    from pipelines.train.stage import data_stats

    plan = plan_stage(recipe, stage, layout, data_stats(layout)[0], has_video=True, init_from=None)
    for rank, modality in enumerate(("image", "text", "video")):
        kept = [r for step in StreamedSteps(plan, rank, 3).epoch(0) for micro in step for r in micro]
        assert {r["modality"] for r in kept} == {modality}
    tracking = TrackingConfig(uri=mlflow_server, experiment="test-train")
    record = train_stage(recipe, stage, layout, init_from=None, tracking=tracking)
    history = read_history(layout.history)
    assert [m["step"] for m in history] == [1, 2, 3, 4] and record["steps"] == 4
    assert [m["world"] for m in history] == [3] * 4 and all(len(m["sample_ids"]) == 3 for m in history)
    assert all(m["modalities"] == ["image"] for m in history)  # rank 0's own rows: images only
    assert record["data_mode"] == "stream"
    assert record["checkpoint_uri"].startswith("s3://") and storage.is_complete(record["hf_uri"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["llava_ray.output_uri"] == record["hf_uri"]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plan.json", "mixture.json", "plots"} <= artifacts


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
        text_config=Qwen2Config(vocab_size=len(tok), **llm),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(1)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=pinpoints,
        size={"height": 56, "width": 56},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(path)


def test_stage1_from_an_hf_release_on_s3_changes_only_the_projector(demo_dir, ray_local, s3_bucket, tmp_path):
    """An llava-hf-style release on s3:// (transformers' own save_pretrained, none of our files): before
    any step our model gives transformers' logits and our processor its tiles. Then Stage-1 trains from it
    (8 rows, 2 workers x micro-batch 2, two epochs): the export changes the projector and nothing else, and
    reproduces the training model's logits; every row is seen once an epoch.
    Guards: set_trainable; fails with it switched off (the frozen parts move)."""
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
    recipe = dataclasses.replace(recipe, model=ModelSpec(checkpoint=uri, anyres=anyres))
    recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, manifest=None))
    stage = recipe.stage("stage1")
    manifest = {"datasets": [{**stage.data["datasets"][0], "sampling_strategy": "first:8"}]}
    stage = dataclasses.replace(
        stage, data=manifest, max_steps=None, epochs=2, checkpoint_every=2, micro_batch=2, global_batch=4
    )
    layout = _prepare(recipe, stage, RunLayout(tmp_path, "run").stage(stage.name))
    record = train_stage(recipe, stage, layout, init_from=None)
    assert record["steps"] == 4 and record["final_loss"] > 0 and record["data_mode"] == "memory"
    assert storage.is_complete(record["hf_uri"])
    export = LlavaOnevisionForConditionalGeneration.from_pretrained(record["hf_uri"]).eval()
    before, after = _weights(reference), _weights(export)
    for frozen in ("model.vision_tower.", "model.language_model.", "lm_head."):
        assert not _changed(before, after, frozen), f"{frozen} changed in Stage-1"
    assert _changed(before, after, "model.multi_modal_projector.")
    exported = LlavaProcessor.from_pretrained(record["hf_uri"])
    with torch.no_grad():
        logits = export(**exported.probe_batch()).logits
    trained = load_tensors(storage.read_bytes(layout.probe_logits))["logits"]
    assert torch.allclose(logits, trained, atol=1e-5)
    history = read_history(layout.history)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert all(m["tokens_per_s"] > 0 and 0 <= m["data_wait_share"] <= 1 for m in history)
    rows = read_output(layout.root)
    assert len(rows) == 8
    per_epoch = [sum(m["tokens"] for m in history[:2]), sum(m["tokens"] for m in history[2:])]
    assert per_epoch == [sum(len(r["input_ids"]) for r in rows)] * 2  # every row once an epoch


def test_stage1_starts_from_separate_vision_and_llm_checkpoints(demo_dir, tmp_path):
    """Stage-1 from a SigLIP vision model and a Qwen-2 LLM directory, each saved by transformers: the
    composed model keeps SigLIP's first layers only (vision_layers, as OneVision drops the last) and gives
    before any step the vision features and text logits of the parts themselves, and the recipe's Stage-1,
    through the stage's own path (plan_stage, then StageWorker.setup_model, as every worker runs it),
    builds the same weights with exactly the projector trainable. Guards: the recipe's model and the
    stage's trainable parts reach setup_model; fails with plan_stage taking a default ModelSpec, or with
    set_trainable freezing everything or nothing. (That Stage-1 then changes the projector alone is
    test_stage1_from_an_hf_release_on_s3_changes_only_the_projector.)"""
    from transformers import (
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
    recipe = dataclasses.replace(recipe, model=spec, workers=1)
    stage = recipe.stage("stage1")
    layout = RunLayout(tmp_path, "run").stage("stage1")
    plan = plan_stage(recipe, stage, layout, list(range(64)), has_video=False, init_from=None)
    rebuilt, _ = StageWorker(plan, LocalContext(str(tmp_path / "c"))).setup_model()
    assert _weights(rebuilt).keys() == _weights(model).keys()
    for name, tensor in _weights(model).items():
        assert torch.equal(tensor, _weights(rebuilt)[name]), name
    trainable = {name for name, p in rebuilt.named_parameters() if p.requires_grad}
    projector = {n for n, _ in rebuilt.named_parameters() if n.startswith("model.multi_modal_projector.")}
    assert len(projector) == 4 and trainable == projector | {"model.image_newline"}  # Stage-1: the projector
