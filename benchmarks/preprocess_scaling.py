"""Preprocessing throughput: rows/s of the Ray Data pipeline with 1 and with 2 CPU workers, on the
demo OneVision mix (single-image AnyRes, multi-image, video, text), in one run; plus bytes per row.

Throughput is counted from the first output batch to the last (actor start-up excluded), median of
the repeats. Each worker is one CPU actor running every stage.

    python benchmarks/preprocess_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks._common import final_line, machine, scratch  # noqa: E402


def run(ray, config, entries, rejects: str) -> tuple[float, int, int]:
    from pipelines.preprocess import build_dataset

    ds = build_dataset(config, rejects, entries)
    rows = nbytes = 0
    first = None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if first is None:
            first = time.perf_counter()
            first_rows = batch.num_rows
        rows += batch.num_rows
        nbytes += batch.nbytes
    elapsed = time.perf_counter() - first
    return (rows - first_rows) / elapsed, rows, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2/5 of the demo world, one repeat (under 45 s)")
    parser.add_argument(
        "--tile-size",
        type=int,
        default=384,
        help="384: real OneVision tiles (images up to 2304 px); 56: the tiny profile's",
    )
    args = parser.parse_args()
    import ray

    from pipelines.preprocess import PreprocessConfig, resolve_entries
    from pipelines.recipes import ensure_demo_data, load_recipe, step_config

    work = scratch("llava-ray-bench-")
    demo = os.path.join(work, "demo")
    if args.quick:  # 2/5 of the demo world, the same mix of kinds: making it at tile 384 takes time
        from components.demo_data import DemoConfig, make_demo_data

        make_demo_data(
            demo,
            DemoConfig(
                tile_size=args.tile_size,
                captions=40,
                details=20,
                single_image=96,
                multi_image=12,
                videos=10,
                text=12,
                eval_per_kind=10,
            ),
        )
    ensure_demo_data(demo, tile_size=args.tile_size)
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=demo)
    anyres = dataclasses.replace(recipe.model.anyres, tile_size=args.tile_size)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, anyres=anyres))
    stage = dataclasses.replace(recipe.stage("stage2_ov"), max_length=32768)  # 729-token tiles at 384
    copies = (2 if args.quick else 6) if args.tile_size < 128 else 1
    mix = {"datasets": [dict(d) for d in stage.data["datasets"] for _ in range(copies)]}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = PreprocessConfig(
        manifest=mix, data_root=recipe.data_root, steps=step_config(recipe, stage), batch_size=8
    )
    entries = resolve_entries(base)
    repeats = 1 if args.quick else 3
    print(
        f"machine: {machine()}; demo OneVision mix x{copies} at tile {args.tile_size}: {len(entries)} rows; "
        f"median of {repeats}"
    )
    results = {}
    for workers in (1, 2):
        base.min_workers = base.max_workers = workers
        rates = []
        for r in range(repeats):
            rate, rows, nbytes = run(ray, base, entries, os.path.join(work, f"rejects-{workers}-{r}"))
            rates.append(rate)
        results[workers] = statistics.median(rates)
        print(
            f"{workers} worker(s): {results[workers]:7.1f} rows/s ({rows} rows, {nbytes / rows / 1024:.1f} "
            "KiB/row)"
        )
    print(final_line("preprocess_scaling", results[2] / results[1], "1.7x"))


if __name__ == "__main__":
    main()
