"""A stage submitted as a Ray job to a `ray start --head` cluster (token auth on, job server on
127.0.0.1)."""

import os
import subprocess
import sys
import time

import pytest

from components import storage
from pipelines.submit import AuthTokenMissing, auth_token_source
from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def test_missing_token_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "nope"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(AuthTokenMissing, match="RAY_AUTH_TOKEN_PATH"):
        auth_token_source()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(AuthTokenMissing, match="RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"):
        auth_token_source()


@pytest.fixture
def head(tmp_path):
    """`ray start --head --block` in its own process group, so that stopping it leaves any other Ray alone."""
    import signal
    import urllib.request

    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # every port explicit: another Ray (the tests' local one) may hold the defaults, e.g. the agent's 52365
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
             "ray-client-server-port")]  # fmt: skip
    proc = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", "--disable-usage-stats", *ports],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
            break
        except OSError as e:
            if getattr(e, "code", None) in (401, 403):  # up, and asking for the token
                break
            time.sleep(1)
    yield f"http://127.0.0.1:{dash}", env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # a head given SIGTERM took 30 s to go; its session is all in this group
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    marker = "/tmp/ray/ray_current_cluster"  # left behind by a killed head; later local Rays would try it
    if os.path.exists(marker) and open(marker).read().strip().endswith(f":{gcs}"):
        os.remove(marker)


def test_submit_a_stage_as_a_ray_job(demo_dir, head, tmp_path):
    """`llava-ray submit pretrain --recipe llava_v1_5` on a token-auth cluster: the job runs `llava-ray
    stage pretrain` there (preprocess, 2 steps on 2 Ray Train workers, export, eval) and exits 0 (the job
    SUCCEEDED, the submit command returns 0), and the stage's MLflow run ends FINISHED. One stage: what a
    job adds (the entrypoint, the token, the job's environment) is the same for one stage or many; the
    recipes' stages run through the DAG in tests/e2e/test_dag.py."""
    address, env = head
    root, _ = demo_dir
    runs, tracking = str(tmp_path / "runs"), str(tmp_path / "mlflow")
    cmd = [f"{BIN}/llava-ray", "submit", "pretrain", "--address", address, "--recipe", "llava_v1_5", "--profile",
           "tiny", "--storage", runs, "--run-id", "job", "--tracking-uri", tracking, "--demo-dir", str(root),
           "--max-steps", "2", "--python", sys.executable]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "submitted job" in out.stdout and "SUCCEEDED" in out.stdout
    assert storage.is_complete(os.path.join(runs, "job", "pretrain", "hf"))
    assert not os.path.exists(os.path.join(runs, "job", "finetune"))
    from mlflow.tracking import MlflowClient

    from components.tracking import TrackingConfig

    uri, _ = TrackingConfig(uri=tracking).resolved()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("llava-ray")
    runs_found = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in runs_found if r.data.tags.get("llava_ray.output_uri")} == {"pretrain"}
    assert all(r.info.status == "FINISHED" for r in runs_found)
