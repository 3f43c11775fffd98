"""Ray's private APIs that llava-ray relies on, all here, each with the Ray version it was read from
(the version pinned in pyproject.toml): an upgrade has one place to look."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import ray
import ray.train
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend  # private (Ray 2.60.0: ray/train/torch/config.py)

log = logging.getLogger(__name__)


def torch_config_binding(bind: Callable[[], object], backend: str) -> TorchConfig:
    """Ray Train's TorchConfig whose backend runs ``bind`` on every worker before the process group
    forms. Ray 2.60.0: ``TorchConfig.backend_cls`` names the backend and ``_TorchBackend.on_start``
    forms the group; there is no public hook before it."""

    class BindingBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            worker_group.execute(bind)
            super().on_start(worker_group, backend_config)

    class BindingTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return BindingBackend

    return BindingTorchConfig(backend=backend)


def wait_until_registered(step: int, timeout_s: float = 60.0) -> None:
    """In a Ray Train worker, wait until the controller has registered the checkpoint reported at
    ``step``. A worker's report only queues it: the controller takes it when it next polls the workers
    (every 2 s), then writes its snapshot to storage; a node lost in between loses that checkpoint too.
    Ray 2.60.0: ``StorageContext.checkpoint_manager_snapshot_path``, a JSON file whose
    ``latest_checkpoint_result.metrics`` is the report's. Returns at once outside Ray Train."""
    try:
        run_storage = ray.train.get_context().get_storage()
    except Exception:  # not a Ray Train worker
        return
    fs, path = run_storage.storage_filesystem, run_storage.checkpoint_manager_snapshot_path
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with fs.open_input_stream(path) as f:
                latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("step") == step:
                return
        except (FileNotFoundError, OSError, ValueError):
            pass  # not written yet
        time.sleep(0.5)
    raise TimeoutError(f"Ray Train did not register the step-{step} checkpoint within {timeout_s:.0f} s")


def draining_nodes() -> dict[str, int]:
    """{node id: deadline in epoch ms (0: none given)} of the nodes being drained (``ray drain-node``, a
    cloud's reclaim). A draining node stays alive in ``ray.nodes()`` until it goes, so anything counting
    room for training workers must leave it out. Ray 2.60.0: ``GlobalState.get_draining_nodes``."""
    from ray._private.state import state

    return dict(state.get_draining_nodes())


def free_resources_per_node() -> dict[str, dict[str, float]]:
    """{node id: its free resources} of the live nodes. Ray 2.60.0:
    ``ray._private.state.available_resources_per_node``."""
    from ray._private.state import available_resources_per_node

    return available_resources_per_node()


def refresh_train_view() -> None:
    """Make Ray Train's elastic policy see the cluster's nodes as they are now. It reads them through Ray
    Data's autoscaling coordinator, which looks every 20 s: a lost node's slots are then offered for up to
    20 s more (Ray Train starts the old size, and waits out its start timeout), and a new node is offered
    up to 20 s late (a group grows late). Ray 2.60.0: the detached actor ``AutoscalingCoordinator``,
    ``get_reserved_resources(requester_id, recompute=True)`` looks again at once. A failure only leaves
    Ray Train to look at its own pace."""
    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:  # none yet: the first one looks at the nodes when it starts
        return
    try:
        ray.get(coordinator.get_reserved_resources.remote("llava-ray", recompute=True), timeout=10)
    except Exception as e:  # a view refreshed late is Ray Train's own behaviour, not an error
        log.warning("could not refresh Ray Train's view of the cluster: %s", e)
