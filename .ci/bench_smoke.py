"""Every benchmark's --quick run, as CI runs them (`make bench-smoke`): each must exit 0 within its time
bound and end with its figure line, ``NAME: RATIOx (target Tx)``; gpu_step's CPU smoke run ends with its
documented ``gpu_step: ...`` line instead (an MFU figure needs a GPU). Prints each benchmark's last line and
time; exits 1 when any crashed, hung or printed no figure line."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 150  # a --quick run should take under 45 s here; three times that is a hang, not noise
RATIO = re.compile(r"^(?P<name>\w+): \d+(\.\d+)?x \(target [^)]+\)$")
DOCUMENTED = {"gpu_step": re.compile(r"^gpu_step: .+ \(target [^)]+\).*$")}


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check(path: str) -> tuple[bool, float, str]:
    name = os.path.splitext(os.path.basename(path))[0]
    start = time.monotonic()
    try:
        out = subprocess.run(
            [sys.executable, path, "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-2000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-2000:]
        return False, time.monotonic() - start, f"hung: no exit within {TIMEOUT_S} s; output tail: {tail!r}"
    seconds = time.monotonic() - start
    line = last_line(out.stdout)
    if out.returncode != 0:
        return False, seconds, f"exit {out.returncode}: {(out.stdout + out.stderr)[-2000:]}"
    pattern = DOCUMENTED.get(name, RATIO)
    match = pattern.match(line)
    if not match or (pattern is RATIO and match.group("name") != name):
        return False, seconds, f"expected a last line '{name}: RATIOx (target Tx)', found {line!r}"
    return True, seconds, line


def main() -> int:
    paths = sorted(
        p
        for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
        if not os.path.basename(p).startswith("_")
    )
    failed = 0
    for path in paths:
        ok, seconds, line = check(path)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(path):24s} {seconds:6.1f} s  {line}", flush=True)
    verdict = (
        f"{failed} of {len(paths)} failed" if failed else f"all {len(paths)} ran and printed their figure"
    )
    print(f"bench-smoke: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
