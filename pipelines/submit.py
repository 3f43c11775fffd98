"""Ray Jobs: submit a stage (or the whole pipeline) to any Ray cluster, follow its logs, return its status.

Auth stays on (Ray's token authentication): the client needs the cluster's token from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, and says which is missing.
The runtime_env carries the working directory, the dependencies and non-secret environment variables;
credentials never go into it (the cluster's own identity, e.g. an IAM role, provides them).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time

SAFE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE",
)
EXCLUDES = [
    ".venv",
    ".git",
    "demo_out",
    "runs",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
]


class AuthTokenMissing(RuntimeError):
    pass


def auth_token_source() -> str:
    """Where the Ray auth token comes from; raises AuthTokenMissing naming every place looked at."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if os.path.exists(path):
            return f"RAY_AUTH_TOKEN_PATH ({path})"
        raise AuthTokenMissing(f"RAY_AUTH_TOKEN_PATH: expected a token file, found nothing at {path}")
    default = os.path.expanduser("~/.ray/auth_token")
    if os.path.exists(default):
        return f"default token file ({default})"
    raise AuthTokenMissing(
        "Ray auth token: expected RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (the cluster's "
        "token), "
        "found none; copy the head node's ~/.ray/auth_token or set RAY_AUTH_TOKEN"
    )


def runtime_env(extra_env: dict | None = None, pip: list[str] | None = None) -> dict:
    env = {k: os.environ[k] for k in SAFE_ENV if os.environ.get(k)}
    env.update(extra_env or {})
    out = {"working_dir": ".", "excludes": EXCLUDES, "env_vars": env}
    if pip:
        out["pip"] = pip
    return out


def submit(
    address: str,
    args: list[str],
    *,
    python: str = "python",
    follow: bool = True,
    env: dict | None = None,
    pip: list[str] | None = None,
) -> int:
    """Submit ``python -m pipelines.cli ARGS`` as a Ray job; print its id and logs; return 0 on success."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    source = auth_token_source()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    client = JobSubmissionClient(address)
    entrypoint = " ".join(shlex.quote(a) for a in [python, "-m", "pipelines.cli", *args])
    deadline = time.monotonic() + 120
    while True:  # a fresh head's job agent takes a moment to register
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(env, pip))
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"submitted job {job_id} to {address} (auth token from {source})", flush=True)
    if follow:

        async def tail():
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)

        asyncio.run(tail())
    while (status := client.get_job_status(job_id)) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ):
        time.sleep(1)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1
