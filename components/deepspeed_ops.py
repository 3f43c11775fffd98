"""DeepSpeed's JIT-built ops, built before a stage needs them, under a lock that dies with its holder.

torch builds a JIT extension under a "baton": a file named ``lock`` that it creates (O_EXCL) in the op's
build directory, holds open while it builds, and removes when it is done. A process killed mid-build
(preempted, OOM-killed, timed out) leaves that file behind, and every later build or load of the op on
that node then waits on it for ever, with no message (``FileBaton.wait``): on the CPU, DeepSpeed loads
its shared-memory communication op (``deepspeed_shm_comm``) in every ``deepspeed.initialize``.

``ensure_ops`` runs first in every worker: it takes an ``flock`` beside the build directories (the kernel
releases it when its holder dies, however it dies), removes a baton that no live process holds open
(``stale_baton``), and loads the op, building it if needed, while it holds the lock. Whoever comes next
finds the op built; DeepSpeed's own load later in the same process reuses the loaded module.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 900.0
"""How long a worker waits for another process on its node to finish building the op."""


class OpBuildTimeout(RuntimeError):
    """Another process on the node held the build lock for longer than the bound."""


def holders(path: str) -> list[int]:
    """Process ids (in this PID namespace) that hold ``path`` open, read from /proc/<pid>/fd."""
    target, found = os.path.realpath(path), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            if any(os.path.realpath(os.path.join(fd_dir, fd)) == target for fd in os.listdir(fd_dir)):
                found.append(int(pid))
        except OSError:  # the process ended, or is not ours to read
            continue
    return found


def stale_baton(path: str) -> bool:
    """A torch build baton that exists but that no live process holds open: its builder died."""
    return os.path.exists(path) and not holders(path)


def _op_builder():
    """DeepSpeed's shared-memory comm op builder where the accelerator uses one (the CPU), else None."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def build_directory(name: str) -> str:
    """Where torch JIT-builds extension ``name`` (TORCH_EXTENSIONS_DIR, or its per-Python/accelerator
    folder under ~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import _get_build_directory  # torch's own rule; there is no public one

    return _get_build_directory(name, verbose=False)


def ensure_ops(timeout_s: float = BUILD_TIMEOUT_S, on_wait=None) -> str | None:
    """Load (building once per node) the DeepSpeed op that ``deepspeed.initialize`` will load, clearing a
    stale baton first; returns the op's build directory, or None where DeepSpeed needs no JIT op (GPU).
    Raises OpBuildTimeout, naming the lock and its holders, after ``timeout_s`` of waiting for another
    live builder. ``on_wait(message)`` is told when this process starts waiting."""
    builder = _op_builder()
    if builder is None:
        return None
    directory = build_directory(builder.name)
    lock_path = os.path.join(os.path.dirname(directory), f".{builder.name}.llava-ray.flock")
    deadline = time.monotonic() + timeout_s
    with open(lock_path, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if on_wait:
                    on_wait(f"waiting for the build lock {lock_path}")
                    on_wait = None
                if time.monotonic() > deadline:
                    raise OpBuildTimeout(
                        f"DeepSpeed op {builder.name}: expected the build lock {lock_path} within "
                        f"{timeout_s:.0f} s, found it held by process(es) {holders(lock_path)} on this node"
                    ) from None
                time.sleep(0.2)
        try:
            baton = os.path.join(directory, "lock")
            if stale_baton(baton):
                log.warning("removing a stale build lock left by a killed build: %s", baton)
                os.remove(baton)
            builder.load(verbose=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return directory
