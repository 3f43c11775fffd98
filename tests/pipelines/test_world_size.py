"""One objective whatever the split: a global batch of four micro-batches trained as 1 rank x 4
accumulation, 2 x 2 and 4 x 1 (gloo rank processes, the stage worker's own step) gives the same loss and
the same gradient, and the loss is the global batch's, computed independently with transformers."""

import dataclasses
import multiprocessing
import os
import time

import pytest
import torch

from pipelines.layout import RunLayout
from pipelines.preprocess import PreprocessConfig, preprocess
from pipelines.recipes import load_recipe, step_config
from pipelines.train.plan import plan_stage
from pipelines.train.stage import data_stats
from tests.conftest import free_port

pytestmark = pytest.mark.slow

_PRELOAD = ["torch", "deepspeed", "transformers", "pipelines.train.worker", "pipelines.train.local"]


def _rank(rank: int, world: int, port: int, plan, out: str) -> None:
    """One rank: the stage worker's seams up to its first step; rank 0 writes the step's loss and the
    gradient the optimizer was about to apply (ZeRO-0: every rank holds it whole, averaged)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from pipelines.train.local import LocalContext
    from pipelines.train.worker import StageWorker

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    worker = StageWorker(plan, LocalContext(os.path.join(out, "ckpt"), rank, world))
    model, processor = worker.setup_model()
    ds_model, optimizer = worker.setup_optimizer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def capture(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()

    optimizer.register_step_pre_hook(capture)
    worker.setup_step(ds_model, optimizer, processor, start_step=0)
    step = next(iter(worker.setup_data().epoch(0)))
    _, metrics = worker.train_step(step, 0, 0.0, time.perf_counter())
    if rank == 0:
        grads["loss"] = torch.tensor(metrics["loss"], dtype=torch.float64)
        grads["supervised"] = torch.tensor(metrics["supervised_tokens"])
        save_file(grads, os.path.join(out, f"world{world}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


def _run(plan, world: int, out: str) -> dict:
    from safetensors.torch import load_file

    context = multiprocessing.get_context("forkserver")
    port = free_port()
    procs = [context.Process(target=_rank, args=(r, world, port, plan, out)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, f"world {world}: rank exit codes"
    return load_file(os.path.join(out, f"world{world}.safetensors"))


def _same_gradient(got: dict, expected: dict, label: str) -> None:
    """Every parameter's gradient within fp32 rounding (a parameter no row reached: None or zeros)."""
    names = (set(got) | set(expected)) - {"loss", "supervised"}
    assert len(names) > 50
    for name in sorted(names):
        a, b = got.get(name), expected.get(name)
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{label}: {n}: {m}")


@pytest.mark.timeout(420)
def test_one_global_batch_one_loss_and_gradient_at_1x4_2x2_4x1(demo_dir, tmp_path):
    """Four rows of unlike lengths and modalities (so per-micro-batch means would weigh their tokens
    unequally): the step's loss and every parameter's gradient agree within fp32 rounding at 1 x 4, 2 x 2
    and 4 x 1, and the loss equals the global batch's summed token losses over its supervised tokens,
    and its gradient, computed by transformers' model alone.
    Guards: the global normalisation (num_items_in_batch = the global supervised-token count, the loss
    scaled back from DeepSpeed's rank and accumulation averaging); fails with per-micro-batch means, and
    with the backward of the model's own output tensor (DeepSpeed then divides by the accumulation)."""
    import json

    from components.model import build_model, set_trainable
    from components.processor import LlavaProcessor
    from pipelines.train.data import InMemorySteps

    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    root, _ = demo_dir
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    mixed = root / "one_of_each_modality.jsonl"  # beside the demo media its paths name
    records = [
        json.loads(next(iter(open(root / f"{k}.jsonl"))))
        for k in ("text", "single_image", "video", "multi_image")
    ]
    # unlike supervised-token counts: a three-turn text conversation, a longer multi-image answer
    records[0]["conversations"] = records[0]["conversations"] * 3
    records[3]["conversations"][1]["value"] = " ".join([records[3]["conversations"][1]["value"]] * 4)
    mixed.write_text("".join(json.dumps(r) + "\n" for r in records))
    stage = dataclasses.replace(
        recipe.stage("stage2_ov"),
        data={"datasets": [{"json_path": str(mixed)}]},
        zero_stage=0,
        micro_batch=1,
        global_batch=4,
        max_steps=1,
        grad_clip=1e9,  # the gradient as computed, not clipped
        group_by_modality=False,
    )
    layout = RunLayout(tmp_path, "run").stage(stage.name)
    preprocess(
        PreprocessConfig(manifest=stage.data, data_root=str(root), steps=step_config(recipe, stage)),
        layout,
        local=True,
    )
    positions, modalities = data_stats(layout)
    assert len(positions) == 4 and len(modalities) == 4

    results = {}
    for world in (1, 2, 4):
        plan = plan_stage(
            dataclasses.replace(recipe, workers=world),
            stage,
            layout,
            positions,
            has_video=True,
            init_from=None,
        )
        assert plan.grad_accum == 4 // world
        results[world] = _run(plan, world, str(tmp_path))

    # the reference: transformers' model of the same seed, each row alone, summed token losses
    plan = plan_stage(
        dataclasses.replace(recipe, workers=1), stage, layout, positions, has_video=True, init_from=None
    )
    model, processor = build_model(recipe.model, seed=recipe.seed)
    processor = LlavaProcessor(plan.processor, processor.tokenizer)
    processor.arch.set_stage_config(model.config, processor.anyres)
    set_trainable(model, stage.trainable)
    rows = [r for micro in next(iter(InMemorySteps(plan, 0, 1).epoch(0))) for r in micro]
    count = sum(int((torch.as_tensor(r["labels"][1:]) != -100).sum()) for r in rows)
    total = 0.0
    for row in rows:
        batch = processor.collate([row])
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        keep = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum") / count
        loss.backward()
        total += loss.item()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert count == int(results[1]["supervised"])
    assert len({len([t for t in r["labels"][1:] if t != -100]) for r in rows}) >= 3  # unlike counts
    assert float(results[1]["loss"]) == pytest.approx(total, rel=1e-5)
    _same_gradient(results[1], reference, "transformers")
    for world in (2, 4):
        assert float(results[world]["loss"]) == pytest.approx(float(results[1]["loss"]), rel=1e-5), world
        _same_gradient(results[world], results[1], f"{world} ranks")
