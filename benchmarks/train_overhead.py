"""Training overhead: tokens/s of Ray Train + DeepSpeed (1 and 2 workers) against a plain single-process
torch loop on the same tiny model and the same micro-batches, in one run. One thread per worker and
for the baseline, and the same per-worker work (micro-batch x accumulation): 2 workers do twice the
global batch. Every run covers the same whole epochs (1 worker and the plain loop take twice the steps
of 2 workers), so all three see the same rows: step costs vary with length, and a partial epoch would
compare different rows. Throughput is tokens over wall-clock time from the end of step 2 to the end of
the second-to-last step (data waits and epoch boundaries included; start-up, DeepSpeed initialisation
and the final checkpoint and export are not counted). The baseline runs before and after the Ray runs,
and their mean is used.

``--quick`` (a smoke run, under 45 s here): 80 rows of a small demo world, preprocessed in this process;
the one-worker run is the same recipe on one rank in this process (``train_stage(local=True)``: DeepSpeed,
no Ray Train), so only the two-worker run pays a Ray Train start-up (~25 s of the 45 on 2 cores).

    python benchmarks/train_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def baseline(recipe, stage, layout) -> tuple[float, int, int]:
    """A plain loop: same model, same rows, same steps, grouping and collation as the train loop's in-memory
    step source (so the same padding), AdamW, 1 thread, over the stage's epochs. Returns (tokens/s, steps,
    rows)."""
    import torch

    from components.generation import MediaFiller
    from components.model import build_model, param_groups, set_trainable
    from pipelines.train.data import InMemorySteps
    from pipelines.train.plan import plan_stage
    from pipelines.train.stage import data_stats

    torch.set_num_threads(1)
    recipe = dataclasses.replace(recipe, workers=1)
    positions, _ = data_stats(layout)
    plan = plan_stage(recipe, stage, layout, positions, has_video=False, init_from=None)
    model, processor = build_model(recipe.model)
    processor = processor.replace(template=stage.template)
    set_trainable(model, stage.trainable)
    optimizer = torch.optim.AdamW(param_groups(model, stage.lr, vision_lr=stage.vision_lr))
    filler = MediaFiller(processor, with_video=False)
    source = InMemorySteps(plan, 0, 1)
    all_steps = [s for epoch in range(stage.epochs) for s in source.epoch(epoch)]
    assert len(all_steps) == plan.total_steps, (len(all_steps), plan.total_steps)  # the train loop's steps
    tokens_done, seconds = [], []
    for micro_batches in all_steps:
        start, tokens = time.perf_counter(), 0
        for micro in micro_batches:
            tokens += sum(len(r["input_ids"]) for r in micro)
            loss = model(**processor.collate(filler(micro))).loss
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        tokens_done.append(tokens)
        seconds.append(time.perf_counter() - start)
    return sum(tokens_done[2:-1]) / sum(seconds[2:-1]), len(all_steps), plan.rows_per_epoch


def ray_train(recipe, stage, workers: int, layout, local: bool = False) -> tuple[float, dict]:
    """Our stage on ``workers`` Ray Train workers, or (``local``) on one rank in this process."""
    import shutil

    from pipelines.train.stage import read_history, train_stage

    recipe = dataclasses.replace(
        recipe, workers=workers, eval=dataclasses.replace(recipe.eval, manifest=None)
    )
    record = train_stage(recipe, stage, layout, init_from=None, local=local)
    history = read_history(layout.history)
    for uri in (layout.history, layout.export, os.path.join(layout.checkpoints, "train")):
        shutil.rmtree(uri, ignore_errors=True)  # the next run writes its own
    steady = history[2:-1]
    return sum(m["tokens"] for m in steady) / sum(m["step_s"] for m in steady), record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one epoch of 80 rows (start-up weighs more)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the demo rows per run")
    parser.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage for the Ray Train runs")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step per worker")
    args = parser.parse_args()
    # the Ray Train controller polls its workers every 2 s by default: start-up and finish wait for a poll
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    from benchmarks._common import final_line, machine, scratch
    from components.demo_data import DemoConfig, make_demo_data
    from pipelines.layout import RunLayout
    from pipelines.preprocess import PreprocessConfig, preprocess
    from pipelines.recipes import ensure_demo_data, load_recipe, step_config

    work = scratch("llava-ray-train-bench-")
    if args.quick:  # only what the 80 rows need: the full demo world takes ~20 s to draw and encode
        demo = os.path.join(work, "demo")
        make_demo_data(
            demo,
            DemoConfig(
                captions=4,
                details=4,
                single_image=80,
                multi_image=2,
                multi_view=2,
                videos=1,
                text=2,
                eval_per_kind=1,
            ),
        )
    else:
        demo = ensure_demo_data(os.path.join(work, "demo"))
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=demo)
    epochs = 1 if args.quick else args.epochs
    si = recipe.stage("stage2_si")
    if args.quick:  # the first 80 rows: 20 steps at 1 worker, 10 at 2
        si = dataclasses.replace(
            si, data={"datasets": [{**d, "sampling_strategy": "first:80"} for d in si.data["datasets"]]}
        )
    stage = dataclasses.replace(
        si,
        max_steps=None,
        checkpoint_every=10**6,
        micro_batch=args.micro_batch,
        global_batch=args.micro_batch * args.accum,
        epochs=epochs,
        zero_stage=args.zero,
        data_mode="memory",
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    layout = RunLayout(work, "bench").stage(stage.name)
    preprocess(
        PreprocessConfig(manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)),
        layout,
        local=args.quick,
    )
    before, steps, rows = baseline(recipe, stage, layout)  # 1 worker's steps: the plan's for its epochs
    # the same work per worker and step (micro-batch x accumulation): 2 workers take twice the global batch
    one, _ = ray_train(recipe, stage, 1, layout, local=args.quick)
    two_stage = dataclasses.replace(stage, global_batch=2 * stage.global_batch)
    two, _ = ray_train(recipe, two_stage, 2, layout)
    after = before if args.quick else baseline(recipe, stage, layout)[0]
    base = (before + after) / 2
    print(f"plain loop before the Ray runs {before:.0f}, after {after:.0f} tokens/s")
    overhead = 1 - one / base
    print(
        f"machine: {machine()}; tiny OneVision model, micro-batch {args.micro_batch} x {args.accum} per "
        "worker, "
        f"1 thread per worker, {epochs} epochs of {rows} rows ({steps} steps at 1 worker), ZeRO-{args.zero}"
    )
    one_name = "1 rank, no Ray (--quick)" if args.quick else "Ray Train 1 worker"
    print(f"plain torch loop  : {base:8.0f} tokens/s")
    print(f"{one_name}: {one:8.0f} tokens/s (overhead {overhead:.1%})")
    print(f"Ray Train 2 workers: {two:7.0f} tokens/s ({two / one:.2f}x one)")
    ray.shutdown()  # before the last line: the benchmark is over when it is printed
    print(
        final_line(
            "train_overhead", two / one, f"1.7x, 2 workers vs one; overhead {overhead:.0%}, target <= 10%"
        )
    )


if __name__ == "__main__":
    main()
