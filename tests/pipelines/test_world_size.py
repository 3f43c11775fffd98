"""A stage at another world size (gloo rank processes, the stage worker's own seams): one objective
whatever the split (1 x 4, 2 x 2, 4 x 1 give the global batch's loss and gradient), and a checkpoint
written at one world size resumes at another, ZeRO-2 and ZeRO-3, every state bit for bit."""

import dataclasses
import multiprocessing
import os
import shutil
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

    from pipelines.train.local import LocalContext, join_local_group
    from pipelines.train.worker import StageWorker

    torch.set_num_threads(1)
    join_local_group(rank, world, port)
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


def _processes(target, world: int, *args) -> list[int]:
    """``target(rank, world, port, *args)`` in ``world`` rank processes (forked from a server that has
    imported torch, DeepSpeed and transformers once); their exit codes."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    port = free_port()
    procs = [context.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _run(plan, world: int, out: str) -> dict:
    from safetensors.torch import load_file

    assert _processes(_rank, world, plan, out) == [0] * world, f"world {world}: rank exit codes"
    return load_file(os.path.join(out, f"world{world}.safetensors"))


class _Stop(Exception):
    pass


def _stop_after(step: int):
    def hook(done: int, rank: int) -> None:
        if done == step:
            raise _Stop(step)

    return hook


def _stage(rank: int, world: int, port: int, plan, root: str, stop_after: int | None, corrupt: bool) -> None:
    """One rank of a whole stage (StageWorker.train), checkpoints under ``root``; ``stop_after``: the rank
    ends after that step's checkpoint; ``corrupt``: one Adam moment is changed between the resume's load
    and its check."""
    import torch.distributed as dist

    from pipelines.train import portable
    from pipelines.train.local import LocalContext, join_local_group
    from pipelines.train.worker import StageWorker

    join_local_group(rank, world, port)
    if corrupt:
        load = portable.load

        def load_then_corrupt(ds_model, directory, rank):
            meta = load(ds_model, directory, rank)
            name, p = portable._trainable(ds_model)[-1]
            moment = portable._full(ds_model, p, "exp_avg")
            portable._set(ds_model, p, "exp_avg", moment + 1e-7)
            return meta

        portable.load = load_then_corrupt
    hooks = [_stop_after(stop_after)] if stop_after else []
    try:
        StageWorker(plan, LocalContext(root, rank, world), hooks).train()
    except _Stop:
        pass
    except portable.ReshardMismatch as e:
        print(f"rank {rank}: {e}", flush=True)
        os._exit(3)
    dist.destroy_process_group()


def _same_gradient(got: dict, expected: dict, label: str) -> None:
    """Every parameter's gradient within fp32 rounding (a parameter no row reached: None or zeros)."""
    names = (set(got) | set(expected)) - {"loss", "supervised"}
    assert len(names) > 50
    for name in sorted(names):
        a, b = got.get(name), expected.get(name)
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{label}: {n}: {m}")


def _mixed(root):
    """Eight demo rows of every modality and unlike supervised-token counts, beside the demo media."""
    import json

    rows = {
        k: [json.loads(line) for line in open(root / f"{k}.jsonl")][:2]
        for k in ("text", "single_image", "video", "multi_image")
    }
    records = [r for pair in zip(*rows.values(), strict=True) for r in pair]
    records[0]["conversations"] = records[0]["conversations"] * 3
    path = root / "two_of_each_modality.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


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


@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero, before, after", [(2, 2, 1)])
def test_a_checkpoint_resumes_at_another_world_size(zero, before, after, demo_dir, tmp_path):
    """A ZeRO-2 stage checkpointed at step 2 on `before` ranks resumes on `after`: every weight, Adam
    moment, step count, learning rate and RNG state is checked equal to the checkpoint's, bit for bit,
    before the first resumed step; the resumed steps train on the rows, and give the losses, of the same
    stage run undisturbed (losses within 1e-5: the reduction order differs), each recorded at its world.
    (ZeRO-3 resumed 2 -> 1 -> 2 -> 1, checked the same way, with an undisturbed run's losses: the cluster
    tier's elastic test.)
    Guards: the portable checkpoint and its check (portable.verify); fails with an Adam moment changed
    between the load and the check."""
    from pipelines.train.stage import read_history

    root, _ = demo_dir
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    stage = dataclasses.replace(
        recipe.stage("stage2_ov"),
        data={"datasets": [{"json_path": str(_mixed(root))}]},
        zero_stage=zero,
        micro_batch=1,
        global_batch=4,
        max_steps=4,
        checkpoint_every=2,
        lr=1e-3,
    )

    def prepared(name):
        layout = RunLayout(tmp_path, name).stage(stage.name)
        config = PreprocessConfig(manifest=stage.data, data_root=str(root), steps=step_config(recipe, stage))
        preprocess(config, layout, local=True)
        return layout

    def plan(layout, world):
        positions, _ = data_stats(layout)
        return plan_stage(
            dataclasses.replace(recipe, workers=world),
            stage,
            layout,
            positions,
            has_video=True,
            init_from=None,
        )

    whole, moved, bad = prepared("whole"), prepared("moved"), prepared("bad")
    assert (
        _processes(_stage, before, plan(whole, before), str(tmp_path / "ck-whole"), None, False)
        == [0] * before
    )
    codes = _processes(_stage, before, plan(moved, before), str(tmp_path / "ck-moved"), 2, False)
    assert codes == [0] * before
    shutil.copytree(tmp_path / "ck-moved", tmp_path / "ck-bad")  # the same checkpoint, for the bad resume
    assert (
        _processes(_stage, after, plan(moved, after), str(tmp_path / "ck-moved"), None, False) == [0] * after
    )
    codes = _processes(_stage, after, plan(bad, after), str(tmp_path / "ck-bad"), None, True)
    assert 3 in codes, "a changed moment is caught before the first resumed step"

    reference, resumed = read_history(whole.history), read_history(moved.history)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["attempt_start_step"] for m in resumed] == [0, 0, 2, 2]
    assert [m["world"] for m in resumed] == [before, before, after, after]
    assert [m["tokens"] for m in resumed] == [m["tokens"] for m in reference]
    for got, want in zip(resumed, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
