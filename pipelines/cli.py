"""llava-ray trains the LLaVA family (LLaVA, LLaVA-1.5, LLaVA-NeXT-Interleave, LLaVA-OneVision) in stages
on Ray, and serves the result behind an OpenAI-compatible endpoint.

A first run, on this machine (tiny models, demo data, no GPU needed):

  llava-ray demo                                          the whole OneVision curriculum, evaluated and served
  llava-ray run --recipe llava_onevision --run-id r1      a recipe through its stages (re-run: resumes)
  llava-ray serve --checkpoint runs/r1/stage2_ov/hf       the last stage's export behind /v1/chat/completions

Then: `llava-ray status r1` shows each stage and a running stage's step, loss and ETA; `llava-ray submit`
runs the same on a cluster. Docs: README.md (start here), cluster/README.md (KubeRay, ray up, spot
nodes), docs/SCALING.md (GPU-hours, memory), benchmarks/RESULTS.md."""

# Each subcommand imports what it runs inside its own function: --help, status and a bad argument answer
# without starting or loading Ray, DeepSpeed or MLflow.

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


def _init_ray(args: argparse.Namespace) -> None:
    import ray

    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=getattr(args, "num_cpus", None), include_dashboard=False)


def _preprocess(args: argparse.Namespace) -> int:
    from pipelines.preprocess import PreprocessConfig, preprocess
    from pipelines.recipes import ensure_demo_data, load_recipe, step_config
    from pipelines.steps import StepConfig

    if args.recipe:
        if not args.stage:
            raise SystemExit("preprocess: --recipe needs --stage")
        recipe = load_recipe(args.recipe, args.profile, demo_dir=args.demo_dir)
        if args.profile == "tiny":
            ensure_demo_data(args.demo_dir, recipe.model.anyres.tile_size)
        stage = recipe.stage(args.stage)
        config = PreprocessConfig(
            manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)
        )
    elif args.manifest:
        from components.model import ModelSpec

        config = PreprocessConfig(
            manifest=args.manifest, steps=StepConfig(model=ModelSpec(**_given(args, "template")))
        )
    else:
        raise SystemExit("preprocess: give --recipe and --stage, or --manifest")
    config.max_workers = args.workers
    _init_ray(args)
    summary = preprocess(config, args.out)
    return 0 if summary["accepted"] > 0 else 1


PIPELINE_FLAGS = (
    "recipe",
    "profile",
    "storage",
    "run_id",
    "tracking_uri",
    "demo_dir",
    "max_steps",
    "data_mode",
    "seed",
    "workers",
    "placement",
    "progress_every_s",
)
"""The run flags that map one to one onto PipelineConfig's fields (their defaults are the dataclass's)."""


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The flags among ``names`` the user gave (argparse defaults are None): only they override a config
    dataclass's defaults, which stay the only defaults."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _pipeline_config(args: argparse.Namespace, **over):
    from pipelines.dag import PipelineConfig

    return PipelineConfig(**_given(args, *PIPELINE_FLAGS), local=args.local, **over)


def _run(args: argparse.Namespace) -> int:
    from pipelines.dag import format_summary, run_pipeline, select_stages
    from pipelines.recipes import load_recipe

    cfg = _pipeline_config(args, from_stage=args.from_stage, until_stage=args.until_stage)
    select_stages(
        load_recipe(cfg.recipe, cfg.profile, demo_dir=cfg.demo_dir), cfg.from_stage, cfg.until_stage
    )
    if not args.local:
        _init_ray(args)
    summary = run_pipeline(cfg)
    print(format_summary(summary))
    return 0


def _stage(args: argparse.Namespace) -> int:
    """One stage = the DAG cut to that node; its input is the URI the previous stage recorded."""
    from pipelines.dag import format_summary, run_pipeline
    from pipelines.recipes import load_recipe

    cfg = _pipeline_config(args, from_stage=args.name, until_stage=args.name)
    load_recipe(cfg.recipe, cfg.profile, demo_dir=cfg.demo_dir).stage(args.name)  # a bad name: before Ray
    if not args.local:
        _init_ray(args)
    summary = run_pipeline(cfg)
    print(format_summary(summary))
    return 0


def _status(args: argparse.Namespace) -> int:
    from components import storage
    from components.progress import clock
    from pipelines.layout import RunLayout

    layout = RunLayout(args.storage, args.run_id)
    if not storage.exists(layout.state):
        print(f"run {args.run_id!r}: expected a state file at {layout.state}, found none")
        return 1
    state = json.loads(storage.read_text(layout.state))
    print(f"{'node':26s} {'status':10s} output")
    for name, node in state["nodes"].items():
        status = node.get("status", "-")
        print(f"{name:26s} {status:10s} {node.get('hf_uri') or node.get('output_uri') or ''}")
        progress = layout.stage(name.split(":", 1)[1]).progress if name.startswith("train:") else None
        if status == "started" and progress and storage.exists(progress):
            p = json.loads(storage.read_text(progress))
            print(
                f"{'':26s} step {p['step']}/{p['total']}, loss {p['loss']:.4f}, ETA {clock(p.get('eta_s'))}, "
                f"world {p['world']}, {clock(time.time() - p['time'])} ago"
            )
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipelines.submit import submit

    common = []
    for name, value in _given(args, *PIPELINE_FLAGS).items():
        common += [f"--{name.replace('_', '-')}", str(value)]
    if args.local:
        common += ["--local"]
    target = ["run", *common] if args.target == "pipeline" else ["stage", args.target, *common]
    return submit(args.address, target, python=args.python, follow=not args.no_follow)


def _serve(args: argparse.Namespace) -> int:
    from ray import serve

    from serve.app import build_app, load_serve_config

    config = load_serve_config(args.config, args.checkpoint)
    _init_ray(args)
    serve.start(
        http_options={"host": args.host, "port": args.port, "request_timeout_s": config.request_timeout_s}
    )
    serve.run(build_app(config), name="llava", route_prefix="/", blocking=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from components import storage
    from components.evaluation import evaluate, format_report
    from components.manifest import parent_uri
    from components.model import load_model

    model, processor = load_model(args.checkpoint)  # its template, grid and video sampling come with it
    records = [json.loads(line) for line in storage.read_text(args.manifest).splitlines() if line.strip()]
    report = evaluate(model, processor, records, parent_uri(args.manifest), **_given(args, "max_new_tokens"))
    print(format_report(report))
    return 0


def _generate_config(args: argparse.Namespace):
    from pipelines.generate import GenerateConfig

    flags = {"rate_limit": "rate_limit_rps", "timeout": "timeout_s"}  # flag -> GenerateConfig field
    given = _given(
        args, "api_key_env", "concurrency", "workers", "rate_limit", "max_retries", "timeout", "seed"
    )
    return GenerateConfig(
        endpoint=args.endpoint,
        model=args.model,
        out=args.out,
        **({"types": args.types.split(",")} if args.types else {}),
        prompt_pack=args.prompt_pack,
        **{flags.get(k, k): v for k, v in given.items()},
    )


def _generate(args: argparse.Namespace) -> int:
    from pipelines.generate import generate, read_annotations

    config = _generate_config(args)
    annotations = read_annotations(args.images, args.captions, args.image_prefix)
    _init_ray(args)
    summary = generate(annotations, config)
    return 0 if summary["failed"] == 0 else 1


def _demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(args.out, num_cpus=args.num_cpus, seed=args.seed)


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    from pipelines.recipes import DATA_MODES, PLACEMENTS  # the choices as the recipes define them

    p.add_argument(
        "--recipe", help="a recipe name (pipelines/recipes) or YAML path; default: llava_onevision"
    )
    p.add_argument("--profile", help="tiny (the embedded default) or full (the papers' numbers)")
    p.add_argument(
        "--storage", help="checkpoints and outputs: a directory or s3://bucket/prefix; default: runs"
    )
    p.add_argument("--run-id", help="a re-run of the same id skips completed nodes")
    p.add_argument("--tracking-uri", help="MLflow: a directory (sqlite store), sqlite:/// or http://")
    p.add_argument("--demo-dir", help="where the tiny profile's demo data lives; default: demo_out/data")
    p.add_argument("--max-steps", type=int, help="cap every stage's optimizer steps (a quick run)")
    p.add_argument("--data-mode", choices=DATA_MODES, help="how every stage's rows reach the workers")
    p.add_argument(
        "--seed", type=int, help="the run's seed (init, data order, sampling); default: the recipe's"
    )
    p.add_argument("--workers", type=int, help="train on this many workers; default: the profile's")
    p.add_argument(
        "--placement",
        choices=PLACEMENTS,
        help="where the training workers go: fewest nodes (PACK, the default), across nodes (SPREAD), "
        "one per node (STRICT_SPREAD)",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="no Ray: every node in this process, training on one rank (small runs, debugging)",
    )
    p.add_argument(
        "--progress-every-s",
        type=float,
        help="away from a terminal, a progress line this often (default 30 s); a terminal gets a live bar",
    )
    p.add_argument("--address", help="a Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        "--template",
        help="with --manifest: plain, vicuna_v0, vicuna_v1, chatml; default: the model's (chatml)",
    )
    p.add_argument("--demo-dir", default="demo_out/data", help="where the tiny profile's demo data lives")
    # where to write, and with what
    p.add_argument("--out", required=True, help="output URI (a path or s3://): data/, rejects/, mixture.json")
    p.add_argument("--workers", type=int, default=2, help="most CPU actors")
    p.add_argument("--address", help="a Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("run", help="the end-to-end pipeline: preprocess -> train -> eval per stage")
    _pipeline_args(p)
    p.add_argument("--from", dest="from_stage", help="start at this stage (earlier ones must be completed)")
    p.add_argument("--until", dest="until_stage", help="stop after this stage")
    p.set_defaults(func=_run)

    p = sub.add_parser("stage", help="one stage of a recipe (preprocess + train + eval)")
    p.add_argument("name", help="the stage, e.g. stage1")
    _pipeline_args(p)
    p.set_defaults(func=_stage)

    p = sub.add_parser("submit", help="submit a stage or the pipeline as a Ray job and follow it")
    p.add_argument("target", help="a stage name, or 'pipeline'")
    _pipeline_args(p)
    p.add_argument("--python", default="python", help="the interpreter on the cluster")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="each node of a run: status and output URI")
    p.add_argument("run_id", help="the run id")
    p.add_argument("--storage", default="runs", help="where the run lives")
    p.set_defaults(func=_status)

    p = sub.add_parser("serve", help="Ray Serve: an OpenAI-compatible endpoint for an HF checkpoint")
    p.add_argument("--checkpoint", help="an HF export (path or s3://); overrides the config's")
    p.add_argument("--config", help="a ServeConfig YAML (serve/serve.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--address", help="a Ray cluster address")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.set_defaults(func=_serve)

    p = sub.add_parser("eval", help="greedy evaluation of a checkpoint on a held-out manifest")
    p.add_argument("--checkpoint", required=True, help="an HF export (path or s3://)")
    p.add_argument("--manifest", required=True, help="a JSONL with task and answer fields")
    p.add_argument("--max-new-tokens", type=int, help="tokens per answer (default: evaluate's)")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "generate", help="LLaVA-Instruct data from captions + boxes via an OpenAI-compatible teacher"
    )
    # inputs
    p.add_argument(
        "--images", required=True, help="COCO instances JSON, or JSONL {id, image, captions, boxes}"
    )
    p.add_argument("--captions", help="COCO captions JSON (beside --images)")
    p.add_argument("--image-prefix", default="", help="prefix for COCO file names in the records")
    p.add_argument("--types", help="response types to generate, comma-separated; default: all three")
    p.add_argument("--prompt-pack", help="a YAML overriding the system prompts and seed examples")
    # the teacher
    p.add_argument(
        "--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )
    p.add_argument("--model", required=True, help="the teacher's model name")
    p.add_argument("--api-key-env", help="the environment variable holding the key")
    p.add_argument("--concurrency", type=int, help="requests in flight per actor")
    p.add_argument("--workers", type=int, help="actors")
    p.add_argument("--rate-limit", type=float, help="requests per second, all actors together")
    p.add_argument("--max-retries", type=int, help="retries on 429, 5xx and timeouts")
    p.add_argument("--timeout", type=float, help="seconds per request")
    p.add_argument("--seed", type=int, help="seed for question sampling and placement")
    # output
    p.add_argument(
        "--out", required=True, help="output URI: llava_instruct.jsonl, brief.jsonl, rejects.jsonl"
    )
    p.add_argument("--address", help="a Ray cluster address")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="the main job on the embedded default: curriculum, eval, serve, query")
    p.add_argument("--out", default="demo_out", help="working directory")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--seed", type=int, default=0, help="the training seed (run id demo, or demo-seedN)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.recipes import RecipeError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:  # a recipe, profile or stage that does not exist: one line, exit 2
        parser.exit(2, f"llava-ray {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
