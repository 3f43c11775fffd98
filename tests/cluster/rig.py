"""A real two-node Ray cluster on one machine, with no shared disk between its nodes.

The head runs in this machine's network namespace, bound to one end of a veth pair; the worker node runs in
a network namespace of its own (the other end, a private /30) and a mount namespace where /tmp, $HOME and
the project's run directories are empty tmpfs. What a real node's image would have stays visible to it: the
project's code and venv, the Python install, DeepSpeed's prebuilt op (copied into its private home). What a
real node would not have is hidden: the head's Ray session, its temp files, the tests' directories, its MLflow
store. Beside the head, on its veth address: moto's S3 server and a real ``mlflow server`` (backend store on
the head's disk, artifacts proxied by the server). Traffic goes only to the two veth addresses and loopback.

``Rig.stop`` removes everything it made (processes, the namespace, the link, its staging directory), on
success, failure and interrupt; ``leftovers`` lists what is still there, and ``sweep`` removes what a rig of
a killed process left. Needs root, ``ip`` (iproute2) and ``unshare`` (util-linux).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "llr"
BIN = os.path.dirname(sys.executable)
PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_DIRS = ("runs", "demo_out")
"""The project's own run directories: a node other than the head starts with them empty."""
NODE_CPUS = 2
"""Logical CPUs per node, whatever the real cores."""
TRAIN_SLOT = "train_slot"
"""A custom resource, one per node, that stands in for a node's GPU: a stage that asks for it per worker
cannot pack a lost node's worker onto the survivors."""

# The worker node's private view: binds of what the image has, then tmpfs over /tmp and $HOME, then the binds
# put back; DeepSpeed's op cache copied (writable, private); the project's run directories emptied.
WORKER_SHELL = r"""
set -eu
stage=$1; home=$2; ext=$3; shift 3
n=0
for keep in $KEEP; do mkdir -p "$stage/$n"; mount --bind "$keep" "$stage/$n"; n=$((n+1)); done
mount -t tmpfs -o size=8g tmpfs /tmp
mount -t tmpfs tmpfs "$home"
n=0
for keep in $KEEP; do mkdir -p "$keep"; mount --bind "$stage/$n" "$keep"; n=$((n+1)); done
if [ -d "$stage/ext" ]; then mkdir -p "$(dirname "$ext")"; cp -a "$stage/ext" "$ext"; fi
for d in $HIDE; do if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d"; fi; done
exec "$@"
"""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(netns: str) -> list[int]:
    out = _run("ip", "netns", "pids", netns, check=False)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def _kill_group(pid: int, grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sweep() -> list[str]:
    """Remove what rigs of processes that are gone left behind (a SIGKILLed test run); returns their names."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX + "-"):
            continue
        owner = int(name.split("-")[1]) if name.split("-")[1].isdigit() else 0
        if owner and _alive(owner):
            continue  # another live rig's
        for pid in _netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _run("ip", "netns", "del", name, check=False)
        _run("ip", "link", "del", f"{PREFIX}{owner}h", check=False)
        shutil.rmtree(f"/run/{name}", ignore_errors=True)
        removed.append(name)
    return removed


@dataclass
class Rig:
    """Two Ray nodes (head + worker), S3 and MLflow over the veth pair. Use as a context manager."""

    root: Path
    """The head's directory: its Ray temp dir, the MLflow store, the logs."""
    with_services: bool = True
    """moto's S3 server and an mlflow server beside the head (off: the network and nodes only)."""
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    """Ray's auth token, given to every node and client through the environment."""
    owner: int = field(default_factory=os.getpid)
    procs: dict = field(default_factory=dict)
    ports: set = field(default_factory=set)
    """Every port this rig has handed out (``port``)."""

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.netns = f"{PREFIX}-{self.owner}"
        self.link = f"{PREFIX}{self.owner}h"
        self.peer = f"{PREFIX}{self.owner}w"
        self.staging = Path(f"/run/{self.netns}")
        subnet = self.owner % 16000  # a /30 of 10.200.0.0/16 per owner: 4 addresses each
        base = f"10.{200 + subnet // 16000}.{(subnet * 4) // 256}.{(subnet * 4) % 256}"
        a, b, c, d = (int(x) for x in base.split("."))
        self.head_ip, self.worker_ip = f"{a}.{b}.{c}.{d + 1}", f"{a}.{b}.{c}.{d + 2}"
        self.gcs_port = self.dashboard_port = self.s3_port = self.mlflow_port = 0

    # ---- addresses ---------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    @property
    def s3(self) -> str:
        return f"http://{self.head_ip}:{self.s3_port}"

    @property
    def mlflow(self) -> str:
        return f"http://{self.head_ip}:{self.mlflow_port}"

    def port(self, host: str) -> int:
        """A free port on ``host`` that this rig has not handed out before: each probe's socket is closed
        at once, so the kernel may give the same port to two probes, and Ray refuses a node whose
        components were given one port twice."""
        while (port := free_port(host)) in self.ports:
            pass
        self.ports.add(port)
        return port

    def free_head_port(self) -> int:
        return self.port(self.head_ip)

    def env(self) -> dict:
        """What every process of the cluster and its clients get: the token, the S3 endpoint (credentials
        through the environment, as a real cluster's identity would give them), no Ray address of another."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=self.s3,
            NO_PROXY="*",
            no_proxy="*",
            # a lost node is declared dead in about 6 s rather than 30 (Ray's health check); not less: on
            # two busy cores a live raylet has missed 2 s of checks and been declared dead
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="6",
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
            # Ray Train's view of free resources lags a lost node: it first tries the old size and gives up
            # after this (60 s by default) before it starts the size that fits
            RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10",
        )
        return env

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> Rig:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        sweep()
        self.root.mkdir(parents=True, exist_ok=True)
        self._network()
        if self.with_services:  # every process started first, then each waited for: ~15 s less
            self._s3()
            self._mlflow()
        self._head()
        if self.with_services:
            self._wait_http("s3", self.s3)
            import boto3

            boto3.client("s3", endpoint_url=self.s3, **self._credentials()).create_bucket(Bucket="llava")
            self._wait_http("mlflow", f"{self.mlflow}/health")
        self._wait_http("head", f"{self.dashboard}/api/version")
        self.start_worker()

    def _network(self) -> None:
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.link, "type", "veth", "peer", "name", self.peer)
        _run("ip", "link", "set", self.peer, "netns", self.netns)
        _run("ip", "addr", "add", f"{self.head_ip}/30", "dev", self.link)
        _run("ip", "link", "set", self.link, "up")
        inside = ("ip", "netns", "exec", self.netns)
        _run(*inside, "ip", "addr", "add", f"{self.worker_ip}/30", "dev", self.peer)
        _run(*inside, "ip", "link", "set", self.peer, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(
            cmd,
            env=env or self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def _wait_http(self, name: str, url: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"rig: {name} exited ({proc.returncode}): {self.log_tail(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # up, and asking for the token
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(
            f"rig: {name} not answering at {url} after {timeout_s:.0f} s: {self.log_tail(name)}"
        )

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def _s3(self) -> None:
        self.s3_port = self.port(self.head_ip)
        code = (
            "import sys, time; from moto.server import ThreadedMotoServer as S; "
            "S(ip_address=sys.argv[1], port=int(sys.argv[2]), verbose=False).start(); time.sleep(1e9)"
        )
        self._spawn("s3", [sys.executable, "-c", code, self.head_ip, str(self.s3_port)])

    @staticmethod
    def _credentials() -> dict:
        return {
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }

    def _mlflow(self) -> None:
        self.mlflow_port = self.port(self.head_ip)
        store = self.root / "mlflow"
        store.mkdir(exist_ok=True)
        self._spawn(
            "mlflow",
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                self.head_ip,
                "--port",
                str(self.mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{store}/mlflow.db",
                "--artifacts-destination",
                str(store / "artifacts"),
                "--workers",
                "1",
                "--allowed-hosts",
                f"{self.head_ip}:{self.mlflow_port},{self.head_ip}",
            ],
        )

    def _ray_ports(self, host: str) -> list[str]:
        names = (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
        return [f"--{name}={self.port(host)}" for name in names]

    def _head(self) -> None:
        self.gcs_port, self.dashboard_port = self.port(self.head_ip), self.port(self.head_ip)
        self._spawn(
            "head",
            [
                f"{BIN}/ray",
                "start",
                "--head",
                "--block",
                f"--node-ip-address={self.head_ip}",
                f"--port={self.gcs_port}",
                f"--num-cpus={NODE_CPUS}",
                f"--resources={json.dumps({TRAIN_SLOT: 1})}",
                "--include-dashboard=true",
                f"--dashboard-host={self.head_ip}",
                f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.root / 'ray'}",
                "--object-store-memory=400000000",
                "--disable-usage-stats",
                *self._ray_ports(self.head_ip),
            ],
        )

    def start_worker(self, wait: bool = True) -> None:
        """The worker node (again, after ``kill_worker``): `ray start --address` inside the namespaces;
        ``wait``: until the cluster has both nodes (else ``wait_nodes(2)`` later)."""
        home = os.path.expanduser("~")
        ext = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(home, ".cache", "torch_extensions")
        keep = [PROJECT, os.path.realpath(sys.base_prefix)]
        self.staging.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(ext):
            (self.staging / "ext").mkdir(exist_ok=True)
            keep_ext = ["mount", "--bind", ext, str(self.staging / "ext")]
        else:
            keep_ext = ["true"]
        env = {
            **self.env(),
            "KEEP": " ".join(keep),
            "HIDE": " ".join(os.path.join(PROJECT, d) for d in RUN_DIRS),
        }
        ray = [
            f"{BIN}/ray",
            "start",
            "--block",
            f"--address={self.address}",
            f"--node-ip-address={self.worker_ip}",
            f"--num-cpus={NODE_CPUS}",
            f"--resources={json.dumps({TRAIN_SLOT: 1})}",
            "--object-store-memory=400000000",
            "--disable-usage-stats",
        ]
        # the op cache is bound (read-only use) before /tmp and $HOME are hidden, then copied into the new
        # home
        script = f"{' '.join(keep_ext)}; {WORKER_SHELL}"
        cmd = [
            "ip",
            "netns",
            "exec",
            self.netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "worker-node",
            str(self.staging),
            home,
            os.path.join(home, ".cache", "torch_extensions"),
            *ray,
        ]
        self._spawn("worker", cmd, env)
        if wait:
            self.wait_nodes(2)

    def drain(self, node_id: str, deadline_s: int) -> None:
        """``ray drain-node --reason PREEMPTION`` with a deadline, as a cloud's spot reclaim notice does
        (the node is not killed: the caller does that at the deadline)."""
        _run(
            f"{BIN}/ray",
            "drain-node",
            f"--address={self.address}",
            f"--node-id={node_id}",
            "--reason=DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message=spot reclaim (test)",
            f"--deadline-remaining-seconds={deadline_s}",
        )

    def nodes(self) -> list[dict]:
        """The cluster's alive nodes, from the dashboard's API (no Ray client needed)."""
        request = urllib.request.Request(
            f"{self.dashboard}/nodes?view=summary", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            summary = json.load(r)["data"]["summary"]
        return [n["raylet"] for n in summary if n["raylet"].get("state") == "ALIVE"]

    def wait_nodes(self, count: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        found: list[dict] = []
        while time.monotonic() < deadline:
            for name in ("head", "worker"):
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None and not (name == "worker" and count < 2):
                    raise RuntimeError(f"rig: {name} exited ({proc.returncode}): {self.log_tail(name)}")
            with contextlib.suppress(OSError, KeyError, ValueError):
                found = self.nodes()
                if len(found) == count:
                    return found
            time.sleep(0.5)
        raise RuntimeError(
            f"rig: expected {count} alive nodes, found {len(found)}: {self.log_tail('worker')}"
        )

    def kill_worker(self) -> list[int]:
        """Every process of the worker node, its raylet included, SIGKILLed at once (a node lost).

        The namespace is listed again until it is empty, and every listing is killed: a process that
        entered after the first listing (an `ip netns exec` still starting) is killed too, instead of being
        waited for. (With one listing, such a process outlived the rig: CI saw it once.)"""
        proc = self.procs.pop("worker", None)
        found = _netns_pids(self.netns)
        if proc is not None:  # the launcher's group too: nothing of it enters the namespace afterwards
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        pids: list[int] = []
        deadline = time.monotonic() + 30
        while found and time.monotonic() < deadline:
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pids += [p for p in found if p not in pids]
            time.sleep(0.1)
            found = _netns_pids(self.netns)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        return pids

    def stop(self) -> None:
        """Everything this rig made, gone: the worker node's processes, the head's and the services' process
        groups, the namespace, the link, the staging directory, the head's Ray marker."""
        self.kill_worker()
        for name in ("head", "mlflow", "s3"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _kill_group(
                    proc.pid, grace_s=0
                )  # test services: nothing to save; SIGTERM'd heads took 5-30 s
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
        _run("ip", "netns", "del", self.netns, check=False)
        _run("ip", "link", "del", self.link, check=False)
        if self.staging.exists():
            for sub in self.staging.iterdir():  # binds lived in the worker's mount namespace only
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                self.staging.rmdir()
        marker = "/tmp/ray/ray_current_cluster"
        with contextlib.suppress(OSError):
            if open(marker).read().strip().endswith(f":{self.gcs_port}"):
                os.remove(marker)

    def leftovers(self) -> list[str]:
        """What of this rig is still there (empty after ``stop``)."""
        found = []
        if self.netns in _run("ip", "netns", "list", check=False).stdout.split():
            found.append(f"network namespace {self.netns}")
        if _run("ip", "link", "show", self.link, check=False).returncode == 0:
            found.append(f"link {self.link}")
        if self.staging.exists():
            found.append(f"directory {self.staging}")
        for pid in _netns_pids(self.netns):
            found.append(f"worker-node process {pid}")
        ps = _run("ps", "-eo", "pid=,args=", check=False).stdout.splitlines()
        marks = [
            m
            for m in (f"--port={self.gcs_port}", f"--address={self.address}", str(self.root / "ray"))
            if self.gcs_port
        ]
        marks += [f"{self.head_ip} {self.s3_port}"] if self.s3_port else []
        marks += [f"--port {self.mlflow_port}"] if self.mlflow_port else []
        for line in ps:
            if any(m in line for m in marks) and "ps -eo" not in line:
                found.append(f"process {line.strip()[:120]}")
        return found
