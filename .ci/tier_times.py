"""Per-tier test times from pytest's JUnit report (`make test` writes it): tests, seconds and the slowest
test of each tier (tests/components, pipelines, serve, e2e, cluster; one report per pytest run), as in the
README's table."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def main(paths: list[str]) -> int:
    tiers: dict[str, list[tuple[float, str]]] = defaultdict(list)
    cases = [case for path in paths for case in ET.parse(path).getroot().iter("testcase")]
    for case in cases:
        parts = case.get("classname", "").split(".")
        tier = parts[1] if len(parts) > 1 and parts[0] == "tests" else "other"
        tiers[tier].append((float(case.get("time", 0)), f"{parts[-1]}::{case.get('name')}"))
    total = sum(t for cases in tiers.values() for t, _ in cases)
    print(f"{'tier':12s} {'tests':>5s} {'seconds':>8s}  slowest")
    for tier, cases in sorted(tiers.items(), key=lambda kv: -sum(t for t, _ in kv[1])):
        slowest = max(cases)
        seconds = sum(t for t, _ in cases)
        print(f"{tier:12s} {len(cases):5d} {seconds:8.0f}  {slowest[1]} ({slowest[0]:.0f} s)")
    print(f"{'all':12s} {sum(map(len, tiers.values())):5d} {total:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [".pytest_cache/junit.xml"]))
