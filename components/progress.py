"""A stage's progress on the driver's console: rank 0's set-up phases, then step and total, the step's
loss, tokens/s, elapsed time and ETA, and the world size. On a terminal a live bar (tqdm); otherwise (CI,
``ray job logs``, a file) one plain line every ``every_s`` seconds and at the last step. Fed by what rank 0
reports, never printed by a rank itself."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def eta_s(elapsed_s: float, done: int, total: int, start_step: int = 0) -> float | None:
    """Seconds left at the pace of this attempt's steps (None before the first)."""
    ran = done - start_step
    return None if ran <= 0 else elapsed_s / ran * (total - done)


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(stage: str, record: dict) -> str:
    """One plain line of a progress record (what rank 0 reports: step, total, loss, tokens_per_s,
    elapsed_s, eta_s, world)."""
    return (
        f"stage {stage}: step {record['step']}/{record['total']}  loss {record['loss']:.4f}  "
        f"{record['tokens_per_s']:,.0f} tokens/s  elapsed {clock(record['elapsed_s'])}  "
        f"ETA {clock(record.get('eta_s'))}  world {record['world']}"
    )


class ProgressPrinter:
    def __init__(self, stage: str, total: int, every_s: float = 30.0, stream=None, live: bool | None = None):
        self.stage, self.total, self.every_s = stage, total, every_s
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.bar = None
        self.last_line = -float("inf")
        self.shown = 0
        self.last_phase: str | None = None

    def phase(self, text: str) -> None:
        """Rank 0's set-up phase (importing, building the model, loading a checkpoint): a line each while
        no step has run, so that a stage's start-up is never silent."""
        if self.shown or text == self.last_phase or text.startswith(("step ", "saving ")):
            return
        self.last_phase = text
        line = f"stage {self.stage}: {text}"
        if self.live:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def update(self, record: dict) -> None:
        """Show a progress record (a step already shown is ignored)."""
        if record["step"] <= self.shown:
            return
        if self.live:
            if self.bar is None:
                self.bar = tqdm(total=self.total, desc=f"stage {self.stage}", file=self.stream)
                self.bar.update(record["step"] - 1)
            self.bar.update(record["step"] - max(self.shown, self.bar.n))
            self.bar.set_postfix_str(
                f"loss {record['loss']:.4f}, {record['tokens_per_s']:,.0f} tok/s, world {record['world']}"
            )
        elif time.monotonic() - self.last_line >= self.every_s or record["step"] >= self.total:
            print(progress_line(self.stage, record), file=self.stream, flush=True)
            self.last_line = time.monotonic()
        self.shown = record["step"]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
