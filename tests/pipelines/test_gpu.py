"""The train loop's GPU path, on a real GPU: skipped where CUDA is absent (CI, this project's CPU
machines); run where one is lent (`python -m pytest -m gpu tests/pipelines/test_gpu.py`).

One rank as Ray Train runs it on a GPU worker: an NCCL process group, DeepSpeed ZeRO-2 and ZeRO-3 in bf16 (the
config ``deepspeed_config`` builds for ``use_gpu``), micro-batches moved to the GPU in bf16 by the
train loop's batch maker, then the HF export (fp32 safetensors) reloaded with ``from_pretrained`` and
compared with the probe logits the training model gave. Ray itself is not needed here: the device
machine has no Ray, and the Ray Train plumbing (ScalingConfig(use_gpu), the NCCL backend) is the same
call as on CPU with two flags."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def nccl_group():  # one per process: DeepSpeed keeps the group it first saw
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_steps_and_export_on_gpu(zero, nccl_group, tmp_path):
    import deepspeed
    from safetensors.torch import load as load_tensors
    from transformers import LlavaOnevisionForConditionalGeneration

    from components.batching import to_device
    from components.generation import MediaFiller
    from components.model import param_groups, set_trainable
    from pipelines.recipes import load_recipe
    from pipelines.train_stage import (
        _Attempt,
        _batch_maker,
        _build,
        _export,
        deepspeed_config,
        plan_stage,
    )

    recipe = dataclasses.replace(
        load_recipe("llava_onevision", "tiny", demo_dir=str(tmp_path)), use_gpu=True, workers=1
    )
    stage = dataclasses.replace(
        recipe.stage("stage2_si"), zero_stage=zero, micro_batch=2, global_batch=2, lr=1e-3
    )
    plan = plan_stage(recipe, stage, 2, init_from=None, export_uri=str(tmp_path / "hf"))
    plan.history_uri = str(tmp_path / "history")
    config = deepspeed_config(plan)
    assert config["bf16"] == {"enabled": True} and "contiguous_gradients" not in config["zero_optimization"]

    spec, model, processor = _build(plan)
    tokenizer = processor.tokenizer
    set_trainable(model, stage.trainable)
    groups = param_groups(model, stage.lr, vision_lr=stage.vision_lr, projector_lr=stage.projector_lr)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(groups), config=config
    )
    assert engine.device.type == "cuda"
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}

    # the train loop's batch maker: media filled in, collated, on the GPU, pixels in bf16, ids as int64
    probe = processor.probe_batch()
    filler = MediaFiller(processor, with_video=False)
    made = _batch_maker(filler, processor, engine)
    rows = [{"input_ids": [int(t) for t in ids if t != tokenizer.pad_token_id], "modality": "text"}
            for ids in probe["input_ids"].tolist()]  # fmt: skip
    text_batch = made([{**r, "labels": r["input_ids"]} for r in rows[1:]])
    assert text_batch["input_ids"].device.type == "cuda" and text_batch["input_ids"].dtype == torch.long

    labels = probe["input_ids"].masked_fill(probe["attention_mask"] == 0, -100)
    batch = to_device({**probe, "labels": labels}, engine.device, torch.bfloat16)
    assert batch["pixel_values"].dtype == torch.bfloat16 and batch["pixel_values"].device.type == "cuda"
    attempt = _Attempt(engine, lambda _: batch, 1, optimizer.param_groups[0], None, start_step=0)
    losses = []
    for step in range(12):  # the same batch: the loss falls
        _, metrics = attempt.train_step([rows], step, 0.0, 0.0)
        losses.append(metrics["loss"])
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0], losses
    assert metrics["grad_norm"] > 0

    _export(engine, engine.module, processor, plan, rank=0)
    trained = load_tensors((tmp_path / "probe_logits.safetensors").read_bytes())["logits"]
    export = LlavaOnevisionForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    assert {p.dtype for p in export.parameters()} == {torch.float32}  # exported in fp32
    export = export.to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        logits = export(**to_device(probe, "cuda", torch.bfloat16)).logits.float().cpu()
    real = probe["attention_mask"].bool()
    assert torch.allclose(logits[real], trained[real], atol=1e-2, rtol=1e-2), (
        (logits[real] - trained[real]).abs().max()
    )


def test_greedy_generation_on_gpu():
    """Serving's and evaluation's generate on a GPU: the batch follows the model to its device (and bf16
    pixels for a bf16 replica); greedy output on the GPU in fp32 equals the CPU's."""
    from PIL import Image, ImageDraw

    from components.conversation import Turn
    from components.generation import generate
    from components.model import build_model
    from components.processor import Prompt
    from pipelines.recipes import load_recipe

    recipe = load_recipe("llava_onevision", "tiny", demo_dir="unused")
    spec = recipe.model
    torch.manual_seed(0)
    model, processor = build_model(spec)
    model.eval()
    image = Image.new("RGB", (120, 90), (240, 240, 240))
    ImageDraw.Draw(image).rectangle((20, 20, 80, 70), fill=(30, 30, 200))
    rows = [
        processor.prompt_row(Prompt([Turn("user", "<image>\nWhat shape is it?")], [image])),
        processor.prompt_row(Prompt([Turn("user", "Name a color.")])),
    ]
    cpu = generate(model, processor, rows, max_new_tokens=8)
    gpu = generate(model.to("cuda"), processor, rows, max_new_tokens=8)
    assert [r["text"] for r in gpu] == [r["text"] for r in cpu]
    half = generate(model.to(torch.bfloat16), processor, rows, max_new_tokens=8)
    assert [r["prompt_tokens"] for r in half] == [r["prompt_tokens"] for r in cpu]
    assert all(r["completion_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in half)
