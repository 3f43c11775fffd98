"""A stage never hangs silently: a build lock left by a killed DeepSpeed op build is cleared before any
stage uses the op, and a worker that makes no progress for ``stall_timeout_s`` ends the stage with an error
naming what each worker was doing last."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from components.deepspeed_ops import build_directory, ensure_ops, holders, stale_baton
from components.model import build_model
from pipelines.layout import RunLayout
from pipelines.preprocess import PreprocessConfig, preprocess
from pipelines.recipes import load_recipe, step_config
from pipelines.train.stage import train_stage
from pipelines.train.watchdog import StageStalled
from tests.faults import HangOnce

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_baton_is_stale_only_when_no_live_process_holds_it(tmp_path):
    """torch's baton is held open by its builder while it builds: held means live, not held means stale."""
    baton = tmp_path / "lock"
    fd = os.open(baton, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton.try_acquire does
    try:
        assert holders(str(baton)) == [os.getpid()] and not stale_baton(str(baton))
    finally:
        os.close(fd)  # the builder is gone: the file stays, as after a killed build
    assert holders(str(baton)) == [] and stale_baton(str(baton))
    assert not stale_baton(str(tmp_path / "absent"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stage_starts_despite_the_lock_a_killed_op_build_left(demo_dir, tmp_path):
    """The lock file a killed build leaves (torch's baton, ``lock`` in the op's build directory) is planted
    in a copy of the extensions cache; then ``llava-ray stage --local`` runs a real stage in a fresh
    process (DeepSpeed loads its op there, not in this test's process, where it is loaded already). The
    stage starts, trains and exports, and the stale lock is gone.
    Guards: ensure_ops clears a dead holder's lock; fails with it leaving the baton alone."""
    root, _ = demo_dir
    extensions = tmp_path / "torch_extensions"
    shared = build_directory("deepspeed_shm_comm")  # this machine's built op (~90 s to build from nothing)
    op_dir = extensions / "deepspeed_shm_comm"
    if os.path.isdir(shared):
        shutil.copytree(shared, op_dir, ignore=shutil.ignore_patterns("lock"))
    op_dir.mkdir(parents=True, exist_ok=True)
    (op_dir / "lock").touch()  # what a build killed mid-way leaves behind
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    cmd = [
        f"{BIN}/llava-ray",
        "stage",
        "stage1",
        "--recipe",
        "llava_onevision",
        "--profile",
        "tiny",
        "--local",
        "--storage",
        str(tmp_path / "runs"),
        "--run-id",
        "r",
        "--demo-dir",
        str(root),
        "--max-steps",
        "1",
    ]
    start = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (op_dir / "lock").exists()
    assert (tmp_path / "runs" / "r" / "stage1" / "hf" / "MANIFEST.json").exists()
    print(f"stage with a stale lock: {time.monotonic() - start:.0f} s")


def _tiny_stage(demo_dir, tmp_path, workers: int, **over):
    root, manifests = demo_dir
    recipe = load_recipe("llava_onevision", "tiny", demo_dir=str(root))
    recipe = dataclasses.replace(
        recipe, workers=workers, eval=dataclasses.replace(recipe.eval, manifest=None)
    )
    stage = dataclasses.replace(
        recipe.stage("stage1"),
        data={"datasets": [{"json_path": manifests["stage1_captions"]}]},
        micro_batch=1,
        global_batch=workers,
        max_steps=3,
        checkpoint_every=3,
        **over,
    )
    layout = RunLayout(tmp_path, "r").stage(stage.name)
    config = PreprocessConfig(
        manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)
    )
    preprocess(config, layout, local=True)
    return recipe, stage, layout


@pytest.mark.timeout(300)
def test_a_hung_rank_ends_a_local_stage_naming_its_phase(demo_dir, tmp_path):
    """One rank in this process (``local``): a step hook that hangs for 60 s after step 1 ends the stage
    within about stall_timeout_s (10 s, once the process has imported its libraries and loaded the op),
    with StageStalled naming the rank, the phase and the wait.
    Guards: the watchdog; fails with its thread not started."""
    recipe, stage, layout = _tiny_stage(demo_dir, tmp_path, workers=1, stall_timeout_s=10.0)
    ensure_ops()  # this process's cold imports and op load (4-30 s here) before the 10 s bound applies
    build_model(recipe.model)
    start = time.monotonic()
    with pytest.raises(StageStalled) as error:
        train_stage(recipe, stage, layout, init_from=None, local=True, step_hooks=(HangOnce(1, 0, 60.0),))
    assert time.monotonic() - start < 45
    assert re.fullmatch(
        r"stage stage1: rank 0: no progress for 1[0-2] s in 'step hooks after step 1'", str(error.value)
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_worker_ends_a_ray_train_stage_naming_every_workers_phase(demo_dir, ray_local, tmp_path):
    """Two Ray Train workers; rank 0 hangs for 120 s after step 1 (a step hook) while rank 1 goes on into
    step 2 and waits for it in the gradients' all-reduce. Each worker's watchdog (stall_timeout_s = 45 s:
    every set-up phase, two workers' cold imports and op load on 2 cores included, must fit in it)
    ends its process; the driver raises StageStalled naming both ranks' last phases, within a bounded
    time instead of waiting for ever.
    Guards: the watchdog and the board; fails with the watchdog thread not started."""
    recipe, stage, layout = _tiny_stage(demo_dir, tmp_path, workers=2, stall_timeout_s=45.0)
    start = time.monotonic()
    with pytest.raises(StageStalled) as error:
        train_stage(
            recipe, stage, layout, init_from=None, max_failures=0, step_hooks=(HangOnce(1, 0, 120.0),)
        )
    assert time.monotonic() - start < 120
    message = str(error.value)
    assert message.startswith(
        "stage stage1: expected every worker to make progress within stall_timeout_s=45 s"
    )
    assert "rank 0: 'step hooks after step 1'" in message and "rank 1: 'step 2'" in message, message
