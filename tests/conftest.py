import logging
import os
import socket
import subprocess

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Data's usage poller queries a Prometheus that tests never run, every 10 s, in a daemon thread; its debug
# record of each failure outlived pytest's log capture and printed a logging traceback at the end of a session
logging.getLogger("ray.data._internal.usage").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from components.demo_data import DemoConfig, make_demo_data

    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(
        captions=8, details=4, single_image=16, multi_image=4, multi_view=4, videos=4, text=4, eval_per_kind=4
    )
    manifests = make_demo_data(str(out), cfg)
    return out, manifests


@pytest.fixture(scope="session")
def tiny_model():
    from components.model import ModelSpec, build_model

    spec = ModelSpec()
    model, processor = build_model(spec)
    return spec, model, processor


def make_h264(path, size: str, rate: int, seconds: int = 3) -> None:
    """A real H.264 clip of ffmpeg's test pattern at ``path`` (``size`` as "WxH"), made with
    imageio-ffmpeg's ffmpeg."""
    import imageio_ffmpeg

    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"testsrc=size={size}:rate={rate}:duration={seconds}",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        check=True,
    )


@pytest.fixture(scope="session")
def h264(tmp_path_factory):
    """A real H.264 clip: 3 s at 10 fps, 64x48."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    make_h264(path, "64x48", rate=10)
    return path


def random_image(rng: np.random.Generator, height: int, width: int, mode: str = "RGB"):
    from PIL import Image

    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


TEST_API_KEY = "test-key-not-a-secret"

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server over HTTP on loopback; env set so that boto3, pyarrow and Ray workers see
    it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="llava")
    return "s3://llava"


def _ray_state() -> dict:
    """What a test can leave behind in the shared local Ray: placement groups and Serve apps."""
    import ray
    from ray.util import placement_group_table

    groups = {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}
    actors = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}
    apps = set()
    if any(ns == "serve" for ns, _ in actors):
        from ray import serve

        apps = set(serve.status().applications)
    return {"groups": groups, "actors": actors, "apps": apps}


@pytest.fixture(autouse=True)
def ray_leftovers():
    """After each test that ran on the shared local Ray: what it created and left (a killed Ray Train run's
    placement group, a Serve app) is removed, so the next test gets its CPUs instead of waiting for ever.
    What module and session fixtures set up before the test is kept. (Ray Train's controller is an unnamed
    actor owned by the test's process: it goes when the failed fit's references do.)"""
    import ray

    if not ray.is_initialized():
        yield
        return
    before = _ray_state()
    yield
    if not ray.is_initialized():
        return
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    after = _ray_state()
    serving = any(ns == "serve" for ns, _ in before["actors"])
    if after["apps"] - before["apps"]:
        from ray import serve

        if not serving:  # the test started Serve: stop it (the next one may start it on another port)
            serve.shutdown()
        for app in after["apps"] - before["apps"] if serving else ():
            serve.delete(app)
    for group in after["groups"] - before["groups"]:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A local Ray cluster with 2 CPUs, started once; workers inherit the S3 endpoint settings."""
    import ray

    env = {k: os.environ[k] for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # Ray Train's controller polls its workers 10x as often
    env["LLAVA_RAY_TEST_API_KEY"] = TEST_API_KEY  # only the secured test app reads it
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def upload_tree(local_dir, uri):
    from components import storage

    storage.upload_dir(str(local_dir), uri, manifest=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process (sqlite backend, proxied artifacts) over HTTP on 127.0.0.1."""
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
