"""The rig leaves nothing behind: not after a failed start, not after an interrupt, not after a test run
that was SIGKILLed (the next rig sweeps what it left). Seconds: network and processes only, no Ray. These
rigs are owned by this process's parent (alive), so their names differ from the tier's own rig."""

import os
import subprocess
import time

import pytest

from tests.cluster import rig as rig_module
from tests.cluster.rig import Rig, sweep

pytestmark = pytest.mark.cluster
DEAD = 4_000_000  # above any pid_max here: a rig "owned" by a process that is gone


def _worker_process(rig: Rig, launched: bool = False) -> subprocess.Popen:
    """A long process inside the worker node's namespaces, as the worker node's raylet would be; returns
    once it is inside. ``launched``: started as the rig starts its worker node (it knows the launcher)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", rig.netns, "unshare", "--mount", "sleep", "600"], start_new_session=True
    )
    if launched:
        rig.procs["worker"] = proc
    deadline = time.monotonic() + 30
    while not rig_module._netns_pids(rig.netns) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig_module._netns_pids(rig.netns), "the process never entered the worker node's namespace"
    return proc


def test_a_failed_start_removes_what_it_made(tmp_path, monkeypatch):
    """The head cannot start (no `ray` binary): the namespace and link made before it are removed, and the
    error reaches the caller. (With stop() left out of __enter__'s failure path, the namespace stayed.)"""
    monkeypatch.setattr(rig_module, "BIN", str(tmp_path / "no-such-bin"))
    rig = Rig(tmp_path / "rig", with_services=False, owner=os.getppid())
    with pytest.raises(FileNotFoundError), rig:
        pass
    assert rig.leftovers() == []


def test_an_interrupt_removes_processes_namespace_and_link(tmp_path):
    """Ctrl-C with a process inside the worker node: stop() kills it and removes the namespace and link.
    (With stop() not killing the namespace's processes, the sleep outlived the rig: proc.wait timed out.)"""
    rig = Rig(tmp_path / "rig", with_services=False, owner=os.getppid())
    rig._network()
    proc = _worker_process(rig)
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                raise KeyboardInterrupt  # Ctrl-C while the rig is up
            finally:
                rig.stop()
        assert proc.wait(timeout=10) != 0
        assert rig.leftovers() == []
    finally:
        proc.kill()


def test_what_a_killed_run_left_is_swept_by_the_next(tmp_path):
    """A rig whose owner is gone (its test process SIGKILLed before any teardown): the next sweep removes
    its namespace, its link and the processes still inside; a live owner's rig is left alone."""
    orphan = Rig(tmp_path / "orphan", with_services=False, owner=DEAD)
    orphan._network()
    proc = _worker_process(orphan)
    mine = Rig(tmp_path / "mine", with_services=False, owner=os.getppid())  # a live owner
    mine._network()
    try:
        assert f"{orphan.netns}" in sweep()
        assert orphan.leftovers() == []
        assert proc.wait(timeout=10) != 0
        assert mine.leftovers() != [], "a live owner's rig must be kept"
    finally:
        proc.kill()
        mine.stop()
        orphan.stop()
    assert mine.leftovers() == []


def test_a_worker_node_still_starting_is_killed_too(tmp_path):
    """The node is lost (or the rig stopped) while its launcher has not entered the namespace yet: the
    launcher's group is killed too, so nothing enters afterwards and outlives the rig. (CI once saw a
    process enter after the only listing; with the group kill removed from kill_worker, the launcher here
    entered half a second later and proc.wait timed out.)"""
    rig = Rig(tmp_path / "rig", with_services=False, owner=os.getppid())
    rig._network()
    enter = f"sleep 0.5; exec ip netns exec {rig.netns} unshare --mount sleep 600"
    proc = subprocess.Popen(["sh", "-c", enter], start_new_session=True)
    rig.procs["worker"] = proc
    try:
        rig.kill_worker()
        assert proc.wait(timeout=5) != 0
        time.sleep(1)
        assert rig_module._netns_pids(rig.netns) == [], "a process entered the namespace after the kill"
    finally:
        proc.kill()
        rig.stop()
    assert rig.leftovers() == []


def test_no_port_is_handed_out_twice(tmp_path, monkeypatch):
    """The kernel gave two probes the same port (each probe's socket is closed at once): the rig hands out
    the next one instead, so no two of a node's components get one port (Ray refuses such a node).
    Guards: the rig's record of the ports it gave; fails with ``port`` returning the probe's answer."""
    answers = iter([40001, 40001, 40002, 40001, 40003])
    monkeypatch.setattr(rig_module, "free_port", lambda host: next(answers))
    rig = Rig(tmp_path / "rig", with_services=False, owner=os.getppid())
    assert [rig.port(rig.head_ip) for _ in range(3)] == [40001, 40002, 40003]
