"""No block of 6 or more code lines is written twice in src/: one piece of code serves where the logic is one."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MIN_LINES = 6
_PUNCT_ONLY = re.compile(r"^[\s()\[\]{},:;.]*$")


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, whitespace-folded text) of the lines that carry code: no blanks, comments, imports or
    lone punctuation, which repeat everywhere without being a repeated idea."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        s = " ".join(line.split())
        if not s or s.startswith("#") or _PUNCT_ONLY.match(s) or s.startswith(("import ", "from ")):
            continue
        out.append((n, s))
    return out


def find_repeats(files: list[Path], root: Path = SRC, min_lines: int = MIN_LINES) -> list[str]:
    seen: dict[tuple[str, ...], tuple[Path, int]] = {}
    repeats, reported = [], set()
    for f in files:
        lines = _code_lines(f)
        for i in range(len(lines) - min_lines + 1):
            key = tuple(s for _, s in lines[i : i + min_lines])
            where = (f, lines[i][0])
            first = seen.setdefault(key, where)
            # overlapping windows of one file (a run of equal lines) are not a repeat
            if first != where and not (first[0] == f and lines[i][0] - first[1] < min_lines):
                pair = (first[0], f)
                if pair not in reported:  # one row per pair of files keeps the message short
                    reported.add(pair)
                    repeats.append(f"{first[0].relative_to(root)}:{first[1]} ~ {f.relative_to(root)}:{lines[i][0]}")
    return repeats


def test_finder_sees_a_repeat(tmp_path):
    block = "\n".join(f"x{i} = f(x{i - 1}, {i})" for i in range(1, 8))
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import os\n" + block + "\n")
    b.write_text("def g():\n    pass\n" + block.replace("\n", "\n\n") + "\n")
    assert len(find_repeats([a, b], tmp_path)) == 1
    b.write_text(block.replace("x3 =", "y3 ="))  # one changed line breaks every 6-line run
    assert find_repeats([a, b], tmp_path) == []


def test_no_repeated_blocks_in_src():
    repeats = find_repeats(sorted(SRC.rglob("*.py")))
    assert not repeats, "blocks of 6+ code lines written twice:\n" + "\n".join(repeats)
