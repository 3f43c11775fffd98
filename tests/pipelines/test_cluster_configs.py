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
