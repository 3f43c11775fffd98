"""The stage's console progress: a live bar on a terminal, plain lines elsewhere, from rank 0's records."""

import io

from components.progress import ProgressPrinter, clock, eta_s


def _record(step: int) -> dict:
    return {
        "step": step,
        "total": 4,
        "loss": 2.5 / step,
        "tokens_per_s": 1234.5,
        "elapsed_s": 10.0 * step,
        "eta_s": 10.0 * (4 - step),
        "world": 2,
    }


def test_plain_lines_every_n_seconds_and_the_last_step_and_a_bar_on_a_terminal():
    """Guards: the printer's pacing; fails if it prints every step, skips the last, or repeats a step."""
    out = io.StringIO()
    printer = ProgressPrinter("s1", 4, every_s=3600.0, stream=out, live=False)
    for phase in ("setting up: the model", "setting up: the model", "step 1"):
        printer.phase(phase)
    for step in (1, 2, 2, 3, 4):
        printer.update(_record(step))
    printer.phase("exporting the HF checkpoint")  # after the steps: the bar's last line says it all
    lines = out.getvalue().splitlines()
    assert lines == [
        "stage s1: setting up: the model",
        "stage s1: step 1/4  loss 2.5000  1,234 tokens/s  elapsed 0:10  ETA 0:30  world 2",
        "stage s1: step 4/4  loss 0.6250  1,234 tokens/s  elapsed 0:40  ETA 0:00  world 2",
    ]
    bar = io.StringIO()
    live = ProgressPrinter("s1", 4, stream=bar, live=True)
    for step in (2, 4):
        live.update(_record(step))
    live.close()
    assert "4/4" in bar.getvalue() and "world 2" in bar.getvalue()
    assert eta_s(30.0, 5, 10, start_step=2) == 50.0 and eta_s(0.0, 2, 10, start_step=2) is None
    assert (clock(None), clock(61.4), clock(3725)) == ("-", "1:01", "1:02:05")
