"""Real parts for the pipeline tier: an S3 endpoint (moto's standalone server on 127.0.0.1) and a local Ray."""

import os
import socket

import pytest

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
    """moto's standalone S3 server over HTTP on loopback; env set so that boto3, pyarrow and Ray workers see it."""
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


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A local Ray cluster with 2 CPUs, started once; workers inherit the S3 endpoint settings."""
    import ray

    env = {k: os.environ[k] for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def upload_tree(local_dir, uri):
    from components import storage

    storage.upload_dir(str(local_dir), uri, manifest=False)
