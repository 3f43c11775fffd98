"""The README's layout table lists exactly the tree's modules: a module missing from it, or a listed file
that does not exist, fails here.
Guards: the layout table matches the tree; fails with a deleted module still listed."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_layout_table_lists_exactly_the_modules():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text[text.index("## Layout") :]
    table = table[: table.index("\n## ", 1)]
    listed = set(re.findall(r"`((?:components|pipelines|serve)/[\w/]+\.py)`", table))
    modules = {
        os.path.relpath(p, ROOT)
        for package in ("components", "pipelines", "serve")
        for p in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)
        if not os.path.basename(p).startswith("__")
    }
    assert not listed - modules, f"listed but not in the tree: {sorted(listed - modules)}"
    assert not modules - listed, f"in the tree but not listed: {sorted(modules - listed)}"
