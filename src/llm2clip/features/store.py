"""The caption-embedding store: a directory of fixed-size .npy shards plus a JSON manifest.

Layout of a finished store (readable with numpy alone, no llm2clip needed)::

    manifest.json          format, encoder identity, dim, dtype, row/id counts, per-shard sha256; from
                           the embed job also truncated_captions (cut at max_length) and max_length
    shard-00000.npy ...    [rows, dim] arrays; row r lives in shard r // shard_size, at r % shard_size;
                           after the array data, a one-line record of the encoder identity it was written
                           under (``np.load`` ignores bytes past the array)
    ids.npy                caption ids, UTF-8 bytes (|S<w>), sorted: binary-searchable when memory-mapped
    id_rows.npy            int64, the row of ids[i]; several ids share a row when their captions are equal
    SHA256SUMS             `sha256sum -c SHA256SUMS` checks every file but the manifest

float16 and float32 shards are plain .npy arrays; bfloat16 shards hold the raw bits as uint16
(numpy has no bfloat16): ``torch.from_numpy(a).view(torch.bfloat16)``, or ``FeatureStore``
widens them to float32 exactly. Only ``manifest.json``, written last and atomically, makes a
directory a store: a killed job leaves no manifest, so nothing half-written is read as valid.

Reads are checked: the first time a process opens a shard (or the id files), the file's sha256 is
compared with the manifest's and the shard's identity record with the manifest's identity, so a
corrupt, swapped or foreign file is an error naming it instead of wrong vectors under this store's name.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import JOB_RECORD, TMP_MARK, fsync_dir, remove_temp_files, write_bytes_atomic  # noqa: F401  (re-exported)
from ..hashing import file_sha256
from ..identity import NUMERICS, numerics_diff, numerics_note, without_numerics
from ..jobs import Job

log = logging.getLogger(__name__)

FORMAT = "llm2clip-feature-store"
VERSION = 1
STORE_MANIFEST = "manifest.json"
JOB_FILE = JOB_RECORD  # present while an extraction job is unfinished
JOB_KIND = "embed"
IDS_FILE = "ids.npy"
ID_ROWS_FILE = "id_rows.npy"
SUMS_FILE = "SHA256SUMS"
# Stored numpy dtype of each store dtype (bfloat16 as its raw 16 bits).
STORAGE = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}
# Starts the record a shard carries after its array data: JSON with the encoder identity (and, from the
# embed job, how many of its captions were cut at max_length), then a newline.
RECORD_MARK = b"\nllm2clip-shard-record "
RECORD_FIELD = "shards_carry_identity"  # manifest flag: every shard has a record (absent in older stores)


class StoreError(InputError):
    """A store that cannot be used as asked: incomplete, corrupt, or not the one expected."""


class IdentityMismatchError(StoreError):
    """The store was made by another encoder than the one that wants to use it."""


class MissingIdError(StoreError, KeyError):
    """Caption ids the store does not hold (``missing``); a KeyError too, as a mapping's lookup would raise."""

    def __init__(self, message: str, missing: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)

    __str__ = StoreError.__str__  # the message, not KeyError's repr of it


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def sidecar_name(k: int) -> str:
    return shard_name(k) + ".sha256"


# ------------------------------------------------------------------------------------ writing
def to_storage(vectors, dtype: str, where: str = "vectors") -> np.ndarray:
    """float32 vectors [N, D] (numpy or torch) as the stored array; refuses non-finite values."""
    import torch

    if dtype not in STORAGE:
        raise StoreError(f"unknown store dtype {dtype!r}; one of {', '.join(STORAGE)}")
    t = torch.as_tensor(vectors).float()
    if t.ndim != 2:
        raise StoreError(f"{where}: expected a [N, D] array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise StoreError(f"{where}: the encoder produced NaN or infinite values")
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(STORAGE[dtype])
    with np.errstate(over="ignore"):
        out = t.numpy().astype(STORAGE[dtype])
    if not np.isfinite(out).all():  # fp16 tops out at 65504
        raise StoreError(f"{where}: values up to {float(t.abs().max()):.4g} overflow {dtype}; "
                         "use dtype bfloat16 or float32")
    return out


def from_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows as a numpy float array: bfloat16 bits widened to float32 (exact)."""
    if dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def shard_bytes(arr: np.ndarray, identity: dict, **stats) -> bytes:
    """The .npy bytes of ``arr`` followed by the shard's record (identity first, then ``stats``)."""
    record = json.dumps({"identity": identity, **stats}, sort_keys=True, ensure_ascii=True)
    return npy_bytes(arr) + RECORD_MARK + record.encode("ascii") + b"\n"


def write_shard(out: Path, k: int, arr: np.ndarray, identity: dict, **stats) -> str:
    """Write shard ``k`` atomically, then its checksum sidecar (so finalising need not reread it)."""
    digest = write_bytes_atomic(out / shard_name(k), shard_bytes(arr, identity, **stats))
    write_bytes_atomic(out / sidecar_name(k), f"{digest}  {shard_name(k)}\n".encode())
    return digest


@dataclass(frozen=True)
class Layout:
    """Rows split into fixed-size shards (the last one may be shorter)."""

    rows: int
    shard_size: int

    @property
    def n_shards(self) -> int:
        return (self.rows + self.shard_size - 1) // self.shard_size

    def shard_rows(self, k: int) -> int:
        lo, hi = self.shard_range(k)
        return hi - lo

    def shard_range(self, k: int) -> tuple[int, int]:
        lo = k * self.shard_size
        return lo, min(lo + self.shard_size, self.rows)


def _shard_header(path: Path) -> tuple[tuple, np.dtype, dict | None]:
    """(shape, dtype, record) of a .npy shard; the record after its data is None in older stores."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            f.seek(f.tell() + int(np.prod(shape)) * dtype.itemsize)
            tail = f.read(1 << 20)
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: not a readable .npy shard: {err}") from None
    if not tail:
        return shape, dtype, None
    try:
        if not tail.startswith(RECORD_MARK):
            raise ValueError("unexpected bytes")
        rec = json.loads(tail[len(RECORD_MARK):])
        if not isinstance(rec, dict) or not isinstance(rec.get("identity"), dict):
            raise ValueError("no identity in it")
    except ValueError as err:
        raise StoreError(f"{path}: unreadable record after the array data ({err}); corrupt shard") from None
    return shape, dtype, rec


def _sorted_keys(ids: Sequence[str], id_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    encoded = [i.encode("utf-8") for i in ids]
    width = max((len(b) for b in encoded), default=1) or 1
    keys = np.array(encoded, dtype=f"S{width}")
    order = np.argsort(keys, kind="stable")
    return keys[order], np.asarray(id_rows, dtype=np.int64)[order]


def finalize_store(out: Path, layout: Layout, *, identity: dict, dim: int, dtype: str,
                   ids: Sequence[str] | None = None, id_rows: np.ndarray | None = None,
                   keys_from: tuple[Path, dict] | None = None, extra: dict | None = None,
                   scratch: Sequence[str] = ()) -> dict:
    """Check every shard, then write keys, SHA256SUMS and, last, the manifest.

    The id files come from ``ids`` and ``id_rows`` in memory, or, written already (the embed job's plan), from
    ``keys_from``: (folder, {"ids": entry, "rows": entry}) with each file's name, bytes and sha256; they move in.
    ``scratch``: more names the job leaves to remove once the manifest is written."""
    out = Path(out)
    shards, truncated = [], []
    for k in range(layout.n_shards):
        path = out / shard_name(k)
        if not path.is_file():
            raise StoreError(f"{path}: shard missing; cannot finalise the store")
        lo, hi = layout.shard_range(k)
        shape, dt, record = _shard_header(path)
        if shape != (hi - lo, dim) or dt != STORAGE[dtype]:
            raise StoreError(f"{path}: shape {shape} {dt}, expected {(hi - lo, dim)} {STORAGE[dtype]}")
        _check_record(path, record, identity, required=True)
        truncated.append(record.get("truncated_captions"))
        side = out / sidecar_name(k)
        digest = side.read_text().split()[0] if side.is_file() else file_sha256(path)
        shards.append({"file": shard_name(k), "rows": hi - lo, "bytes": path.stat().st_size, "sha256": digest})
    if keys_from is not None:
        key_files = _move_keys(out, *keys_from)
        n_ids = int(np.load(out / IDS_FILE, mmap_mode="r").shape[0])
    else:
        if len(ids) != len(id_rows):
            raise StoreError(f"{len(ids)} ids but {len(id_rows)} rows for them")
        keys, rows = _sorted_keys(ids, id_rows)
        if len(keys) > 1 and (keys[1:] == keys[:-1]).any():
            raise StoreError("duplicate caption ids")
        if len(rows) and (rows.min() < 0 or rows.max() >= layout.rows):
            raise StoreError("an id maps to a row outside the store")
        key_files = {}
        for name, arr in ((IDS_FILE, keys), (ID_ROWS_FILE, rows)):
            data = npy_bytes(arr)
            key_files[name] = {"file": name, "bytes": len(data), "sha256": write_bytes_atomic(out / name, data)}
        n_ids = len(ids)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": identity,
        "dim": int(dim),
        "dtype": dtype,
        "storage_dtype": STORAGE[dtype].str,
        "rows": layout.rows,
        "ids": n_ids,
        "shard_size": layout.shard_size,
        "shards": shards,
        "keys": {"ids": key_files[IDS_FILE], "rows": key_files[ID_ROWS_FILE]},
        RECORD_FIELD: True,
        **({"truncated_captions": sum(truncated)} if None not in truncated else {}),
        **(extra or {}),
    }
    sums = "".join(f"{s['sha256']}  {s['file']}\n" for s in shards)
    sums += "".join(f"{f['sha256']}  {f['file']}\n" for f in key_files.values())
    write_bytes_atomic(out / SUMS_FILE, sums.encode())
    Job(out, JOB_KIND, STORE_MANIFEST).complete((json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode(),
                                                scratch=[*(sidecar_name(k) for k in range(layout.n_shards)), *scratch])
    return manifest


def _move_keys(out: Path, folder: Path, entries: dict) -> dict:
    """Id files written elsewhere (checked by size) moved into the store; their manifest entries."""
    key_files = {}
    for name, entry in ((IDS_FILE, entries["ids"]), (ID_ROWS_FILE, entries["rows"])):
        src = Path(folder) / entry["file"]
        if not src.is_file() or src.stat().st_size != entry["bytes"]:
            raise StoreError(f"{src}: missing or not the planned {entry['bytes']} bytes; rerun the job")
        os.replace(src, out / name)
        key_files[name] = {"file": name, "bytes": entry["bytes"], "sha256": entry["sha256"]}
    fsync_dir(out)
    return key_files


def write_store(out: str | Path, ids: Sequence[str], vectors, *, identity: dict, dtype: str = "float16",
                shard_size: int = 8192) -> FeatureStore:
    """A store from vectors in memory, one row per id (for small sets, fixtures and tests)."""
    out = Path(out)
    arr = to_storage(vectors, dtype)
    if len(ids) != len(arr):
        raise StoreError(f"{len(ids)} ids but {len(arr)} vectors")
    if (out / STORE_MANIFEST).exists():
        raise StoreError(f"{out}: already holds a store")
    out.mkdir(parents=True, exist_ok=True)
    layout, identity = Layout(len(arr), shard_size), _jsonable(identity)
    for k in range(layout.n_shards):
        lo, hi = layout.shard_range(k)
        write_shard(out, k, arr[lo:hi], identity)
    finalize_store(out, layout, identity=identity, dim=arr.shape[1], dtype=dtype, ids=list(ids),
                   id_rows=np.arange(len(arr)))
    return FeatureStore.open(out)


# ------------------------------------------------------------------------------------ reading
def _jsonable(obj):
    """As the manifest will hold it (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(obj))


def _short(v, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _identity_diff(got: dict, exp: dict, got_name: str, exp_name: str,
                   numerics: bool = True) -> tuple[list[str], str]:
    """The differing fields of two identities, and one line per field with both values. ``numerics``: the
    numerics both record count too (one store must not mix dtypes); absent ones agree with any."""
    missing = object()
    g, e = without_numerics(got), without_numerics(exp)
    diff = [k for k in sorted(set(e) | set(g)) if e.get(k, missing) != g.get(k, missing)]
    lines = [f"  {k}: {got_name} {_short(g.get(k, '<absent>'))}, {exp_name} {_short(e.get(k, '<absent>'))}"
             for k in diff]
    if numerics and numerics_diff(got, exp):
        diff.append(NUMERICS)
        lines.append(f"  {NUMERICS}: {got_name} {_short(got[NUMERICS])}, {exp_name} {_short(exp[NUMERICS])}")
    return diff, "\n".join(lines)


def _check_record(path: Path, record: dict | None, identity: dict, required: bool) -> None:
    """A shard's record must name the store's identity; ``required`` unless the store predates records."""
    if record is None:
        if required:
            raise StoreError(f"{path}: the shard records no encoder identity: it was not written with this "
                             "store (a shard of an older store copied in?); run `features verify`")
        return
    diff, lines = _identity_diff(record["identity"], identity, "shard written under", "store manifest has")
    if diff:
        raise IdentityMismatchError(
            f"{path}: this shard was written under another encoder identity than the store's manifest names "
            f"(differing fields: {', '.join(diff)}):\n{lines}\n  shard identity: {_short(record['identity'], 300)}"
            f"\n  manifest identity: {_short(identity, 300)}")


# Files checked in this process: (path, inode, size, mtime, sha256, identity). Forked data-loader workers
# inherit it, so a store verified before they start is not hashed again in each of them.
_VERIFIED: set[tuple] = set()


class FeatureStore:
    """Memory-mapped, read-only access to a finished store; cheap to pickle into data-loader workers.

    Rows are the unique captions (``len(store)``); ids map onto rows (``store.num_ids``).
    Arrays are opened lazily, once per process, and never loaded whole.
    """

    def __init__(self, path: Path, manifest: dict, verify_reads: bool = True):
        self.path = Path(path)
        self.manifest = manifest
        self.verify_reads = verify_reads
        self._reset()

    def _reset(self) -> None:
        self._shards: list[np.ndarray | None] = [None] * len(self.manifest["shards"])
        self._keys: np.ndarray | None = None
        self._key_rows: np.ndarray | None = None

    def __getstate__(self):  # no memory maps: workers reopen
        return {"path": str(self.path), "manifest": self.manifest, "verify_reads": self.verify_reads}

    def __setstate__(self, state):
        self.path = Path(state["path"])
        self.manifest = state["manifest"]
        self.verify_reads = state.get("verify_reads", True)
        self._reset()

    # ------------------------------------------------------------------------------- open
    @classmethod
    def open(cls, path: str | Path, identity: dict | None = None, dim: int | None = None,
             verify_reads: bool = True) -> FeatureStore:
        """Open a finished store; with ``identity`` / ``dim``, refuse one made by another encoder.

        ``verify_reads``: check each file's sha256 and each shard's identity record the first time this
        process reads it (see ``check_file``); False only to measure what the check costs."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path}: feature store not found")
        mf = path / STORE_MANIFEST
        if not mf.is_file():
            if (path / JOB_FILE).is_file() or any(path.glob("shard-*.npy")):
                raise StoreError(f"{path}: incomplete store (no {STORE_MANIFEST}): its extraction job has not "
                                 "finished; rerun it to resume")
            raise StoreError(f"{path}: not a feature store (no {STORE_MANIFEST})")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{mf}: unreadable manifest: {err}") from None
        store = cls(path, manifest, verify_reads)
        store._check_manifest()
        if identity is not None:
            store.check_identity(identity)
        if dim is not None:
            store.check_dim(dim)
        return store

    def _check_manifest(self) -> None:
        m, mf = self.manifest, self.path / STORE_MANIFEST
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{mf}: not a {FORMAT} manifest")
        if m.get("version") != VERSION:
            raise StoreError(f"{mf}: format version {m.get('version')!r}; this llm2clip reads version {VERSION}")
        for key in ("identity", "dim", "dtype", "rows", "ids", "shard_size", "shards", "keys"):
            if key not in m:
                raise StoreError(f"{mf}: field '{key}' missing")
        if m["dtype"] not in STORAGE:
            raise StoreError(f"{mf}: dtype {m['dtype']!r} is not one of {', '.join(STORAGE)}")
        try:
            ident_dim = m["identity"].get("dim")
            if ident_dim is not None and ident_dim != m["dim"]:
                raise StoreError(f"{mf}: dim {m['dim']} but the encoder identity says {ident_dim}")
            layout = Layout(int(m["rows"]), int(m["shard_size"]))
            if len(m["shards"]) != layout.n_shards or sum(s["rows"] for s in m["shards"]) != m["rows"]:
                raise StoreError(f"{mf}: the shard list does not add up to {m['rows']} rows")
            entries = [*m["shards"], m["keys"]["ids"], m["keys"]["rows"]]
            for entry in entries:
                p = self.path / entry["file"]
                if not p.is_file():
                    raise StoreError(f"{p}: file missing from the store")
                if p.stat().st_size != entry["bytes"]:
                    raise StoreError(f"{p}: {p.stat().st_size} bytes, the manifest says {entry['bytes']} "
                                     "(truncated or replaced; run verify)")
        except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError) as err:
            raise StoreError(f"{mf}: malformed manifest ({type(err).__name__}: {err})") from None

    # ---------------------------------------------------------------------------- metadata
    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        """The stored precision: float16, bfloat16 or float32."""
        return self.manifest["dtype"]

    @property
    def numpy_dtype(self) -> np.dtype:
        """What get_rows returns: the stored dtype, float32 for bfloat16 stores."""
        return np.dtype(np.float32) if self.dtype == "bfloat16" else STORAGE[self.dtype]

    @property
    def num_ids(self) -> int:
        return int(self.manifest["ids"])

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={len(self)}, ids={self.num_ids}, dim={self.dim}, {self.dtype})"

    def check_identity(self, expected: dict) -> None:
        """Raise IdentityMismatchError naming every field that differs from ``expected``; numerics that differ
        (compute dtype, batching) are a warning."""
        expected = _jsonable(expected)
        note = numerics_note(self.identity, expected, "store", "expected")
        if note:
            log.warning("%s: %s", self.path, note)
        diff, lines = _identity_diff(self.identity, expected, "store has", "expected", numerics=False)
        if diff:
            raise IdentityMismatchError(
                f"{self.path}: made by another encoder than the one expected; differing fields: "
                f"{', '.join(diff)}\n" + lines)

    def check_dim(self, dim: int) -> None:
        if int(dim) != self.dim:
            raise StoreError(f"{self.path}: vectors are {self.dim}-d, expected {dim}-d")

    def check_file(self, entry: dict, shard: bool, force: bool = False) -> Path:
        """Check one file of the manifest: present, its sha256, and for a shard its identity record and shape.

        Done once per process and file (``force``: again). Stores written before shards carried an
        identity record are checked by their sha256 alone, which every manifest of this format holds:
        that still refuses a swapped or foreign shard, only without naming the encoder it came from."""
        p = self.path / entry["file"]
        try:
            st = p.stat()
        except OSError:
            raise StoreError(f"{p}: file missing from the store") from None
        key = (str(p.absolute()), st.st_ino, st.st_size, st.st_mtime_ns, entry["sha256"],
               json.dumps(self.identity, sort_keys=True) if shard else None)
        if key in _VERIFIED and not force:
            return p
        digest = file_sha256(p)
        if shard:  # a foreign shard's record names its encoder: a clearer error than its checksum
            try:
                shape, dt, record = _shard_header(p)
                _check_record(p, record, self.identity, required=bool(self.manifest.get(RECORD_FIELD)))
            except IdentityMismatchError:
                raise
            except StoreError:
                if digest == entry["sha256"]:
                    raise
        if digest != entry["sha256"]:  # a damaged record falls through to here
            raise StoreError(f"{p}: checksum mismatch (corrupt or replaced): sha256 {digest[:16]}..., the manifest "
                             f"records {entry['sha256'][:16]}...; `llm2clip features verify {self.path}` "
                             "checks every file")
        if shard and (shape != (entry["rows"], self.dim) or dt != STORAGE[self.dtype]):
            raise StoreError(f"{p}: shape {shape} {dt}, expected {(entry['rows'], self.dim)} {STORAGE[self.dtype]}")
        _VERIFIED.add(key)
        return p

    # ------------------------------------------------------------------------------- access
    def _shard(self, k: int) -> np.ndarray:
        arr = self._shards[k]
        if arr is None:
            entry = self.manifest["shards"][k]
            p = self.check_file(entry, shard=True) if self.verify_reads else self.path / entry["file"]
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise StoreError(f"{p}: cannot read shard: {err}") from None
            if arr.shape != (entry["rows"], self.dim) or arr.dtype != STORAGE[self.dtype]:
                raise StoreError(f"{p}: shape {arr.shape} {arr.dtype}, the manifest says "
                                 f"{(entry['rows'], self.dim)} {STORAGE[self.dtype]}")
            self._shards[k] = arr
        return arr

    def get_rows(self, rows, dtype=None) -> np.ndarray:
        """Vectors [n, D] of the given rows, in the given order (a copy; the store stays on disk)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            bad = rows[(rows < 0) | (rows >= n)][0]
            raise StoreError(f"{self.path}: row {bad} out of range [0, {n})")
        out = np.empty((rows.size, self.dim), dtype=STORAGE[self.dtype])
        if rows.size:
            size = int(self.manifest["shard_size"])
            shard, local = np.divmod(rows, size)
            order = np.argsort(shard, kind="stable")
            cuts = np.flatnonzero(np.diff(shard[order])) + 1
            for group in np.split(order, cuts):
                out[group] = self._shard(int(shard[group[0]]))[local[group]]
        out = from_storage(out, self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _load_keys(self) -> tuple[np.ndarray, np.ndarray]:
        if self._keys is None:
            k = self.manifest["keys"]
            if self.verify_reads:
                for entry in k.values():
                    self.check_file(entry, shard=False)
            try:
                self._keys = np.load(self.path / k["ids"]["file"], mmap_mode="r", allow_pickle=False)
                self._key_rows = np.load(self.path / k["rows"]["file"], mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise StoreError(f"{self.path}: cannot read the id files: {err}") from None
            if len(self._keys) != self.num_ids or len(self._key_rows) != self.num_ids:
                raise StoreError(f"{self.path}: the id files do not hold {self.num_ids} ids")
        return self._keys, self._key_rows

    def _find(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found mask) by binary search in the sorted, memory-mapped id file."""
        if isinstance(ids, str):
            raise TypeError("ids must be a list of strings, not one string")
        keys, key_rows = self._load_keys()
        encoded = []
        for i in ids:
            if not isinstance(i, str):
                raise TypeError(f"caption ids are strings, got {type(i).__name__}: {i!r}")
            encoded.append(i.encode("utf-8"))
        width = keys.dtype.itemsize
        fits = np.array([len(b) <= width and not b.endswith(b"\0") for b in encoded], dtype=bool)
        q = np.array([b if f else b"" for b, f in zip(encoded, fits)], dtype=keys.dtype)
        if len(keys) == 0 or q.size == 0:
            return np.zeros(q.size, np.int64), np.zeros(q.size, bool)
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        found = fits & (keys[pos] == q)
        return np.asarray(key_rows[pos], dtype=np.int64), found

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        if isinstance(ids, str):
            raise TypeError("ids must be a list of strings, not one string")
        ids = list(ids)
        rows, found = self._find(ids)
        if not found.all():
            missing = [ids[i] for i in np.flatnonzero(~found)]
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise MissingIdError(f"{self.path}: {len(missing)} caption id(s) not in the store: "
                                 f"{', '.join(map(repr, missing[:5]))}{more}", missing)
        return rows

    def row_of(self, id: str) -> int:
        return int(self.rows_of([id])[0])

    def __contains__(self, id: str) -> bool:
        return isinstance(id, str) and bool(self._find([id])[1][0])

    def get_by_ids(self, ids: Sequence[str], dtype=None) -> np.ndarray:
        """Vectors [n, D] of the given caption ids, in order; a missing id is an error."""
        return self.get_rows(self.rows_of(ids), dtype=dtype)

    # ------------------------------------------------------------------------------ checks
    def verify(self, progress: bool | None = False) -> dict:
        """Recompute every file's sha256, shape and identity record; raise StoreError listing each bad file.
        Files that pass are not checked again by reads in this process (nor in workers forked after)."""
        from tqdm.auto import tqdm

        entries = self._files()
        bad = []
        for entry, shard in tqdm(entries, desc="verify", unit="file",
                                 disable=not progress if progress is not None else None):
            try:
                self.check_file(entry, shard=shard, force=True)
            except StoreError as err:
                bad.append(str(err))
        if bad:
            raise StoreError(f"{self.path}: {len(bad)} bad file(s):\n  " + "\n  ".join(bad))
        return {"files": len(entries), "rows": len(self), "ids": self.num_ids,
                "bytes": sum(e["bytes"] for e, _ in entries)}

    def _files(self) -> list[tuple[dict, bool]]:
        """(manifest entry, is a shard) of every file the store reads."""
        return [(e, True) for e in self.manifest["shards"]] + [(e, False) for e in self.manifest["keys"].values()]

    def check_all(self) -> None:
        """Check every file now, once per process (as reads would): before DataLoader workers fork, so that
        each of them does not hash the whole store again."""
        if self.verify_reads:
            for entry, shard in self._files():
                self.check_file(entry, shard=shard)

    def disk_bytes(self) -> int:
        """Bytes of every file of the store, manifest included."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def iter_shards(self) -> Iterable[tuple[int, np.ndarray]]:
        """(first row, stored array) per shard, memory-mapped: for sequential scans."""
        for k in range(len(self.manifest["shards"])):
            yield k * int(self.manifest["shard_size"]), self._shard(k)
