"""cluster/ is data: every file loads, has its required fields, and names commands the CLI has."""

import glob
import os
import shlex

import pytest
import yaml

from pipelines.cli import build_parser

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")


def _commands(value):
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("command", "entrypoint"):
                yield v
            yield from _commands(v)
    elif isinstance(value, list):
        for v in value:
            yield from _commands(v)


def _parse(command: str):
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "pipelines.cli"]:
        argv = argv[3:]
    elif argv[0] == "llava-ray":
        argv = argv[1:]
    else:
        pytest.fail(f"expected a llava-ray command, found {command!r}")
    return build_parser().parse_args(argv)


FILES = sorted(glob.glob(os.path.join(ROOT, "**", "*.yaml"), recursive=True))


def test_every_kind_is_there():
    names = {os.path.relpath(f, ROOT) for f in FILES}
    assert {"local.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml", "aws/ray-up.yaml"} <= names
    assert {f"kuberay/rayjob-{s}.yaml" for s in ("stage1", "stage1_5", "stage2_si", "stage2_ov")} <= names


@pytest.mark.parametrize("path", FILES, ids=[os.path.relpath(f, ROOT) for f in FILES])
def test_loads_and_names_real_commands(path):
    with open(path) as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    for command in _commands(data):
        args = _parse(command)
        assert callable(args.func)


def test_raycluster_has_head_cpu_and_gpu_groups_with_autoscaling_and_auth():
    with open(os.path.join(ROOT, "kuberay", "raycluster.yaml")) as f:
        spec = yaml.safe_load(f)["spec"]
    assert spec["enableInTreeAutoscaling"] is True and "headGroupSpec" in spec
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-data", "gpu-train"}
    gpu = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "8"
    for group in [spec["headGroupSpec"], *groups.values()]:
        env = {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env


def test_rayjobs_run_each_stage_of_the_onevision_recipe():
    for stage in ("stage1", "stage1_5", "stage2_si", "stage2_ov"):
        with open(os.path.join(ROOT, "kuberay", f"rayjob-{stage}.yaml")) as f:
            job = yaml.safe_load(f)
        args = _parse(job["spec"]["entrypoint"])
        assert (args.name, args.recipe, args.profile) == (stage, "llava_onevision", "full")
        assert args.storage.startswith("s3://")


def test_ray_up_has_data_and_training_node_types():
    with open(os.path.join(ROOT, "aws", "ray-up.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert {"head", "cpu_data", "gpu_train"} <= set(cfg["available_node_types"])
    assert cfg["available_node_types"]["gpu_train"]["resources"]["GPU"] == 8


def test_runtime_env_carries_no_secrets():
    with open(os.path.join(ROOT, "runtime_env.yaml")) as f:
        env = yaml.safe_load(f)
    for key in env.get("env_vars", {}):
        for word in ("SECRET", "PASSWORD", "AUTH_TOKEN", "ACCESS_KEY", "API_KEY"):
            assert word not in key.upper(), key


def test_local_default_is_the_demo_run_and_its_serve_command():
    """cluster/local.yaml: its command is the run its fields describe (the recipe's tiny profile, the
    storage, the tracking store, the workers), and its serve command serves that run's last export."""
    from pipelines.recipes import load_recipe

    with open(os.path.join(ROOT, "local.yaml")) as f:
        cfg = yaml.safe_load(f)
    pipeline, run = cfg["pipeline"], _parse(cfg["pipeline"]["command"])
    assert (run.recipe, run.profile, run.storage, run.tracking_uri) == (
        pipeline["recipe"],
        pipeline["profile"],
        pipeline["storage"],
        pipeline["tracking_uri"],
    )
    recipe = load_recipe(run.recipe, run.profile)
    assert pipeline["workers"] == recipe.workers and cfg["ray"]["num_cpus"] == 2
    serve = _parse(cfg["serve"]["command"])
    assert serve.checkpoint == f"{run.storage}/{run.run_id}/{recipe.stages[-1].name}/hf"


def test_runtime_env_is_what_submit_sends():
    """cluster/runtime_env.yaml says pipelines/submit.py builds the same: the same excludes, and only
    environment variables that submit passes on (never a credential)."""
    from pipelines.submit import EXCLUDES, SAFE_ENV

    with open(os.path.join(ROOT, "runtime_env.yaml")) as f:
        env = yaml.safe_load(f)
    assert env["working_dir"] == "." and env["excludes"] == EXCLUDES
    assert set(env["env_vars"]) <= set(SAFE_ENV), set(env["env_vars"]) - set(SAFE_ENV)


def test_ray_up_starts_every_node_with_token_auth():
    with open(os.path.join(ROOT, "aws", "ray-up.yaml")) as f:
        cfg = yaml.safe_load(f)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), (key, starts)
