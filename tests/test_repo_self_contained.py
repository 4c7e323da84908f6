"""The repository stands on its own: no text file points outside it.

Checked over every file git tracks (and new ones it does not ignore): no `../` path that leaves the
repository (resolved from the file's folder), no link to a shared folder beside it, no absolute path of
one machine, the method and asset notes cited only as docs/METHOD.md and docs/ASSETS.md, and every
relative Markdown link lands on a file of the repository.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

UP_PATH = re.compile(r"(?:\.\./)+[^\s'\"`()\[\]{}<>,;]*")
SHARED = re.compile(r"(?<![\w.-])shared[/]")  # [/]: so this line does not match itself
MACHINE = re.compile(r"(?<![\w.~-])/(?:work|home|Users|root)/")
NOTE = re.compile(r"[\w./-]*\b(?:METHOD|ASSETS|DESIGN)\.md")
ALLOWED_NOTES = {"docs/METHOD.md", "docs/ASSETS.md"}
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    files = []
    for name in filter(None, out.split("\0")):
        p = REPO / name
        if name.startswith("runs/") or not p.is_file():  # run outputs; files deleted in the working tree
            continue
        data = p.read_bytes()
        if b"\0" not in data[:8192]:  # text only
            files.append(p)
    return files


def _text(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def _inside(target: str) -> bool:
    return os.path.normpath(target).startswith(str(REPO) + os.sep) or os.path.normpath(target) == str(REPO)


def test_no_path_leaves_the_repository():
    bad = []
    for p in _files():
        for n, line in enumerate(_text(p).splitlines(), 1):
            where = f"{p.relative_to(REPO)}:{n}"
            bad += [f"{where}: {m}" for m in UP_PATH.findall(line) if not _inside(str(p.parent / m))]
            bad += [f"{where}: shared folder: {line.strip()[:100]}" for _ in SHARED.finditer(line)]
            bad += [f"{where}: machine path: {line.strip()[:100]}" for _ in MACHINE.finditer(line)]
    assert not bad, "\n".join(bad)


def test_notes_are_cited_in_docs():
    bad = []
    for p in _files():
        for n, line in enumerate(_text(p).splitlines(), 1):
            for m in NOTE.findall(line):
                if m not in ALLOWED_NOTES:  # the same words everywhere, docs/ included
                    bad.append(f"{p.relative_to(REPO)}:{n}: {m}")
    assert not bad, "\n".join(bad)
    assert all((REPO / a).is_file() for a in ALLOWED_NOTES)


def test_markdown_links_land_in_the_repository():
    bad = []
    for p in _files():
        if p.suffix != ".md":
            continue
        for n, line in enumerate(_text(p).splitlines(), 1):
            for target in MD_LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # a URL or an anchor of the same page
                path = target.split("#", 1)[0]
                if path and not (_inside(str(p.parent / path)) and (p.parent / path).exists()):
                    bad.append(f"{p.relative_to(REPO)}:{n}: {target}")
    assert not bad, "\n".join(bad)
