"""One way to write files that survive a crash, open images, and print Markdown tables.

Every artifact of the project is written through ``write_atomic``: a temp file beside the target,
flushed and fsynced, renamed over it, then the folder fsynced. A reader sees the old file or the
whole new one, never a part, and a killed writer leaves at most a temp file that ``remove_temp_files``
(or the next writer) clears.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

TMP_MARK = ".tmp-"


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def write_atomic(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then replace ``path`` with it, durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> str:
    """Write ``data`` atomically; returns its sha256 hex digest."""
    write_atomic(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: str | Path, text: str) -> Path:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
    return Path(path)


def write_json_atomic(path: str | Path, obj, indent: int = 2, **kwargs) -> Path:
    """JSON with a trailing newline; values JSON cannot hold are written as ``str`` (paths, dtypes)."""
    kwargs.setdefault("default", str)
    return write_text_atomic(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def remove_temp_files(folder: str | Path) -> int:
    """Delete temp files a killed writer left in ``folder``; returns how many."""
    n = 0
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


# ------------------------------------------------------------------------------------------ images
def image_errors() -> tuple[type[BaseException], ...]:
    """What decoding a bad image file can raise: PIL uses many types, and a decompression bomb is one."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_image(source) -> "Image.Image":  # noqa: F821 - PIL is imported lazily
    """An RGB image from a path, bytes or a binary file object, decoded now (a truncated file fails here).

    Raises ``FileNotFoundError`` for a missing file and one of ``image_errors()`` for a bad one.
    """
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    with Image.open(source) as im:
        im.load()
        return im.convert("RGB")


# ------------------------------------------------------------------------------------------ tables
def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``align`` holds 'l' or 'r' per column (default: left)."""
    header = [str(h) for h in header]
    align = list(align or ["l"] * len(header))
    if len(align) != len(header):
        raise ValueError("one alignment per column")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"row has {len(cells)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
