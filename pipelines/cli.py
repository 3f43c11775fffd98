"""`llava-ray`: the command line. Each subcommand is a thin wrapper over a pipeline or component."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def _demo_data(args: argparse.Namespace) -> int:
    from components.demo_data import DemoConfig, make_demo_data

    manifests = make_demo_data(args.out, DemoConfig(tile_size=args.tile_size, seed=args.seed))
    for split, path in manifests.items():
        print(f"{split:22s} {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Build the tiny model and the demo data, then one forward+backward pass per modality."""
    from components.demo_data import DemoConfig, make_demo_data
    from components.model import ModelSpec, build_model, count_parameters
    from pipelines.smoke import forward_backward_per_modality

    spec = ModelSpec()
    print(f"resolved model spec: {json.dumps(spec.to_dict(), default=str)}")
    out = args.out
    start = time.monotonic()
    manifests = make_demo_data(os.path.join(out, "data"), DemoConfig(tile_size=spec.anyres.tile_size))
    print(f"demo data: {len(manifests)} manifests under {out}/data ({time.monotonic() - start:.1f}s)")
    model, tokenizer = build_model(spec)
    print(f"tiny model: {count_parameters(model):,} parameters, vocabulary {len(tokenizer)}")
    results = forward_backward_per_modality(model, tokenizer, spec, os.path.join(out, "data"), manifests)
    print(f"{'modality':14s} {'tokens':>7s} {'loss':>8s} {'grad norm':>10s}")
    for r in results:
        print(f"{r['modality']:14s} {r['tokens']:7d} {r['loss']:8.4f} {r['grad_norm']:10.4f}")
    return 0


def _init_ray(args: argparse.Namespace) -> None:
    import ray

    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=getattr(args, "num_cpus", None), include_dashboard=False)


def _preprocess(args: argparse.Namespace) -> int:
    from pipelines.preprocess import PreprocessConfig, preprocess
    from pipelines.recipes import ensure_demo_data, load_recipe, stage_config
    from pipelines.stages import StageConfig

    if args.recipe:
        if not args.stage:
            raise SystemExit("preprocess: --recipe needs --stage")
        recipe = load_recipe(args.recipe, args.profile, demo_dir=args.demo_dir)
        if args.profile == "tiny":
            ensure_demo_data(args.demo_dir, recipe.model.anyres.tile_size)
        stage = recipe.stage(args.stage)
        config = PreprocessConfig(
            manifest=stage.data, data_root=recipe.data_root, stage=stage_config(recipe, stage)
        )
    elif args.manifest:
        config = PreprocessConfig(manifest=args.manifest, stage=StageConfig(template=args.template))
    else:
        raise SystemExit("preprocess: give --recipe and --stage, or --manifest")
    config.max_workers = args.workers
    _init_ray(args)
    summary = preprocess(config, args.out)
    return 0 if summary["accepted"] > 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the deterministic demo world (JSONL + media + Parquet)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--tile-size", type=int, default=56, help="spread image sizes over this tile size's AnyRes grids"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser(
        "preprocess", help="Ray Data: manifest -> tiles/frames/tokens -> Parquet shards + rejects"
    )
    # what to read
    p.add_argument("--recipe", help="a recipe name (pipelines/recipes) or YAML path")
    p.add_argument("--profile", default="tiny", help="recipe profile: tiny or full")
    p.add_argument("--stage", help="the recipe stage whose data, template and token budget to use")
    p.add_argument(
        "--manifest", help="instead of a recipe: a JSON/JSONL/Parquet manifest or YAML mixture URI"
    )
    p.add_argument(
        "--template", default="chatml", help="with --manifest: plain, vicuna_v0, vicuna_v1, chatml"
    )
    p.add_argument("--demo-dir", default="demo_out/data", help="where the tiny profile's demo data lives")
    # where to write, and with what
    p.add_argument("--out", required=True, help="output URI (a path or s3://): data/, rejects/, mixture.json")
    p.add_argument("--workers", type=int, default=2, help="most CPU actors")
    p.add_argument("--address", help="a Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("demo", help="the main job on the embedded default (tiny model, demo data)")
    p.add_argument("--out", default="demo_out", help="working directory")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
