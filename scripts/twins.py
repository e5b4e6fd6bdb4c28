"""How much text the twins share: ``python scripts/twins.py``.

Each pair ``mqkit/_sync/X.py`` / ``mqkit/_async/X.py`` is normalised (``await``/``async``
dropped, the ``Async`` prefix removed, blank lines, comments and docstring-only lines
dropped, whitespace collapsed) and compared line by line with difflib: the share is
2 x matching lines / (lines of both). The total weighs each pair by its size. Files that
exist on one side only count as not shared. A second total leaves out the two modules that
exist to hold each shell's I/O with its client library's internals (``transport.py``:
pika's IO thread, socket and blocking channel, aiormq's frame writes; ``lenient.py``: frames
each library cannot decode), which by design share nothing.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mqkit"
IO_ONLY = {"transport.py", "lenient.py"}
_SUBS = [
    (re.compile(r"\bawait\s+"), ""),
    (re.compile(r"\basync\s+(def|with|for)\b"), r"\1"),
    (re.compile(r"\bAsync(?=[A-Z])"), ""),
    (re.compile(r"\b(_?)async\b"), r"\1sync"),  # _async/ -> _sync/, "async" -> "sync"
    (re.compile(r"\s+"), " "),
]


def normalise(path: Path) -> list[str]:
    lines: list[str] = []
    in_doc = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if in_doc:
            in_doc = not (line.endswith('"""') or line.endswith("'''"))
            continue
        if line.startswith(('"""', "'''")):
            quote = line[:3]
            in_doc = not (len(line) > 3 and line.endswith(quote))
            continue
        if not line or line.startswith("#"):
            continue
        for pattern, repl in _SUBS:
            line = pattern.sub(repl, line)
        lines.append(line)
    return lines


def share(a: list[str], b: list[str]) -> int:
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks())


def main() -> int:
    sync = {p.name: p for p in (ROOT / "_sync").glob("*.py") if p.name != "__init__.py"}
    asyn = {p.name: p for p in (ROOT / "_async").glob("*.py") if p.name != "__init__.py"}
    total_lines = total_shared = logic_lines = logic_shared = 0
    print(f"{'module':<20}{'sync':>7}{'async':>7}{'shared':>8}")
    for name in sorted(sync.keys() | asyn.keys()):
        a = normalise(sync[name]) if name in sync else []
        b = normalise(asyn[name]) if name in asyn else []
        same = share(a, b) if a and b else 0
        lines = len(a) + len(b)
        total_lines += lines
        total_shared += 2 * same
        if name not in IO_ONLY:
            logic_lines += lines
            logic_shared += 2 * same
        pct = f"{100 * 2 * same / lines:.0f}%" if lines else "-"
        print(f"{name:<20}{len(a):>7}{len(b):>7}{pct:>8}")
    print(f"{'total':<20}{'':>14}{100 * total_shared / max(total_lines, 1):>7.0f}%")
    without = "without " + ", ".join(sorted(IO_ONLY))
    print(f"{without:<34}{100 * logic_shared / max(logic_lines, 1):>7.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
