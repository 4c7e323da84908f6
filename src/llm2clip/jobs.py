"""A resumable job's folder: a record written first, parts written atomically, a manifest written last.

The feature store, the image index and the webdataset shard writer share this life cycle::

    job = Job(out, "embed", STORE_MANIFEST, error=StoreError)
    if job.is_complete(): ...                        # the manifest exists: nothing left to do
    state = job.open(record, check=...)              # "new" (record written) or "resume"
    for k in todo: job.write_part(name(k), data)     # each part whole or absent
    job.complete(manifest_bytes, scratch=[...])      # manifest last; the record and scratch go

``llm2clip_job.json`` holds ``{"kind", "version", **record}``; a rerun compares its record with the
one it would write, and either refuses (``check`` raises, naming what differs) or, with
``restart=True``, clears the folder and starts over. Only the manifest marks the job complete: a
killed job leaves a record, finished parts and at most some temp files, which ``open`` removes.

Every ``Job`` is a writer: making one claims its folder for this process (``fileio.lock_folder``, an OS
lock that dies with the process), so a second process on the same folder fails at once, naming the
first one's PID; ``complete`` releases it, and so does ``is_complete`` when it finds the job finished.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ConfigError
from .fileio import (
    JOB_RECORD,
    lock_folder,
    remove_temp_files,
    unlock_folder,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
)

VERSION = 1

Check = Callable[[Path, dict, dict], None]


def differing_keys(have: dict, want: dict) -> list[str]:
    return sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))


class Job:
    """The folder ``folder`` owned by one job of kind ``kind``, complete once ``manifest`` exists; this
    process is its one writer from here until ``complete``."""

    def __init__(self, folder: str | Path, kind: str, manifest: str, error: type[Exception] = ConfigError):
        self.folder, self.kind, self.manifest, self.error = Path(folder), kind, manifest, error
        lock_folder(self.folder, f"llm2clip {kind}")

    @property
    def record_path(self) -> Path:
        return self.folder / JOB_RECORD

    @property
    def manifest_path(self) -> Path:
        return self.folder / self.manifest

    def is_complete(self) -> bool:
        """True once the manifest exists; a finished job has no writer, so this process lets the folder go."""
        if self.manifest_path.is_file():
            unlock_folder(self.folder)
            return True
        return False

    def is_started(self) -> bool:
        return self.record_path.is_file()

    # ------------------------------------------------------------------------------- the record
    def read_record(self) -> dict | None:
        """The fields of the record on disk (kind and version checked and left out); None when absent."""
        if not self.record_path.is_file():
            return None
        try:
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise self.error(f"{self.record_path}: unreadable job record ({err}); delete {self.folder} to start "
                             "over") from None
        kind, version = data.pop("kind", None), data.pop("version", None)
        if kind != self.kind or version != VERSION:
            raise self.error(f"{self.record_path}: a {kind!r} job (version {version!r}), not a {self.kind!r} job "
                             f"(version {VERSION}); choose another folder")
        return data

    def open(self, record: dict, check: Check | None = None, not_empty: str | None = None,
             restart: bool = False, prepare: Callable[[], None] | None = None, keep: Iterable[str] = ()) -> str:
        """Resume the job recorded in the folder or start a new one; returns "resume" or "new".

        ``check(record_path, have, want)`` raises when the recorded job is another one (default: any
        differing field). With ``restart`` a mismatched or foreign folder is cleared instead of refused.
        ``prepare`` runs in a new job's folder before the record is written (files the record vouches for).
        ``keep``: names a new job's folder may already hold (scratch the caller made before it had a record).
        """
        try:
            have = self.read_record()
        except Exception:
            if not restart:
                raise
            have = None
        if have is not None:
            try:
                (check or self._check)(self.record_path, have, record)
                remove_temp_files(self.folder)
                return "resume"
            except Exception:
                if not restart:
                    raise
        self.start(record, not_empty, restart, prepare, keep)
        return "new"

    def start(self, record: dict, not_empty: str | None = None, restart: bool = False,
              prepare: Callable[[], None] | None = None, keep: Iterable[str] = ()) -> None:
        """Claim an absent or empty folder (any folder with ``restart``) and write the record first; names in
        ``keep`` do not count as content."""
        keep = set(keep)
        if self.folder.exists() and any(p.name not in keep for p in self.folder.iterdir()):
            if not restart:
                raise self.error(not_empty or f"{self.folder}: not empty and not a {self.kind} job; choose an empty "
                                 "or new folder")
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare()
        write_json_atomic(self.record_path, {"kind": self.kind, "version": VERSION, **record}, indent=1)

    def _check(self, where: Path, have: dict, want: dict) -> None:
        diff = differing_keys(have, want)
        if diff:
            raise self.error(f"{where}: this job was started with other settings ({', '.join(diff)}); use the "
                             "same settings or a new folder")

    # ------------------------------------------------------------------------------- parts
    def part(self, name: str) -> Path:
        return self.folder / name

    def has_part(self, name: str) -> bool:
        return self.part(name).is_file()

    def write_part(self, name: str, data: bytes) -> str:
        """Write a part atomically; returns its sha256."""
        return write_bytes_atomic(self.part(name), data)

    def write_part_with(self, name: str, write) -> Path:
        """Write a part atomically by ``write(binary file)``."""
        return write_atomic(self.part(name), write)

    # ------------------------------------------------------------------------------- completion
    def complete(self, manifest: bytes, scratch: Iterable[str] = ()) -> None:
        """Write the manifest (last), then drop the scratch files and folders and the record."""
        write_bytes_atomic(self.manifest_path, manifest)
        self.clear(scratch)
        self.record_path.unlink(missing_ok=True)
        unlock_folder(self.folder)

    def clear(self, names: Iterable[str]) -> None:
        for name in names:
            p = self.folder / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
