"""What the file loaders share: finding files, the missing-image policy, caption checks, digests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import InputError
from ..benchmark import ON_MISSING, Benchmark

MAX_LISTED = 10


def digest_texts(texts) -> str:
    """One sha256 over texts, one per line: the identity of generated or derived captions."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


def digest_of(items: Sequence[tuple[str, str]]) -> str:
    """One sha256 over (name, value) pairs: identity of a folder of small files or of a listing."""
    h = hashlib.sha256()
    for name, value in items:
        h.update(name.encode("utf-8") + b"\0" + value.encode("utf-8") + b"\n")
    return h.hexdigest()


def check_on_missing(on_missing: str) -> None:
    if on_missing not in ON_MISSING:
        raise InputError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")


def find_file(root: Path, name: str | Path, subdirs: Sequence[str] = ("", "annotations")) -> Path:
    """``name`` under root or one of its usual sub-folders, else as a path of its own."""
    p = Path(name)
    tried = [] if p.is_absolute() else [root / d / name for d in subdirs]
    for t in tried + [p]:
        if t.is_file():
            return t
    raise InputError(f"annotation file {name} not found (looked in {', '.join(str(t.parent) for t in tried + [p])})")


def require_dir(root: str | Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: {what} folder not found")
    return root


def missing_message(name: str, ann: str, missing: list[tuple[str, str]]) -> str:
    listed = ", ".join(f"{w}: {p}" for w, p in missing[:MAX_LISTED])
    more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    return (f"{name}: {len(missing)} image(s) listed in {ann} are missing ({listed}{more}); "
            f"fix the image root or pass on_missing='skip' to drop them with their captions")


def build_retrieval(name: str, entries: list[tuple[str, list[str], str]], ann: str, on_missing: str,
                     root: Path, files: dict, meta: dict) -> Benchmark:
    """entries: (image path, captions, where in the annotations) in annotation order; applies the
    missing-image policy."""
    missing = [(w, p) for p, _, w in entries if not Path(p).is_file()]
    skipped = []
    if missing:
        if on_missing == "error":
            raise InputError(missing_message(name, ann, missing))
        skipped = [{"where": w, "image": p, "reason": "image file missing"} for w, p in missing]
        entries = [x for x in entries if Path(x[0]).is_file()]
    images, captions, index = [], [], []
    for i, (path, caps, _) in enumerate(entries):
        images.append(str(path))
        captions.extend(caps)
        index.extend([i] * len(caps))
    if not images:
        raise InputError(f"{name}: no usable entries in {ann}")
    return Benchmark(name, "retrieval", images, captions, np.asarray(index, dtype=np.int64), root=str(root),
                     files=files, skipped=skipped, meta=meta)


def caption_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: caption must be a non-empty string, got {value!r:.60}")
    return value.strip()


def stem_key(stem: str):
    """Numeric stems in numeric order, then the others by name."""
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)
