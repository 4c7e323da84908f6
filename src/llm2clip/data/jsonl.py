"""One JSONL reader for every manifest and caption file: errors name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; each record is a JSON object."""
    path = Path(path)
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{where}: not UTF-8 text: {err.reason}") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield ln, rec
