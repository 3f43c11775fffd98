"""Padding: the share of pad tokens with our modality+length grouping against naive random batching,
on the demo OneVision mix (single-image AnyRes, multi-image, video, text), in one run.

Rows are tokenized exactly as preprocessing does (the stages, called directly). Both sides cut the same
shuffled stream into optimizer steps of ``micro x accum`` rows per rank; naive batching splits each
step in arrival order, ours sorts it by (modality, frames, length) first (components.batching.group_rows).

    python benchmarks/padding.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one shuffle (under 45 s)")
    parser.add_argument("--micro", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step per rank")
    parser.add_argument(
        "--group-steps", type=int, default=8, help="optimizer steps grouped together (megabatch)"
    )
    args = parser.parse_args()

    from benchmarks._common import final_line, machine, scratch
    from components.batching import group_rows, padding_share
    from pipelines.preprocess import PreprocessConfig, resolve_entries, work_table
    from pipelines.recipes import ensure_demo_data, load_recipe, step_config
    from pipelines.steps import STEPS, Emit

    demo = ensure_demo_data(os.path.join(scratch("llava-ray-pad-"), "demo"))
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=demo)
    stage = recipe.stage("stage2_ov")
    config = PreprocessConfig(
        manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)
    )
    table = work_table(resolve_entries(config))
    for cls in STEPS:
        table = cls(config.steps)(table)
    rows = [
        {k: r[k] for k in ("modality", "input_ids", "pixel_shape")}
        for r in Emit(scratch("llava-ray-pad-rejects-"))(table).to_pylist()
    ]
    window = args.micro * args.accum * args.group_steps
    naive, ours = [], []
    for seed in range(1 if args.quick else 10):
        stream = rows[:]
        random.Random(seed).shuffle(stream)
        for start in range(0, len(stream) - window + 1, window):
            step = stream[start : start + window]
            naive += [
                step[i * args.micro : (i + 1) * args.micro] for i in range(args.accum * args.group_steps)
            ]
            ours += group_rows(step, args.micro, args.accum * args.group_steps)
    p_naive, p_ours = padding_share(naive), padding_share(ours)
    kinds = {}
    for r in rows:
        kinds[r["modality"]] = kinds.get(r["modality"], 0) + 1
    print(f"machine: {machine()}; demo OneVision mix: {len(rows)} rows {kinds}")
    print(
        f"micro-batch {args.micro}, {args.accum} per step per rank, {args.group_steps} steps grouped "
        f"({window} rows at a time)"
    )
    print(f"pad tokens: naive {p_naive:.1%}, ours {p_ours:.1%}")
    ratio = p_naive / max(p_ours, 1e-9)
    print(f"padding: ours {p_ours:.1%} vs naive {p_naive:.1%}: {ratio:.1f}x less")
    print(final_line("padding", ratio, f"<= 5% pad tokens; ours {p_ours:.1%}"))


if __name__ == "__main__":
    main()
