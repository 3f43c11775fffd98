"""`make lint`'s third check: ruff format governs the tree. A `# fmt: skip` is allowed only on a table whose
alignment carries meaning, with its reason beside it (`# fmt: skip # a table of image sizes`), and at most
MAX of them in the linted folders."""

import re
import sys
from pathlib import Path

MAX = 20
REASONED = re.compile(r"# fmt: skip # \S")

found, bare = [], []
for folder in sys.argv[1:]:
    for path in sorted(Path(folder).rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "# fmt: skip" in line:
                found.append(f"{path}:{number}")
                if not REASONED.search(line):
                    bare.append(f"{path}:{number}")
for where in bare:
    print(f"{where}: '# fmt: skip' without its reason beside it ('# fmt: skip # <why the layout matters>')")
if len(found) > MAX:
    print(f"'# fmt: skip': expected at most {MAX} in {' '.join(sys.argv[1:])}, found {len(found)}")
sys.exit(1 if bare or len(found) > MAX else 0)
