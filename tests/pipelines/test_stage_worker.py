"""The train stage's worker (``StageWorker``), driven through its seams on one rank without Ray
(``LocalContext``): the same code Ray Train runs on every worker, with LoRA, a checkpoint, an interruption
and a resume, then the export. On the CPU (gloo) always; on a GPU (NCCL, bf16) where one is at hand
(marker gpu)."""

import dataclasses

import pytest
import torch

from components import storage
from pipelines.layout import RunLayout
from pipelines.preprocess import PreprocessConfig, preprocess
from pipelines.recipes import LoraSpec, load_recipe, step_config
from pipelines.train.local import LocalContext, init_one_rank_group
from pipelines.train.plan import plan_stage
from pipelines.train.stage import data_stats, read_history
from pipelines.train.worker import StageWorker

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


@pytest.fixture(scope="module")
def process_group():
    """One rank of a process group, kept for the test process: DeepSpeed keeps the group it first saw (its
    cloned world group), so a group destroyed and made again breaks every later in-process stage (the
    ``--local`` DAG runs, the stall tests: "Group ... is not registered")."""
    init_one_rank_group(torch.cuda.is_available())


class Interrupt(Exception):
    pass


def _stop_after(step: int):
    def hook(done: int, rank: int) -> None:
        if done == step:
            raise Interrupt(f"stopped after step {step}")

    return hook


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.timeout(900)
def test_the_real_loop_with_lora_interrupted_and_resumed(device, demo_dir, tmp_path, process_group):
    """Four LoRA steps in one go, and four steps interrupted right after the step-2 checkpoint then resumed
    by a new StageWorker: the resumed run continues from step 2 with the uninterrupted run's losses
    (exactly on the CPU; within bf16 noise on a GPU), and its export is a plain HF checkpoint (LoRA merged)
    that loads and gives the probe logits the training model gave."""
    from safetensors.torch import load as load_tensors
    from transformers import AutoModelForImageTextToText

    root, manifests = demo_dir
    recipe = dataclasses.replace(
        load_recipe("llava_onevision", "tiny", demo_dir=str(root)),
        workers=1,
        use_gpu=device == "cuda",
        cpus_per_worker=2,
    )
    stage = dataclasses.replace(
        recipe.stage("stage2_si"),
        data={"datasets": [{"json_path": manifests["single_image"]}]},
        lora=LoraSpec(r=4, alpha=8),
        micro_batch=2,
        global_batch=2,
        max_steps=4,
        checkpoint_every=2,
        lr=1e-3,
    )
    histories, plans = {}, {}
    for name in ("whole", "resumed"):
        layout = RunLayout(tmp_path, name).stage(stage.name)
        config = PreprocessConfig(
            manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)
        )
        preprocess(config, layout, local=True)  # no Ray here (the GPU machine has none)
        positions, _ = data_stats(layout)
        plans[name] = plan_stage(recipe, stage, layout, positions, has_video=False, init_from=None)
    context = LocalContext(str(tmp_path / "whole-checkpoints"))
    StageWorker(plans["whole"], context).train()
    histories["whole"] = read_history(plans["whole"].layout.history)
    checkpoints = str(tmp_path / "resumed-checkpoints")
    with pytest.raises(Interrupt):
        StageWorker(plans["resumed"], LocalContext(checkpoints), (_stop_after(2),)).train()
    StageWorker(plans["resumed"], LocalContext(checkpoints)).train()  # a new attempt: resumes at step 2
    histories["resumed"] = read_history(plans["resumed"].layout.history)
    assert [m["step"] for m in histories["resumed"]] == [1, 2, 3, 4]
    assert [m["attempt_start_step"] for m in histories["resumed"]] == [0, 0, 2, 2]
    whole, resumed = ([m["loss"] for m in histories[k]] for k in ("whole", "resumed"))
    if device == "cpu":
        assert resumed == whole
    else:
        assert resumed == pytest.approx(whole, rel=2e-2)
    layout = plans["resumed"].layout
    assert storage.is_complete(layout.export)
    export = AutoModelForImageTextToText.from_pretrained(layout.export)
    assert not [k for k in export.state_dict() if "lora_" in k]
    from components.batching import to_device
    from components.processor import LlavaProcessor

    probe = LlavaProcessor.from_pretrained(layout.export).probe_batch()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    export = export.to(device, dtype).eval()
    with torch.no_grad():
        logits = export(**to_device(probe, device, dtype)).logits.float().cpu()
    trained = load_tensors(storage.read_bytes(layout.probe_logits))["logits"]
    real = probe["attention_mask"].bool()
    tolerance = 1e-5 if device == "cpu" else 2e-2
    assert torch.allclose(logits[real], trained[real], atol=tolerance, rtol=tolerance)


@pytest.mark.timeout(300)
def test_zero3_builds_and_loads_straight_into_partitions(demo_dir, tmp_path, process_group):
    """Under ZeRO-3 the stage worker's setup_model builds the base model, and loads a previous stage's export,
    straight into DeepSpeed's partitions (transformers' zero.Init path, ``partitioned_build``): every
    parameter is partitioned before DeepSpeed wraps the model, and the gathered values equal the export's,
    whose every weight was moved away from the stage's own base model before it was saved.
    Guards: partitioned_build and setup_model's init_from; fails with partitioned_build a no-op, or with
    setup_model ignoring init_from."""
    import deepspeed

    from components.model import build_model, save_model

    root, manifests = demo_dir
    recipe = dataclasses.replace(load_recipe("llava_onevision", "tiny", demo_dir=str(root)), workers=1)
    stage = dataclasses.replace(
        recipe.stage("stage2_si"),
        data={"datasets": [{"json_path": manifests["single_image"]}]},
        zero_stage=3,
        micro_batch=2,
        global_batch=2,
    )
    layout = RunLayout(tmp_path, "z3").stage(stage.name)
    preprocess(
        PreprocessConfig(manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)),
        layout,
        local=True,
    )
    positions, _ = data_stats(layout)
    plan = plan_stage(recipe, stage, layout, positions, has_video=False, init_from=None)
    built, _ = StageWorker(plan, LocalContext(str(tmp_path / "c"))).setup_model()
    assert all(hasattr(p, "ds_id") for p in built.parameters()), "built whole, then partitioned"

    reference, processor = build_model(recipe.model)  # the stage's own base model, then every weight moved:
    with torch.no_grad():  # a load that ignored init_from (a fresh build, same seed) cannot match it
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_model(reference, processor, str(tmp_path / "export"))
    loaded_plan = dataclasses.replace(plan, init_from=str(tmp_path / "export"))
    loaded, _ = StageWorker(loaded_plan, LocalContext(str(tmp_path / "c"))).setup_model()
    params = dict(loaded.named_parameters())
    assert params and all(hasattr(p, "ds_id") for p in params.values()), "loaded whole, then partitioned"
    expected = dict(reference.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        assert all(torch.equal(params[k].detach(), expected[k].detach()) for k in expected)
