"""The watchdog: a stage never hangs silently. Each rank says what it is doing (a phase) and since when;
one phase that lasts longer than ``stall_timeout_s`` ends the stage with ``StageStalled``, naming what
every worker was doing last. Under Ray, the ranks' phases go to one ``ProgressBoard`` actor on the
driver's node (pipelines/train/on_ray.py), which the driver reads when the stage fails."""

from __future__ import annotations

import signal
import threading
import time

STALL_EXIT = 75
"""A worker's exit status when its watchdog ended it (EX_TEMPFAIL)."""


class StageStalled(Exception):
    """A stage's workers made no progress for ``stall_timeout_s``; the message names what each was doing."""


class ProgressBoard:
    """Every rank's last phase and when it began, and the stalls its watchdogs reported: one Ray actor per
    stage attempt (``num_cpus=0``), so that the driver can name what each worker was doing when a stage
    stalled, whichever node it ran on."""

    def __init__(self):
        self.last: dict[int, tuple[str, float]] = {}
        self.stalls: dict[int, str] = {}
        self.placed: list[dict] = []
        self.last_progress: dict | None = None

    def place(self, rank: int, node_id: str, node_ip: str, at: float) -> None:
        """Where a rank's worker runs: recorded by each rank of each attempt, in the stage's record."""
        self.placed.append({"rank": rank, "node_id": node_id, "node_ip": node_ip, "time": round(at, 3)})

    def placements(self) -> list[dict]:
        return self.placed

    def progress(self, record: dict) -> None:
        """Rank 0's progress record of its last step (the driver's console shows it)."""
        self.last_progress = record

    def latest(self) -> dict | None:
        return self.last_progress

    def note(self, rank: int, phase: str, at: float) -> None:
        self.last[rank] = (phase, at)

    def stalled(self, rank: int, message: str) -> None:
        self.stalls[rank] = message

    def read(self) -> tuple[dict, dict]:
        return self.last, self.stalls


def stall_message(stage: str, timeout_s: float, last: dict, stalls: dict, now: float) -> str:
    ranks = "; ".join(
        f"rank {rank}: {phase!r} for {now - at:.0f} s" + (" (its watchdog fired)" if rank in stalls else "")
        for rank, (phase, at) in sorted(last.items())
    )
    return (
        f"stage {stage}: expected every worker to make progress within stall_timeout_s={timeout_s:g} s, "
        f"found none for that long; last phase per worker: {ranks or 'none reported'}"
    )


class Watchdog:
    """What this rank is doing now (``phase``) and since when. A daemon thread acts when one phase lasts
    longer than ``timeout_s`` (a stale build lock, a peer lost in a collective, a hung read): it tells the
    context (``stalled``: a Ray Train worker records it and ends its process), and where the rank runs in
    this process's main thread (``LocalContext``) it raises StageStalled there, through a signal that
    also interrupts a blocking sleep or wait. Every phase is also sent to the context (``note``)."""

    def __init__(self, context, timeout_s: float, stage: str):
        self.context, self.timeout_s, self.stage = context, timeout_s, stage
        self.phase, self.since, self.fired = "starting", time.monotonic(), None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="llava-ray-watchdog", daemon=True)
        in_main = threading.current_thread() is threading.main_thread()
        self._main = threading.main_thread().ident if in_main and not context.ends_process else None
        self._previous = None

    def __call__(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()
        self.context.note(phase)

    def __enter__(self):
        if self._main is not None:
            self._previous = signal.signal(signal.SIGUSR1, self._raise)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._main is not None:
            signal.signal(signal.SIGUSR1, self._previous)

    def _raise(self, signum, frame) -> None:
        if self.fired and not self._done.is_set():
            raise StageStalled(f"stage {self.stage}: {self.fired}")

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.since
            if idle > self.timeout_s:
                self.fired = f"rank {self.context.rank}: no progress for {idle:.0f} s in {self.phase!r}"
                self.context.stalled(self.fired)
                if self._main is not None:
                    signal.pthread_kill(self._main, signal.SIGUSR1)
                return
