"""The embed job's plan, made in bounded memory: which caption text is which row, and every id's row.

The same result as ``extract.read_captions`` (rows are the unique texts in first-seen order; an id given twice
must carry the same caption) without holding the captions, their ids or a dedup set in Python: every stage
works on one chunk or one bucket file at a time, so memory is set by ``chunk`` and ``part`` and not by the
number of captions. Stages, all on disk in the plan folder:

1. stream the sources once: texts and ids appended to blob files; (hash, seq) records routed to hash buckets;
2. per id-hash bucket: repeated ids (same caption: skipped, as before; another caption: the error of old);
3. per text-hash bucket: each record's first record with an equal text (``first``);
4. per seq-range bucket of ``first``: a row per first record, in first-seen order (a running count);
5. per seq-range bucket of the record: every record's row in stream order, written sequentially with the
   unique texts in row order (what the shards embed) and the captions' fingerprint;
6. ids with their rows routed to id-range buckets (splitters from a sample), each sorted alone and appended:
   ``ids.npy`` / ``id_rows.npy`` of the store's format, byte for byte, never whole in memory.

Hashes (64-bit BLAKE2b) only route and group; equal hashes are confirmed on the bytes, so a collision cannot
merge two texts or ids. The plan is complete once ``plan.json`` exists; other ranks read their shards' texts
from it by offset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import write_json_atomic

PLAN_FILE = "plan.json"
KEY_IDS, KEY_ROWS = "ids.npy", "id_rows.npy"
CHUNK = 1 << 16  # records buffered in Python while streaming the sources
PART = 1 << 18  # records per seq-range or id-range bucket
HASH_BUCKETS = 256  # text- and id-hash buckets (records per bucket: N / 256)
SAMPLE = 1 << 13  # ids kept to choose the id-range splitters

Records = Callable[[], Iterator[tuple[str, str, str]]]

_U8 = np.dtype("<u8")
_I8 = np.dtype("<i8")
_TEXT_REC = np.dtype([("h", "<u8"), ("s", "<i8")])
_ID_REC = np.dtype([("h", "<u8"), ("t", "<u8"), ("s", "<i8")])
_FIRST_REC = np.dtype([("f", "<i8"), ("s", "<i8")])
_ROW_REC = np.dtype([("s", "<i8"), ("r", "<i8")])


def _hashes(items: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(hashlib.blake2b(b, digest_size=8).digest() for b in items), dtype=_U8)


class _Spill:
    """Fixed-width records routed to bucket files, appended chunk by chunk, read back one bucket at a time."""

    OPEN = 128  # bucket files kept open while writing (opening one per chunk costs more than the write)

    def __init__(self, folder: Path, name: str, dtype: np.dtype, spills: list | None = None):
        self.folder, self.dtype = str(folder / name), dtype
        self._open: dict[int, object] = {}
        os.makedirs(self.folder, exist_ok=True)
        if spills is not None:
            spills.append(self)  # closed together when planning stops

    def _path(self, k: int) -> str:
        return os.path.join(self.folder, f"{k:06d}")  # not pathlib: it interns every name it parses

    def add(self, bucket: np.ndarray, recs: np.ndarray) -> None:
        if not len(recs):
            return
        order = np.argsort(bucket, kind="stable")
        bucket, recs = bucket[order], recs[order]
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(bucket)]):
            k = int(bucket[lo])
            f = self._open.get(k)
            if f is None:
                if len(self._open) >= self.OPEN:
                    self.close()
                f = self._open[k] = open(self._path(k), "ab")
            f.write(recs[lo:hi].tobytes())

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def load(self, k: int) -> np.ndarray:
        self.close()  # written: flush what is buffered
        p = self._path(k)
        return np.fromfile(p, dtype=self.dtype) if os.path.isfile(p) else np.empty(0, self.dtype)

    def drop(self, k: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(k))


class _Blob:
    """Variable-length byte strings: ``<name>.bin`` holds them back to back, ``<name>.end`` each one's end."""

    def __init__(self, folder: Path, name: str):
        self.bin, self.end = folder / f"{name}.bin", folder / f"{name}.end"
        self._fd: tuple[int, int] | None = None

    def writer(self) -> _BlobWriter:
        return _BlobWriter(self)

    def _fds(self) -> tuple[int, int]:
        if self._fd is None:
            self._fd = (os.open(self.bin, os.O_RDONLY), os.open(self.end, os.O_RDONLY))
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            for fd in self._fd:
                os.close(fd)
            self._fd = None

    def get(self, i: int) -> bytes:
        """One item by index (pread: no memory map whose pages would count as this process's memory)."""
        b, e = self._fds()
        lo = 0 if i == 0 else int(np.frombuffer(os.pread(e, 8, (i - 1) * 8), _U8)[0])
        hi = int(np.frombuffer(os.pread(e, 8, i * 8), _U8)[0])
        return os.pread(b, hi - lo, lo)

    def slice(self, lo: int, hi: int) -> list[bytes]:
        """Items lo..hi-1, read sequentially."""
        if hi <= lo:
            return []
        b, e = self._fds()
        first = 0 if lo == 0 else 1
        ends = np.frombuffer(os.pread(e, 8 * (hi - lo + first), (lo - first) * 8), _U8).astype(np.int64)
        if first:
            start, ends = int(ends[0]), ends[1:]
        else:
            start = 0
        data = os.pread(b, int(ends[-1]) - start, start)
        ends = (ends - start).tolist()
        return [data[s:t] for s, t in zip([0, *ends[:-1]], ends)]


class _BlobWriter:
    def __init__(self, blob: _Blob):
        self.bin, self.end, self.pos = open(blob.bin, "wb"), open(blob.end, "wb"), 0

    def add(self, items: list[bytes]) -> None:
        if not items:
            return
        ends = np.cumsum(np.fromiter(map(len, items), np.int64, len(items))) + self.pos
        self.bin.write(b"".join(items))
        ends.astype(_U8).tofile(self.end)
        self.pos = int(ends[-1])

    def close(self) -> None:
        self.bin.close()
        self.end.close()


@dataclass
class Plan:
    """A finished plan on disk (``folder/plan.json``): counts, fingerprint, the key files, the rows' texts."""

    folder: Path
    rows: int
    ids: int
    records: int
    repeated_ids: int
    fingerprint: str
    keys: dict  # {"ids": {"file", "bytes", "sha256"}, "rows": {...}} of the plan's id files

    @classmethod
    def open(cls, folder: str | Path) -> Plan:
        folder = Path(folder)
        info = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8"))
        return cls(folder, **info)

    def texts(self, lo: int, hi: int) -> list[str]:
        """The texts of rows lo..hi-1 (a shard's)."""
        blob = _Blob(self.folder, "rows")
        try:
            return [b.decode("utf-8") for b in blob.slice(lo, hi)]
        finally:
            blob.close()


def _where(records: Records, seqs: Iterable[int]) -> dict[int, str]:
    """'file:line' of the given records (for an error: the sources are read once more, up to the last)."""
    want, out = set(seqs), {}
    for s, (_, _, where) in enumerate(records()):
        if s in want:
            out[s] = where
            if len(out) == len(want):
                break
    return out


def plan_captions(records: Records, folder: str | Path, *, empty: str = "no captions",
                  chunk: int = CHUNK, part: int = PART, hash_buckets: int = HASH_BUCKETS,
                  sample: int = SAMPLE) -> Plan:
    """Plan the captions ``records()`` yields ((id, text, where), validated) into the empty or stale folder
    ``folder`` (cleared first). ``chunk``, ``part``, ``hash_buckets``, ``sample``: memory knobs (the result
    does not depend on them). On an input error (or any other) the folder is removed: no scratch left behind."""
    try:
        return _plan_captions(records, Path(folder), empty, chunk, part, hash_buckets, sample)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _plan_captions(records: Records, folder: Path, empty: str, chunk: int, part: int, hash_buckets: int,
                   sample: int) -> Plan:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    bits = max(1, int(hash_buckets - 1).bit_length())
    shift, hash_buckets = np.uint64(64 - bits), 1 << bits  # a bucket per top-bits value of the hash

    # 1. stream: blobs of texts and ids in record order; hash records routed to buckets
    texts, ids = _Blob(folder, "texts"), _Blob(folder, "ids")
    tw, iw = texts.writer(), ids.writer()
    spills: list[_Spill] = []
    by_text = _Spill(folder, "by-text", _TEXT_REC, spills)
    by_id = _Spill(folder, "by-id", _ID_REC, spills)
    n, width, stride, kept = 0, 1, 1, []
    buf_t: list[bytes] = []
    buf_i: list[bytes] = []

    def flush() -> None:
        nonlocal width, stride, kept
        if not buf_t:
            return
        lo = n - len(buf_t)
        seq = np.arange(lo, n, dtype=np.int64)
        th, ih = _hashes(buf_t), _hashes(buf_i)
        tw.add(buf_t)
        iw.add(buf_i)
        tr = np.empty(len(seq), _TEXT_REC)
        tr["h"], tr["s"] = th, seq
        by_text.add(th >> shift, tr)
        ir = np.empty(len(seq), _ID_REC)
        ir["h"], ir["t"], ir["s"] = ih, th, seq
        by_id.add(ih >> shift, ir)
        width = max(width, *map(len, buf_i))
        # every stride-th id, the stride doubling when the sample is full: bounded and deterministic
        kept += buf_i[-lo % stride::stride]
        while len(kept) > 2 * sample:
            kept, stride = kept[::2], stride * 2
        buf_t.clear()
        buf_i.clear()

    try:
        for cid, text, where in records():
            try:
                buf_i.append(cid.encode("utf-8"))
                buf_t.append(text.encode("utf-8"))
            except UnicodeEncodeError as err:  # e.g. a lone surrogate, valid in JSON ("\ud800"), not in UTF-8
                raise InputError(f"{where}: not encodable as UTF-8 ({err.reason} at {err.start})") from None
            n += 1
            if len(buf_t) >= chunk:
                flush()
        flush()
    finally:
        tw.close()
        iw.close()
        by_text.close()
        by_id.close()
    if n == 0:
        raise InputError(empty)
    span = max(1, min(part, n))
    n_ranges = -(-n // span)

    # 2. repeated ids: the same caption again is skipped; another caption is an error
    rows_blob = None
    repeats = _Spill(folder, "repeats", _I8, spills)
    n_repeats, conflict = 0, None
    try:
        for k in range(hash_buckets):
            rec = by_id.load(k)  # in record order
            if not len(rec):
                continue
            rec = rec[np.argsort(rec["h"], kind="stable")]
            same = np.flatnonzero(rec["h"][1:] == rec["h"][:-1]) + 1
            rep: list[int] = []
            for lo, hi in _runs(same):
                seen: dict[bytes, int] = {}
                for j in range(lo, hi):
                    s = int(rec["s"][j])
                    first = seen.setdefault(ids.get(s), j)
                    if first == j:
                        continue
                    f = int(rec["s"][first])
                    if rec["t"][first] == rec["t"][j] and texts.get(f) == texts.get(s):
                        rep.append(s)
                    elif conflict is None or s < conflict[0]:
                        conflict = (s, f)
            if rep:
                r = np.asarray(rep, np.int64)
                repeats.add(r // span, r)
                n_repeats += len(rep)
            by_id.drop(k)
        if conflict is not None:
            s, f = conflict
            where = _where(records, conflict)
            raise InputError(f"{where[s]}: id {ids.get(s).decode('utf-8')!r} was given at {where[f]} with a "
                             "different caption")

        # 3. each record's first record with an equal text, routed by that first record's seq range
        firsts = _Spill(folder, "firsts", _FIRST_REC, spills)
        for k in range(hash_buckets):
            rec = by_text.load(k)
            if not len(rec):
                continue
            rec = rec[np.argsort(rec["h"], kind="stable")]  # seq order within equal hashes
            out = np.empty(len(rec), _FIRST_REC)
            out["s"] = rec["s"]
            start = np.r_[True, rec["h"][1:] != rec["h"][:-1]]
            out["f"] = rec["s"][np.maximum.accumulate(np.where(start, np.arange(len(rec)), 0))]
            for lo, hi in _runs(np.flatnonzero(~start)):  # equal hashes: confirm on the bytes
                seen = {}
                for j in range(lo, hi):
                    out["f"][j] = seen.setdefault(texts.get(int(rec["s"][j])), int(rec["s"][j]))
            firsts.add(out["f"] // span, out)
            by_text.drop(k)

        # 4. rows: first records in record order get 0, 1, 2, ...; every record its first record's row
        rows_of = _Spill(folder, "rows-of", _ROW_REC, spills)
        n_rows = 0
        for k in range(n_ranges):
            rec = firsts.load(k)
            uniq = np.unique(rec["f"])
            out = np.empty(len(rec), _ROW_REC)
            out["s"], out["r"] = rec["s"], n_rows + np.searchsorted(uniq, rec["f"])
            rows_of.add(out["s"] // span, out)
            n_rows += len(uniq)
            firsts.drop(k)

        # 5. in record order: the unique texts in row order, each record's row (-1: a repeated id)
        digest = hashlib.sha256()
        rows_blob = _Blob(folder, "rows").writer()
        top = -1
        with open(folder / "record_rows.i8", "wb") as rr:
            for k in range(n_ranges):
                lo, hi = k * span, min(n, (k + 1) * span)
                rec = rows_of.load(k)
                rec = rec[np.argsort(rec["s"])]
                if len(rec) != hi - lo or (rec["s"] != np.arange(lo, hi)).any():
                    raise RuntimeError(f"plan: records {lo}-{hi - 1} incomplete")  # a bug, not an input error
                row = rec["r"]
                new = row > np.maximum.accumulate(np.r_[top, row])[:-1]
                top = max(top, int(row.max()))
                idx = np.flatnonzero(new)
                for a in range(0, hi - lo, chunk):  # texts read a chunk at a time: what Python holds
                    sel = idx[(idx >= a) & (idx < a + chunk)] - a
                    if len(sel):
                        got = texts.slice(lo + a, min(hi, lo + a + chunk))
                        unique = [got[i] for i in sel.tolist()]
                        rows_blob.add(unique)
                        digest.update(b"".join(t + b"\0" for t in unique))
                row = row.copy()
                row[repeats.load(k) - lo] = -1
                row.tofile(rr)
                rows_of.drop(k)
                repeats.drop(k)
        rows_blob.close()
        digest.update(b"\1")
        n_ids = n - n_repeats

        # 6. ids with rows, to id-range buckets by splitters, each sorted alone: the store's id files
        key_dt = np.dtype(f"S{width}")
        pair = np.dtype([("k", key_dt), ("r", "<i8")])
        n_id_ranges = max(1, -(-n_ids // part))
        kept_arr = np.sort(np.array(kept, dtype=key_dt))
        splitters = kept_arr[(np.arange(1, n_id_ranges) * len(kept_arr)) // n_id_ranges]
        by_key = _Spill(folder, "by-key", pair, spills)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            row = np.fromfile(folder / "record_rows.i8", dtype=_I8, count=hi - lo, offset=lo * 8)
            keep = np.flatnonzero(row >= 0)
            chunk_ids = ids.slice(lo, hi)
            mine = [chunk_ids[i] for i in keep.tolist()]
            r = row[keep]
            digest.update(b"".join(b + b"\0" + str(x).encode() + b"\0" for b, x in zip(mine, r.tolist())))
            out = np.empty(len(mine), pair)
            out["k"], out["r"] = mine, r
            by_key.add(np.searchsorted(splitters, out["k"], side="right"), out)
        keys = _write_keys(folder, by_key, n_id_ranges, n_ids, key_dt)
    finally:
        texts.close()
        ids.close()
        for spill in spills:
            spill.close()
        if rows_blob is not None:  # closed already unless step 5 raised
            rows_blob.close()
    plan = Plan(folder, rows=n_rows, ids=n_ids, records=n, repeated_ids=n_repeats, fingerprint=digest.hexdigest(),
                keys=keys)
    for name in ("texts.bin", "texts.end", "ids.bin", "ids.end", "record_rows.i8"):
        (folder / name).unlink(missing_ok=True)
    for name in ("by-text", "by-id", "repeats", "firsts", "rows-of", "by-key"):
        shutil.rmtree(folder / name, ignore_errors=True)
    write_json_atomic(folder / PLAN_FILE, {k: v for k, v in plan.__dict__.items() if k != "folder"}, indent=1)
    return plan


def _runs(later: np.ndarray) -> Iterator[tuple[int, int]]:
    """(lo, hi) of each run of equal neighbours, given the sorted indices j where item j equals item j - 1."""
    if not len(later):
        return
    breaks = np.flatnonzero(np.diff(later) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(later)]):
        yield int(later[a]) - 1, int(later[b - 1]) + 1


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


def _write_keys(folder: Path, by_key: _Spill, n_ranges: int, n_ids: int, key_dt: np.dtype) -> dict:
    """Sorted ids and their rows as .npy files (the format ``store.finalize_store`` writes from memory)."""
    paths = {"ids": folder / KEY_IDS, "rows": folder / KEY_ROWS}
    files = {name: open(p, "wb") for name, p in paths.items()}
    digests = {name: hashlib.sha256() for name in paths}
    sizes = dict.fromkeys(paths, 0)

    def put(name: str, data: bytes) -> None:
        files[name].write(data)
        digests[name].update(data)
        sizes[name] += len(data)

    try:
        put("ids", _npy_header(key_dt, n_ids))
        put("rows", _npy_header(_I8, n_ids))
        last, written = None, 0
        for k in range(n_ranges):
            rec = by_key.load(k)
            if not len(rec):
                continue
            rec = rec[np.argsort(rec["k"], kind="stable")]
            k_sorted = rec["k"]
            if (k_sorted[1:] == k_sorted[:-1]).any() or (last is not None and k_sorted[0] <= last):
                raise RuntimeError("plan: an id twice in the id files")  # ruled out by stage 2
            put("ids", k_sorted.tobytes())
            put("rows", np.ascontiguousarray(rec["r"]).astype(_I8).tobytes())
            last, written = k_sorted[-1], written + len(rec)
            by_key.drop(k)
        if written != n_ids:
            raise RuntimeError(f"plan: {written} ids written, {n_ids} expected")
    finally:
        for f in files.values():
            f.close()
    return {name: {"file": paths[name].name, "bytes": sizes[name], "sha256": digests[name].hexdigest()}
            for name in paths}
