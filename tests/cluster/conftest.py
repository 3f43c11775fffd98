"""The cluster tier: a real two-node Ray cluster (tests/cluster/rig.py), run as its own pytest process
(`make cluster-test`), because a process holds one Ray connection and the other tiers use a local Ray.

Ray reads its auth mode when it is imported, so the token is set here, before anything imports Ray."""

import os
import secrets
import shutil

import pytest

TOKEN = secrets.token_hex(24)
REPORT: list[str] = []
"""Where each train rank, Ray Data task and Serve replica ran, and the measured figures: printed at the end
of the tier (`make test` shows them; the captured output of a passing test is not)."""
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
os.environ.pop("RAY_ADDRESS", None)


def report(line: str) -> None:
    REPORT.append(line)
    print(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if REPORT:
        terminalreporter.section("cluster tier: placements and figures")
        for line in REPORT:
            terminalreporter.write_line(line)


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns, unshare -m)"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"needs {tool}"
    return None


@pytest.fixture(scope="session")
def rig(tmp_path_factory):
    """The two nodes, S3 and MLflow, started once for the tier; this process connected as a driver on the
    head. Torn down on success, failure and interrupt, and checked: nothing of it may be left."""
    why = _can_make_namespaces()
    if why:
        pytest.fail(f"the cluster tier {why}")  # never a silent skip: CI runs as root
    from tests.cluster.rig import Rig

    rig = Rig(tmp_path_factory.mktemp("rig"), token=TOKEN)
    with rig:
        for key in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_REGION",
            "AWS_ENDPOINT_URL",
            "TOKENIZERS_PARALLELISM",
            "HF_HUB_OFFLINE",
        ):
            os.environ[key] = rig.env()[key]
        import ray

        ray.init(address=rig.address, _node_ip_address=rig.head_ip, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield rig
        finally:
            try:
                from ray import serve

                serve.shutdown()
            finally:
                ray.shutdown()
    left = rig.leftovers()
    assert not left, f"the rig left {left}"
