"""One JSONL reader for every manifest and caption file, and the one reader of the caption-record shape
(image manifest rows) that `embed`, stage 2 and `eval-text` share: errors name the file and line."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)

MANIFEST_ROW = ('{"image": "photos/a.jpg", "captions": [{"id": "a-1", "kind": "short", "text": "..."}, '
                '{"id": "a-2", "kind": "dense", "text": "..."}]}')
MANIFEST_CSV_COLUMNS = ("image", "caption_id", "kind")  # and optionally text


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


# ------------------------------------------------------------------------- the caption-record shape
@dataclass(frozen=True)
class ManifestCaption:
    """One caption of a manifest row: its image as written (not joined to any root), id, kind, text."""

    image: str
    id: str
    kind: str
    text: str | None
    where: str  # "file:line"


def is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def is_manifest(path: str | Path) -> bool:
    """Whether a caption file holds manifest rows: a CSV whose header names image and caption_id, or a JSONL
    whose first record has 'image', or 'captions' without 'group' (a stage-1 group file has both); a bad row is
    then reported by the manifest reader."""
    path = Path(path)
    if is_csv(path):
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
        return {"image", "caption_id"} <= set(header)
    for _, rec in read_jsonl(path):
        return "image" in rec or ("captions" in rec and "group" not in rec)
    return False


def _text(value, where: str, cid: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: caption {cid!r}: field 'text' must be a non-empty string")
    return value.strip()


def _caption(image: str, cid, kind, text, where: str, need_text: bool) -> ManifestCaption:
    if not isinstance(cid, str) or not cid.strip() or "\0" in cid:
        raise InputError(f"{where}: field 'id' must be a non-empty string (got {cid!r})")
    if not isinstance(kind, str) or not kind.strip():
        raise InputError(f"{where}: caption {cid!r}: field 'kind' must be a non-empty string (got {kind!r})")
    text = _text(text, where, cid)
    if need_text and text is None:
        raise InputError(f"{where}: caption {cid!r} has no 'text' (embedding and eval-text read it)")
    return ManifestCaption(image, cid, kind, text, where)


def _manifest_csv(path: Path, need_text: bool) -> Iterator[ManifestCaption]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            missing = set(MANIFEST_CSV_COLUMNS) - set(reader.fieldnames or [])
            if missing:
                raise InputError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row["image"]:
                    raise InputError(f"{where}: field 'image' must be non-empty")
                # CSV cannot tell an empty cell from a missing one: an empty text is no text
                yield _caption(row["image"], row["caption_id"], row["kind"], row.get("text") or None, where,
                               need_text)
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{reader.line_num + 1}: not UTF-8 text: {err.reason}") from None
        except csv.Error as err:
            raise InputError(f"{path}:{reader.line_num}: bad CSV: {err}") from None


def _manifest_jsonl(path: Path, need_text: bool) -> Iterator[ManifestCaption]:
    for ln, row in read_jsonl(path):
        where = f"{path}:{ln}"
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise InputError(f"{where}: expected an object with a non-empty string field 'image'")
        caps = row.get("captions")
        if not isinstance(caps, list) or not caps:
            raise InputError(f"{where}: field 'captions' must be a non-empty list")
        for c in caps:
            if not isinstance(c, dict):
                raise InputError(f"{where}: each caption must be an object with 'id', 'kind' and 'text'")
            yield _caption(row["image"], c.get("id"), c.get("kind"), c.get("text"), where, need_text)


def read_manifest(path: str | Path, need_text: bool = False) -> Iterator[ManifestCaption]:
    """Every caption of a manifest, in file order: JSONL rows of the shape ``MANIFEST_ROW`` (text optional
    where a feature store holds the embeddings), or CSV with columns image, caption_id, kind[, text], one
    caption per row. ``need_text``: a caption without text is an error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    yield from (_manifest_csv if is_csv(path) else _manifest_jsonl)(path, need_text)


_warned: set[str] = set()


def warn_old_shape(path: str | Path, old: str) -> None:
    """Once per file and process: ``old`` (a shape description) still reads, but the manifest row is the one shape."""
    key = str(Path(path).absolute())
    if key not in _warned:
        _warned.add(key)
        log.warning("%s: the %s shape is deprecated; write one image per line as %s (the same file serves "
                    "embed, train and eval-text)", path, old, MANIFEST_ROW)
