"""Webdataset tar shards: writing them from image records, and streaming them into stage-2 training.

Format (webdataset's conventions, so the ``webdataset`` package reads these shards as they are): the
members of a sample share a key (``<key>.<ext>``); a sample holds one image (``jpg``, ``jpeg``, ``png``
or ``webp``) and a ``json`` with the manifest's caption list::

    {"image": "a.jpg", "captions": [{"id": "c1", "kind": "dense", "text": "..."}, ...]}   (text optional)

Captions are joined with the feature store by id, as for manifests. A folder written by
``write_shards`` also holds ``shards.json`` (the shard list with sample counts).

Shards may be URLs (``s3://``, ``gs://``, ``https://``, ... through fsspec, or ``pipe:CMD``): each is fetched
whole, sequentially, into a local spool and then read like a local file (``ShardFetcher``).

Reading uses plain ``tarfile`` with an index of member offsets rather than webdataset's pipeline:
the order must be a pure function of (seed, epoch, rank) and a position, so that ``--resume``
continues exactly and every DataLoader worker knows where each batch starts, which webdataset's
shuffle buffers and shard splitting do not give. The stream of rank ``r`` (see ``ShardStream``):
epoch ``e`` permutes the shards (seed, e), rank r takes every world-th one, consecutive groups of
``shuffle_shards`` shards have their samples permuted together, and batches are consecutive runs
of that stream. Its position is (epoch, group, offset), saved per rank in checkpoints.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..distributed import pin_memory
from ..errors import ConfigError, InputError
from ..fileio import image_errors, open_image, prepare_output_dir, publish_dir
from ..jobs import Job
from .images import Caption, Record, batch_texts

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARDS_MANIFEST = "shards.json"
SHARDS_FORMAT = "llm2clip-shards/1"
_DECODE_ERRORS = image_errors()  # what PIL raises for corrupt, truncated or oversized images


# ------------------------------------------------------------------------------------ shard lists
def is_url(item: str | Path) -> bool:
    """A shard fetched through fsspec (``s3://``, ``gs://``, ``https://``, ``memory://``...) or a ``pipe:CMD``."""
    s = str(item)
    return s.startswith("pipe:") or ("://" in s and not s.startswith("file://"))


def expand_shards(spec: str | Sequence[str]) -> list[Path | str]:
    """Tar files of a folder (its shards.json, else its *.tar), a brace pattern, or a list of either.
    Local files come back as Paths (``file://`` ones too), remote shards (``is_url``) as their URLs."""
    from webdataset.shardlists import expand_urls  # webdataset's own pattern syntax ({a..b}, {x,y}, '::')

    out: list[Path | str] = []
    for item in ([spec] if isinstance(spec, str) else list(spec)):
        p = Path(item)
        if not is_url(item) and p.is_dir():
            idx = p / SHARDS_MANIFEST
            names = ([s["url"] for s in json.loads(idx.read_text())["shards"]] if idx.is_file()
                     else sorted(q.name for q in p.glob("*.tar")))
            if not names:
                raise InputError(f"{p}: no shards ({SHARDS_MANIFEST} or *.tar)")
            out.extend(p / n for n in names)
        else:
            out.extend(u if is_url(u) else Path(u.removeprefix("file://")) for u in expand_urls(str(item)))
    missing = [str(p) for p in out if isinstance(p, Path) and not p.is_file()]
    if missing:
        raise InputError(f"shard(s) not found: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if not out:
        raise InputError(f"no shards in {spec!r}")
    return out


def spool_size(shuffle_shards: int) -> int:
    """Remote shards a stream keeps spooled: its current and next group, and one spare each; an evicted
    shard needed again (a worker far behind) is fetched again, so this bounds disk, not correctness."""
    return 2 * shuffle_shards + 2


def _remove_spool(folder: Path, pid: int) -> None:
    if os.getpid() == pid:  # not a DataLoader worker's forked copy
        shutil.rmtree(folder, ignore_errors=True)


def _fetch_quietly(fetcher: ShardFetcher, urls: list) -> None:
    try:
        for url in urls:
            if isinstance(url, str):
                fetcher.local(url)
    except OSError:  # e.g. the spool removed at shutdown; a real failure is met again when the shard is read
        pass


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:  # evicted meanwhile by another worker
        return 0.0


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed fetch raises: OS and timeout errors (a command's exit status, a 404, a reset connection),
    a stream cut short, and aiohttp's client errors where it is installed."""
    errors: tuple[type[BaseException], ...] = (OSError, TimeoutError, EOFError)
    try:
        import aiohttp
    except ImportError:
        return errors
    return (*errors, aiohttp.ClientError)


class ShardFetcher:
    """Local copies of remote shards, fetched whole and sequentially into a spool folder.

    The seeded order shuffles the samples of several shards together and resume seeks to a sample,
    so a shard is read by offsets, as local ones are: each remote tar is streamed once (bounded memory:
    1 MiB at a time, no range requests needed, so plain HTTP servers and ``pipe:`` commands work) into
    the spool, then indexed and read there. The spool is shared by the DataLoader workers of a stream
    (a lock per shard: one download each) and keeps the ``keep`` most recently used shards (None: all).
    A failed fetch (dropped connection, command error) is retried ``retries`` times, then the shard is
    marked failed: it reads as empty for the rest of this process, and ``failed()`` counts it. The
    spool is a new folder under ``folder`` (default: the system temp folder), removed with the fetcher.
    """

    CHUNK = 1 << 20

    def __init__(self, folder: str | Path | None = None, keep: int | None = None, retries: int = 3,
                 storage_options: dict | None = None, timeout: float = 60.0):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="llm2clip-shards-", dir=folder))
        self.keep, self.retries, self.timeout = keep, retries, timeout
        self.storage_options = dict(storage_options or {})
        # removed when the fetcher goes (or at exit), by the process that made it only
        weakref.finalize(self, _remove_spool, self.folder, os.getpid())

    def _name(self, url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:24]

    def failed(self) -> int:
        return sum(1 for _ in self.folder.glob("*.failed"))

    def failed_urls(self) -> set[str]:
        """The shards given up on in this process (each mark holds its URL)."""
        return {m.read_text() for m in self.folder.glob("*.failed")}

    def local(self, url: str) -> Path | None:
        """The spooled copy of ``url`` (fetched now if needed), or None once it has failed."""
        name = self._name(url)
        dest, mark = self.folder / f"{name}.tar", self.folder / f"{name}.failed"
        with open(self.folder / f"{name}.lock", "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per shard, however many workers ask
            try:
                os.utime(dest)  # recently used: evicted last
                return dest
            except FileNotFoundError:  # not fetched yet, or evicted meanwhile by another worker
                pass
            if mark.is_file():
                return None
            for attempt in range(self.retries + 1):
                tmp = dest.with_suffix(".part")
                try:
                    with open(tmp, "wb") as out:
                        self._copy(url, out)
                    os.replace(tmp, dest)
                    break
                except _transport_errors() as err:  # retried, then the shard skipped (other errors are bugs)
                    tmp.unlink(missing_ok=True)
                    if attempt == self.retries or isinstance(err, FileNotFoundError):  # a 404 stays one
                        log.warning("%s: skipped after %d failed %s (%s)", url, attempt + 1,
                                    "tries" if attempt else "try",
                                    " ".join(str(err).split())[:200] or type(err).__name__)
                        mark.write_text(url)
                        return None
                    log.info("%s: try %d failed (%s); fetching again", url, attempt + 1, type(err).__name__)
                    time.sleep(min(0.1 * 2**attempt, 5.0))
        self._evict(dest)
        return dest

    def _copy(self, url: str, out) -> None:
        if url.startswith("pipe:"):
            proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
            try:
                shutil.copyfileobj(proc.stdout, out, self.CHUNK)
            finally:
                proc.stdout.close()
                rc = proc.wait()
            if rc:
                raise OSError(f"the command exited with status {rc}")
            return
        import fsspec

        opts = dict(self.storage_options)
        if url.split("://", 1)[0] in ("http", "https"):
            opts.setdefault("block_size", 0)  # one streamed GET: no range requests, which plain servers lack
            if "client_kwargs" not in opts:
                import aiohttp  # fsspec's http transport; a stalled server times out rather than hangs

                opts["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                                                          sock_read=self.timeout)}
        with fsspec.open(url, "rb", **opts) as f:
            shutil.copyfileobj(f, out, self.CHUNK)

    def _evict(self, just: Path) -> None:
        if self.keep is None:
            return
        spooled = sorted((p for p in self.folder.glob("*.tar") if p != just), key=_mtime)
        for p in spooled[: max(0, len(spooled) + 1 - self.keep)]:
            p.unlink(missing_ok=True)  # a worker still reading it keeps its open file


# ------------------------------------------------------------------------------------ reading
def _split(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext  # the same key/extension split as webdataset readers

    key, ext = base_plus_ext(name)
    return key, (ext.lower() if ext else None)


def index_shard(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (data offset, size)})] in file order. A damaged tail ends the index there (warned)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tf:  # uncompressed only: offsets must address the file
            for ti in tf:
                if not ti.isfile():
                    continue
                key, ext = _split(ti.name)
                if key is not None:
                    samples.setdefault(key, {})[ext] = (ti.offset_data, ti.size)
    except (tarfile.TarError, OSError) as err:
        log.warning("%s: unreadable after %d samples (%s); the rest of the shard is skipped", path, len(samples), err)
    return list(samples.items())


def _read(f, span: tuple[int, int]) -> bytes:
    f.seek(span[0])
    data = f.read(span[1])
    if len(data) != span[1]:
        raise OSError("truncated member")
    return data


def decode_image(data: bytes) -> Image.Image:
    """Decoded now, so a corrupt image fails here (one of ``_DECODE_ERRORS``) and is skipped."""
    return open_image(data)


def _image_span(members: dict) -> tuple[int, int] | None:
    return next((members[e] for e in IMAGE_EXTS if e in members), None)


def parse_captions(data: bytes, where: str) -> dict[str, list[Caption]]:
    """The caption list of a sample's JSON. Unparseable bytes raise ValueError (a corrupt sample, skipped);
    parseable JSON of another layout is an InputError (a data set this reader does not understand)."""
    row = json.loads(data.decode("utf-8"))
    caps = row.get("captions") if isinstance(row, dict) else None
    if not isinstance(caps, list) or not caps:
        raise InputError(f"{where}: the sample's json needs a non-empty list 'captions' of "
                         '{"id": ..., "kind": ..., "text": ...} (see llm2clip.data.shards)')
    out: dict[str, list[Caption]] = {}
    for c in caps:
        if not isinstance(c, dict) or not isinstance(c.get("id"), str) or not isinstance(c.get("kind"), str):
            raise InputError(f"{where}: each caption needs string fields 'id' and 'kind'")
        out.setdefault(c["kind"], []).append(Caption(c["id"], c.get("text")))
    return out


def load_shard_records(shards: Sequence[Path | str], fetcher: ShardFetcher | None = None,
                       ) -> tuple[list[Record], Callable[[int], Image.Image]]:
    """Every sample as a Record (image = its index) and an image loader: for validation sets and in-memory
    caption encoding, which need all captions up front. Samples with an unreadable json are left out.
    Remote shards are spooled whole by ``fetcher`` (a new one, keeping all, by default)."""
    if fetcher is None and any(is_url(s) for s in shards):
        fetcher = ShardFetcher()
    refs: list[tuple[Path, tuple[int, int] | None]] = []
    records: list[Record] = []
    dropped = 0
    where = str(shards[0]).rsplit("/", 1)[0]
    for shard in shards:
        path = fetcher.local(str(shard)) if is_url(shard) else Path(shard)
        if path is None:
            continue
        with open(path, "rb") as f:
            for key, members in index_shard(path):
                try:
                    caps = parse_captions(_read(f, members["json"]), f"{shard}:{key}")
                except (KeyError, OSError, ValueError):
                    dropped += 1
                    continue
                records.append(Record(len(refs), caps))
                refs.append((path, _image_span(members)))
    if dropped:
        log.warning("%d samples without a readable json were left out of %s", dropped, where)
    if not records:
        raise InputError(f"no samples in {len(shards)} shard(s) under {where}")

    def load(i: int, fetcher=fetcher) -> Image.Image:  # (holds the spool of remote shards)
        path, span = refs[i]
        if span is None:
            raise OSError("the sample has no image")
        with open(path, "rb") as f:
            return decode_image(_read(f, span))

    return records, load


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(list(keys))


@dataclass
class StreamPosition:
    """The next sample of a rank's stream: group ``group`` of epoch ``epoch``, ``offset`` samples in."""

    epoch: int = 0
    group: int = 0
    offset: int = 0

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "group": self.group, "offset": self.offset}


class ShardStream(torch.utils.data.IterableDataset):
    """Micro-batches ``(images, texts, skipped, position)`` of one rank, from ``start`` on.

    The order is a pure function of (seed, epoch, world, rank); see the module docstring. Batch ``i``
    of the stream is made by DataLoader worker ``i % num_workers``; every worker walks the tar indexes
    of the whole stream so it knows where its batches start, and decodes only its own. An unreadable
    sample (image or json) is replaced by the next readable one of its group and counted in
    ``skipped``, so the position never depends on what could be decoded. ``position`` is where the
    stream continues after the batch (with ``skipped_shards``: how many remote shards were given up on, once any
    was, and ``failed_shards``: their indices, so that one failing again after a resume counts once).

    Remote shards (URLs) are spooled by a ``ShardFetcher`` shared by the workers, keeping the shards of
    the last few groups, and read like local ones: the same batches and positions.
    """

    def __init__(self, shards: Sequence[Path], micro_batch: int, world: int = 1, rank: int = 0, seed: int = 0,
                 transform=None, kinds: dict[str, float] | None = None, features=None,
                 tokenize: Callable[[list[str]], torch.Tensor] | None = None, shuffle_shards: int = 4,
                 start: dict | None = None, num_batches: int | None = None, max_tries: int = 64,
                 fetcher: ShardFetcher | None = None):
        if (features is None) == (tokenize is None):
            raise ValueError("give exactly one of features (adapter) or tokenize (CLIP text tower)")
        if len(shards) < world:
            raise ConfigError(f"{len(shards)} shard(s) for {world} ranks: every rank needs at least one shard "
                              "(write more, smaller shards)")
        kinds = dict(kinds or {"short": 0.5, "dense": 0.5})
        if not kinds or any(p < 0 for p in kinds.values()) or sum(kinds.values()) <= 0:
            raise InputError(f"caption_kinds must give non-negative probabilities with a positive sum: {kinds}")
        self.shards = [s if is_url(s) else Path(s) for s in shards]
        self.micro, self.world, self.rank, self.seed = micro_batch, world, rank, seed
        self.transform, self.kinds, self.features, self.tokenize = transform, kinds, features, tokenize
        self.k, self.start, self.num_batches, self.max_tries = shuffle_shards, dict(start or {}), num_batches, max_tries
        self._groups: dict[tuple[int, int], list] = {}
        self._files: dict[int, object] = {}
        if fetcher is None and any(isinstance(s, str) for s in self.shards):
            fetcher = ShardFetcher(keep=spool_size(shuffle_shards))
        self.fetcher = fetcher

    def _local(self, s: int) -> Path | None:
        shard = self.shards[s]
        return self.fetcher.local(shard) if isinstance(shard, str) else shard

    # -------------------------------------------------------------------------------- the order
    def _rank_shards(self, epoch: int) -> list[int]:
        return [int(i) for i in _rng(self.seed, epoch, 4).permutation(len(self.shards))[self.rank :: self.world]]

    def _n_groups(self, epoch: int) -> int:
        return -(-len(self._rank_shards(epoch)) // self.k)

    def group(self, epoch: int, g: int) -> list[tuple[int, int, str, dict]]:
        """The samples (shard id, index in shard, key, members) of group ``g`` of ``epoch``, in stream order."""
        got = self._groups.get((epoch, g))
        if got is None:
            samples = [(s, i, key, members)
                       for s in self._rank_shards(epoch)[g * self.k : (g + 1) * self.k]
                       for i, (key, members) in enumerate(self._index(s))]
            order = _rng(self.seed, epoch, self.rank, g, 5).permutation(len(samples))
            got = [samples[i] for i in order]
            if len(self._groups) >= 4:  # a batch spans at most a few groups
                self._groups.pop(next(iter(self._groups)))
            self._groups[(epoch, g)] = got
            self._prefetch(epoch, g)
        return got

    def _prefetch(self, epoch: int, g: int) -> None:
        """Fetch the next group's remote shards in the background, so that its first batch need not wait."""
        if self.fetcher is None:
            return
        e, n = (epoch, g + 1) if g + 1 < self._n_groups(epoch) else (epoch + 1, 0)
        urls = [self.shards[s] for s in self._rank_shards(e)[n * self.k : (n + 1) * self.k]]
        threading.Thread(target=_fetch_quietly, args=(self.fetcher, urls), daemon=True).start()

    def _index(self, s: int) -> list:
        path = self._local(s)
        return [] if path is None else index_shard(path)

    def _take(self, pos: StreamPosition, n: int) -> tuple[list[tuple[int, int, int]], StreamPosition]:
        """The next ``n`` slots (epoch, group, index) and the position after them."""
        out: list[tuple[int, int, int]] = []
        empty = 0
        while len(out) < n:
            size = len(self.group(pos.epoch, pos.group))
            if pos.offset >= size:
                empty = empty + 1 if size == 0 else 0
                if empty > self._n_groups(pos.epoch) + 1:
                    raise InputError(f"rank {self.rank}: its shards hold no readable samples")
                pos = (StreamPosition(pos.epoch, pos.group + 1, 0) if pos.group + 1 < self._n_groups(pos.epoch)
                       else StreamPosition(pos.epoch + 1, 0, 0))
                continue
            m = min(n - len(out), size - pos.offset)
            out += [(pos.epoch, pos.group, j) for j in range(pos.offset, pos.offset + m)]
            pos = StreamPosition(pos.epoch, pos.group, pos.offset + m)
        return out, pos

    # -------------------------------------------------------------------------------- decoding
    def _file(self, s: int):
        f = self._files.get(s)
        if f is None:
            if len(self._files) >= 16:
                self._files.pop(next(iter(self._files))).close()
            path = self._local(s)
            if path is None:
                raise OSError(f"{self.shards[s]}: could not be fetched")
            f = self._files[s] = open(path, "rb")
        return f

    def _caption(self, caps: dict[str, list[Caption]], rng: np.random.Generator, where: str) -> Caption:
        kinds = [k for k in self.kinds if k in caps and self.kinds[k] > 0]
        if not kinds:
            raise InputError(f"{where}: none of the caption kinds {sorted(self.kinds)}")
        p = np.array([self.kinds[k] for k in kinds], dtype=np.float64)
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        return caps[kind][int(rng.integers(len(caps[kind])))]

    def _sample(self, epoch: int, g: int, j: int) -> tuple[torch.Tensor, Caption, int]:
        grp = self.group(epoch, g)
        for skipped in range(min(self.max_tries, len(grp))):
            s, i, key, members = grp[(j + skipped) % len(grp)]
            where = f"{self.shards[s]}:{key}"
            span = _image_span(members)
            if span is None or "json" not in members:
                continue
            try:
                f = self._file(s)
                caps = parse_captions(_read(f, members["json"]), where)
                im = decode_image(_read(f, span))
            except _DECODE_ERRORS:
                continue
            # Seeded by the sample itself (shard, index, epoch): the same in every worker, resume and world size.
            cap = self._caption(caps, _rng(self.seed, epoch, s, i, 1), where)
            with torch.random.fork_rng(devices=[]):  # seeded augmentation that leaves the trainer's RNG alone
                torch.manual_seed(int(_rng(self.seed, epoch, s, i, 2).integers(2**62)))
                img = self.transform(im) if self.transform is not None else im
            if self.features is None and cap.text is None:
                raise InputError(f"{where}: caption {cap.id} has no text; the CLIP text tower needs it")
            return img, cap, skipped
        raise InputError(f"{self.max_tries} samples in a row from {self.shards[grp[j][0]]} could not be read")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        start = dict(self.start)
        # remote shards given up on before this (resumed) run: by index, so that a shard that fails again
        # counts once; a count saved without indices (an earlier version) is carried on as it is
        lost = set(start.pop("failed_shards", []))
        unnamed = max(int(start.pop("skipped_shards", 0)) - len(lost), 0)
        index = {str(u): k for k, u in enumerate(self.shards)}
        pos = StreamPosition(**start)
        b = 0
        try:
            while self.num_batches is None or b < self.num_batches:
                slots, pos = self._take(pos, self.micro)
                if b % nw == wid:
                    imgs, caps, skipped = zip(*(self._sample(*slot) for slot in slots))
                    texts = batch_texts(caps, self.features, self.tokenize)
                    at = pos.as_dict()
                    failed = lost | {index[u] for u in self.fetcher.failed_urls()} if self.fetcher else lost
                    if failed or unnamed:
                        at["skipped_shards"] = unnamed + len(failed)
                        at["failed_shards"] = sorted(failed)
                    yield torch.stack(imgs), texts, int(sum(skipped)), at
                b += 1
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()


# ------------------------------------------------------------------------------------ training glue
def stream_loader(src, cfg, dist_info, transform, features, tokenize, step: int, data_state: dict):
    """The DataLoader of a ``webdataset`` training source for ``fit``, continuing at ``data_state``'s
    position of this rank (saved by ``sync_positions``)."""
    T = cfg.train
    if T.batch_size % (dist_info.world * T.accum_steps):
        raise InputError(f"batch_size {T.batch_size} is not divisible by world size x accum_steps "
                         f"({dist_info.world * T.accum_steps})")
    start = None
    saved = data_state.get("positions")
    if step and saved is None:
        log.warning("the checkpoint holds no shard position; the webdataset stream starts from its beginning")
    elif saved is not None:
        if len(saved) != dist_info.world:
            # rank r streams every world-th shard: another world size is another order, in which the
            # saved positions would repeat some samples and skip others
            raise ConfigError(f"the checkpoint's shard positions were saved by {len(saved)} process(es) and this "
                              f"run has {dist_info.world}: a webdataset stream continues exactly only on the "
                              f"world size that wrote it; resume a webdataset run with that many processes "
                              f"({len(saved)}), or start a new run")
        start = saved[dist_info.rank]
    shards = expand_shards(src.shards)
    fetcher = source_fetcher(src, shards, keep=spool_size(src.shuffle_shards))
    stream = ShardStream(shards, T.batch_size // (dist_info.world * T.accum_steps),
                         dist_info.world, dist_info.rank, cfg.seed, transform, cfg.data.caption_kinds, features,
                         tokenize, src.shuffle_shards, start, (T.steps - step) * T.accum_steps, fetcher=fetcher)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.data.workers,
                                       pin_memory=pin_memory(dist_info.device))


def source_fetcher(src, shards: Sequence, keep: int | None = None) -> ShardFetcher | None:
    """The fetcher of a ``webdataset`` source's remote shards, with its options (None: all local)."""
    if not any(is_url(s) for s in shards):
        return None
    from ..extras import require

    # missing packages are a setup error, said once here, not a transport failure to retry and skip per shard
    if any(is_url(s) and not str(s).startswith("pipe:") for s in shards):
        require("fsspec", "webdataset shards from URLs")
    if any(str(s).startswith(("http://", "https://")) for s in shards):
        require("aiohttp", "webdataset shards over http(s)")
    return ShardFetcher(keep=keep, retries=src.retries, storage_options=src.storage_options, timeout=src.timeout)


def sync_positions(data_state: dict) -> dict:
    """Every rank's stream position into ``data_state['positions']`` (collective under torch.distributed)."""
    if "position" not in data_state:
        return data_state
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        got: list = [None] * dist.get_world_size()
        dist.all_gather_object(got, data_state["position"])
    else:
        got = [data_state["position"]]
    data_state["positions"] = got
    return data_state


# ------------------------------------------------------------------------------------ writing
def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)  # fixed metadata: the same records give byte-identical shards
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    tf.addfile(ti, io.BytesIO(data))


def _image_bytes(image, load_image) -> tuple[bytes, str]:
    """(bytes, extension): a file of a webdataset image type as it is, anything else re-encoded as PNG.
    Either way the image is decoded first (within PIL's pixel limit), so nothing the trainer cannot read
    is packed: a bad file raises one of ``_DECODE_ERRORS``."""
    if load_image is None and isinstance(image, (str, Path)):
        ext = Path(image).suffix.lower().lstrip(".")
        if ext in IMAGE_EXTS:
            data = Path(image).read_bytes()
            decode_image(data)
            return data, ext
        im = open_image(image)
    elif load_image is None:
        raise InputError(f"record image {image!r} is not a file path; pass load_image")
    else:
        im = load_image(image).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _why_unreadable(image, load_image) -> str:
    """Why an earlier, interrupted run left ``image`` out: decoded again to say."""
    try:
        _image_bytes(image, load_image)
    except _DECODE_ERRORS as err:
        return _why(err)
    return "unreadable when an earlier run packed its shard; readable now (rerun with --overwrite to include it)"


def _why(err: BaseException) -> str:
    """Why an image was left out, in one line."""
    if isinstance(err, FileNotFoundError):
        return "missing file"
    text = re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", " ".join(str(err).split())) or "unreadable"  # no addresses
    return f"{type(err).__name__}: {text}"[:200]


def _sample_json(rec: Record) -> bytes:
    caps = [{"id": c.id, "kind": k, **({"text": c.text} if c.text is not None else {})}
            for k, cs in rec.captions.items() for c in cs]
    name = Path(rec.image).name if isinstance(rec.image, (str, Path)) else str(rec.image)
    return json.dumps({"image": name, "captions": caps}, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _fingerprint(records: Sequence[Record], per_shard: int, prefix: str) -> str:
    h = hashlib.sha256(f"{per_shard}:{prefix}".encode())
    for r in records:
        h.update(str(r.image).encode())
        h.update(_sample_json(r))
    return h.hexdigest()


def write_shards(records: Sequence[Record], out_dir: str | Path, per_shard: int = 1000, prefix: str = "train",
                 load_image: Callable | None = None, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Write ``records`` as webdataset tar shards ``<prefix>-000000.tar``, ... plus ``shards.json`` into ``out_dir``.

    Image files of type jpg/jpeg/png/webp are stored byte for byte once they decode; other files and
    ``load_image(record.image)`` results are stored as PNG. A missing file, one that does not decode
    (empty, not an image, truncated) or one over PIL's pixel limit (a decompression bomb) leaves its
    sample out: ``left_out`` counts them and ``left_out_images`` lists each with the reason. Shards are written
    into ``.<out>.partial`` next to ``out_dir``, each atomically; a rerun with the same records keeps
    the finished ones; the folder takes its final name only when complete.
    """
    from tqdm.auto import tqdm

    if per_shard < 1:
        raise InputError("per_shard must be at least 1")
    if not records:
        raise InputError("no records to write")
    out = Path(out_dir)
    prepare_output_dir(out, overwrite, flag="--overwrite", error=InputError)  # only a folder llm2clip wrote
    job = Job(out.parent / f".{out.name}.partial", "shards", SHARDS_MANIFEST, error=InputError)
    # a partial folder of a run over other records is cleared: start over
    job.open({"fingerprint": _fingerprint(records, per_shard, prefix)}, restart=True)

    shards, left_out = [], []
    n_shards = -(-len(records) // per_shard)
    for s in tqdm(range(n_shards), desc="shards", unit="shard", disable=True if progress is False else None):
        name = f"{prefix}-{s:06d}.tar"
        chunk = records[s * per_shard : (s + 1) * per_shard]
        if job.has_part(name):  # finished by an earlier run (written atomically)
            keys = {key for key, _ in index_shard(job.part(name))}
            left_out.extend({"image": str(rec.image), "why": _why_unreadable(rec.image, load_image)}
                            for j, rec in enumerate(chunk) if f"{s * per_shard + j:09d}" not in keys)
            shards.append({"url": name, "nsamples": len(keys)})
            continue
        counted = [0]

        def write_tar(f, chunk=chunk, s=s, counted=counted):
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for j, rec in enumerate(chunk):
                    try:
                        data, ext = _image_bytes(rec.image, load_image)
                    except _DECODE_ERRORS as err:
                        left_out.append({"image": str(rec.image), "why": _why(err)})
                        continue
                    key = f"{s * per_shard + j:09d}"
                    _tar_add(tf, f"{key}.{ext}", data)
                    _tar_add(tf, f"{key}.json", _sample_json(rec))
                    counted[0] += 1

        job.write_part_with(name, write_tar)
        shards.append({"url": name, "nsamples": counted[0]})
    total = sum(s["nsamples"] for s in shards)
    index = {"format": SHARDS_FORMAT, "shards": shards, "samples": total, "left_out": len(records) - total,
             "left_out_images": left_out}
    job.complete(json.dumps(index, indent=1).encode())
    publish_dir(job.folder, out)  # with overwrite, the old folder is swapped aside, then removed
    if left_out:
        shown = "; ".join(f"{e['image']} ({e['why']})" for e in left_out[:5])
        log.warning("%d image(s) missing or unreadable were left out (all listed in %s): %s%s", len(left_out),
                    out / SHARDS_MANIFEST, shown, " ..." if len(left_out) > 5 else "")
    return {**index, "out": str(out)}
