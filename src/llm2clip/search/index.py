"""Image indexes: a folder of images embedded by an LLM2CLIP model into a faiss index, searchable by text or image.

Layout of a finished index folder::

    manifest.json    format, the model's identity (weights sha256, caption-encoder identity) and path,
                     the image folder, counts, the faiss index kind; written last, atomically
    index.faiss      flat inner product (exact) or HNSW (approximate); row i is line i of files.txt
    files.txt        image paths relative to the image folder, one per line
    skipped.txt      unreadable files: '<path>\\t<reason>' per line

While building, ``llm2clip_job.json`` (the model and the frozen file list's hash), ``plan.txt`` (that list)
and ``chunks/chunk-NNNNN.npz`` (embeddings of ``chunk_size`` files each, written atomically) hold the
progress: a killed run continues from its last finished chunk. Embeddings are L2-normalised, so inner
product = cosine similarity = ``LoadedModel.similarity``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..fileio import JOB_RECORD, remove_temp_files, write_bytes_atomic
from ..jobs import Job, differing_keys

log = logging.getLogger(__name__)

FORMAT = "llm2clip-image-index/1"
INDEX_MANIFEST = "manifest.json"
JOB_FILE = JOB_RECORD
JOB_KIND = "index"
PLAN_FILE = "plan.txt"
CHUNK_DIR = "chunks"
FAISS_FILE = "index.faiss"
FILES_FILE = "files.txt"
SKIPPED_FILE = "skipped.txt"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class IndexInterrupted(RuntimeError):
    """Raised by ``build_index(stop_after_chunks=...)``: tests use it to kill a run between chunks."""


def _faiss():
    # faiss logs each SIMD variant it tries at INFO; the CLI's INFO logging would print them all.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


# ------------------------------------------------------------------------------------ discovery
def find_images(root: str | Path, exclude: Path | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """(image paths relative to ``root``, sorted; unusable names with a reason), recursively.

    Hidden files and folders are left out; so is ``exclude`` (an index folder inside ``root``)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: image folder not found")
    exclude = exclude.resolve() if exclude is not None else None
    found, bad = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTS):
                continue
            rel = (here / name).relative_to(root).as_posix()
            if "\n" in rel or "\t" in rel or "\r" in rel:
                bad.append((rel.encode("unicode_escape").decode(), "the path contains a tab or newline"))
            else:
                found.append(rel)
    return sorted(found), bad


# ------------------------------------------------------------------------------------ building
@dataclass
class IndexResult:
    path: Path
    count: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    embedded_now: int = 0  # files read in this run (resumed chunks are not read again)
    already_complete: bool = False


def _sha_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _chunk_path(out: Path, k: int) -> Path:
    return out / CHUNK_DIR / f"chunk-{k:05d}.npz"


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _read_chunk(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("emb", "ok", "bad", "reason")}
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: unreadable chunk ({err}); delete it and rerun to recompute it") from None


class _ImageFiles:
    """Dataset of (row, pixels or None, reason); reads never raise, a bad file becomes a reason."""

    def __init__(self, root: Path, rels: list[str], transform):
        self.root, self.rels, self.transform = root, rels, transform

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int):
        from ..data.images import load_image_file

        try:
            return i, self.transform(load_image_file(str(self.root / self.rels[i]))), ""
        except Exception as err:  # PIL raises many types for malformed files; the reason is recorded
            return i, None, f"{type(err).__name__}: {err}".replace("\n", " ").replace("\t", " ")


def _collate(batch):
    return batch


def _loader(lm, root: Path, rels: list[str], batches: list[list[int]], workers: int):
    import torch

    return torch.utils.data.DataLoader(_ImageFiles(root, rels, lm.transform), batch_sampler=batches,
                                       num_workers=workers, collate_fn=_collate)


def _embed_items(lm, items) -> tuple[np.ndarray | None, list[int], list[tuple[int, str]]]:
    """One loader batch -> (embeddings of the readable rows or None, those rows, (row, reason) of the others)."""
    import torch

    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, _, why in items if why]
    emb = lm.embed_pixels(torch.stack([x for _, x in good])).numpy() if good else None
    return emb, [i for i, _ in good], bad


def _job_record(lm, root: Path, plan: list[str], chunk_size: int) -> dict:
    return {"model": lm.identity(), "images_dir": str(root), "files": len(plan), "files_sha256": _sha_lines(plan),
            "chunk_size": chunk_size}


def _same_job(where: Path, have: dict, want: dict) -> None:
    diff = differing_keys(have, want)
    if diff:
        what = "model" if "model" in diff else ", ".join(diff)
        raise ConfigError(f"{where}: this index was started with another {what}; resume with the same "
                          "settings or choose a new --out")


def _prepare(job: Job, root: Path, lm, chunk_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Start or resume: the frozen plan (file list) and the names skipped at discovery."""
    out, pf = job.folder, job.part(PLAN_FILE)
    if job.is_started():
        try:
            lines = pf.read_text(encoding="utf-8").split("\n") if pf.stat().st_size else []
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{out}: unreadable job files ({err}); delete {out} to start over") from None
        plan = [ln for ln in lines if not ln.startswith("\t")]
        bad = [tuple(ln[1:].split("\t", 1)) for ln in lines if ln.startswith("\t")]
        job.open(_job_record(lm, root, plan, chunk_size), check=_same_job)
        remove_temp_files(out / CHUNK_DIR)
        now, _ = find_images(root, exclude=out)
        new = len(set(now) - set(plan))
        if new:
            log.info("%d file(s) added to %s since this index was started are not in it (start a new --out "
                     "to include them)", new, root)
        return plan, bad
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: not empty and not an unfinished index; choose an empty or new --out")
    plan, bad = find_images(root, exclude=out)
    if not plan:
        raise InputError(f"{root}: no image files ({', '.join(IMAGE_EXTS)}) found")

    def write_plan():  # before the record, which vouches for it
        (out / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        job.write_part(PLAN_FILE, "\n".join(plan + [f"\t{r}\t{why}" for r, why in bad]).encode("utf-8"))

    job.start(_job_record(lm, root, plan, chunk_size), prepare=write_plan)
    return plan, bad


def _faiss_index(emb: np.ndarray, hnsw: bool, hnsw_m: int, ef_construction: int, ef_search: int):
    faiss = _faiss()

    d = emb.shape[1]
    if hnsw:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    return index


def _index_settings(hnsw: bool, hnsw_m: int, ef_construction: int, ef_search: int) -> dict:
    if hnsw:
        return {"kind": "hnsw", "metric": "inner_product", "M": hnsw_m, "ef_construction": ef_construction,
                "ef_search": ef_search}
    return {"kind": "flat", "metric": "inner_product"}


def build_index(images_dir: str | Path, model, out: str | Path, *, hnsw: bool = False, hnsw_m: int = 32,
                ef_construction: int = 80, ef_search: int = 64, chunk_size: int = 1024, batch_size: int = 64,
                workers: int = 0, device: str = "auto", precision=None, progress: bool | None = None,
                stop_after_chunks: int | None = None, dtype=None) -> IndexResult:
    """Embed every image under ``images_dir`` with ``model`` (a LoadedModel or a model folder) into ``out``.

    Resumable: rerun with the same arguments after a kill. Unreadable files are skipped and listed."""
    from tqdm.auto import tqdm

    from ..api import LoadedModel, load

    if chunk_size < 1 or batch_size < 1 or workers < 0:
        raise ConfigError("chunk_size and batch_size must be >= 1 and workers >= 0")
    root, out = Path(images_dir).resolve(), Path(out).resolve()
    lm = model if isinstance(model, LoadedModel) else load(model, device=device, precision=precision, dtype=dtype,
                                                           lazy_text=True)
    settings = _index_settings(hnsw, hnsw_m, ef_construction, ef_search)
    job = Job(out, JOB_KIND, INDEX_MANIFEST, error=InputError)
    if job.is_complete():
        idx = ImageIndex.open(out)
        idx.check_model(lm)
        if idx.manifest["images_dir"] != str(root) or idx.manifest["index"] != settings:
            raise ConfigError(f"{out}: already holds a finished index of {idx.manifest['images_dir']} "
                              f"({idx.manifest['index']['kind']}); choose a new --out")
        job.clear([CHUNK_DIR])  # a run killed after its manifest was written
        return IndexResult(out, len(idx), idx.skipped(), 0, already_complete=True)
    plan, skipped = _prepare(job, root, lm, chunk_size)
    n_chunks = (len(plan) + chunk_size - 1) // chunk_size
    todo = [k for k in range(n_chunks) if not _chunk_path(out, k).is_file()]
    done_rows = sum(min(chunk_size, len(plan) - k * chunk_size) for k in range(n_chunks) if k not in set(todo))
    if done_rows:
        log.info("resuming %s: %d of %d chunks already done", out, n_chunks - len(todo), n_chunks)

    # Batches never cross a chunk boundary, so each chunk is complete when its last batch arrives.
    batches, last_of_chunk = [], {}
    for k in todo:
        lo, hi = k * chunk_size, min((k + 1) * chunk_size, len(plan))
        for s in range(lo, hi, batch_size):
            batches.append(list(range(s, min(s + batch_size, hi))))
        last_of_chunk[len(batches) - 1] = k
    loader = _loader(lm, root, plan, batches, workers)
    bar = tqdm(total=len(plan), initial=done_rows, unit="img", desc="index", smoothing=0.1,
               disable=(not progress) if progress is not None else None)
    embedded, finished = 0, 0
    emb_parts, ok_rows, bad_rows, reasons = [], [], [], []
    try:
        for b, items in enumerate(loader):
            emb, ok, bad = _embed_items(lm, items)
            if emb is not None:
                emb_parts.append(emb)
                ok_rows.extend(ok)
            bad_rows.extend(i for i, _ in bad)
            reasons.extend(why for _, why in bad)
            embedded += len(items)
            bar.update(len(items))
            if b in last_of_chunk:
                k = last_of_chunk[b]
                emb = np.concatenate(emb_parts) if emb_parts else np.zeros((0, lm.embed_dim), np.float32)
                data = _npz_bytes(emb=emb.astype(np.float32), ok=np.asarray(ok_rows, np.int64),
                                  bad=np.asarray(bad_rows, np.int64), reason=np.asarray(reasons, dtype=str))
                write_bytes_atomic(_chunk_path(out, k), data)
                emb_parts, ok_rows, bad_rows, reasons = [], [], [], []
                finished += 1
                if stop_after_chunks is not None and finished >= stop_after_chunks:
                    raise IndexInterrupted(f"stopped after {finished} chunk(s)")
    finally:
        bar.close()
    return _finalize(out, root, lm, plan, skipped, n_chunks, settings, embedded)


def _write_index_files(out: Path, index, files: list[str], skipped: list) -> None:
    """Everything of a finished index but its manifest (written last: it vouches for these)."""
    write_bytes_atomic(out / FAISS_FILE, _faiss().serialize_index(index).tobytes())
    write_bytes_atomic(out / FILES_FILE, ("\n".join(files) + "\n").encode("utf-8"))
    write_bytes_atomic(out / SKIPPED_FILE, "".join(f"{r}\t{why}\n" for r, why in skipped).encode("utf-8"))


def _finalize(out: Path, root: Path, lm, plan: list[str], skipped: list, n_chunks: int, settings: dict,
              embedded: int) -> IndexResult:
    embs, files, skipped = [], [], list(skipped)
    for k in range(n_chunks):
        c = _read_chunk(_chunk_path(out, k))
        if c["emb"].shape != (len(c["ok"]), lm.embed_dim):
            raise InputError(f"{_chunk_path(out, k)}: embeddings of shape {c['emb'].shape}, expected "
                             f"{(len(c['ok']), lm.embed_dim)}; delete it and rerun")
        embs.append(c["emb"])
        files.extend(plan[i] for i in c["ok"])
        skipped.extend((plan[i], str(why)) for i, why in zip(c["bad"], c["reason"]))
    if not files:
        raise InputError(f"{root}: none of the {len(plan)} image file(s) could be read (see {out / PLAN_FILE})")
    emb = np.concatenate(embs)
    index = _faiss_index(emb, settings["kind"] == "hnsw", settings.get("M", 32), settings.get("ef_construction", 80),
                         settings.get("ef_search", 64))
    _write_index_files(out, index, files, skipped)
    manifest = {"format": FORMAT, "version": 1, "model": {**lm.identity(), "path": str(lm.path)},
                "images_dir": str(root), "count": len(files), "skipped": len(skipped), "dim": int(emb.shape[1]),
                "index": settings, "dtype": str(lm.dtype).removeprefix("torch."), "image_size": lm.image_size}
    Job(out, JOB_KIND, INDEX_MANIFEST).complete((json.dumps(manifest, indent=1) + "\n").encode("utf-8"),
                                                scratch=[CHUNK_DIR, PLAN_FILE])
    return IndexResult(out, len(files), skipped, embedded)


# ------------------------------------------------------------------------------------ searching
@dataclass
class Hit:
    rank: int
    score: float
    file: str  # relative to the image folder (absolute for images added from outside it)
    path: str  # absolute
    row: int = -1  # the image's row in the index (stable: `index add` appends)


class ImageIndex:
    """A finished index: ``search(vectors, k)`` and the model check."""

    def __init__(self, path: Path, manifest: dict, files: list[str], index):
        self.path, self.manifest, self.files, self.index = path, manifest, files, index
        self.stamp = None  # index_stamp() of the version read

    @property
    def version(self) -> int:
        return int(self.manifest.get("version", 1))

    @classmethod
    def open(cls, path: str | Path) -> ImageIndex:
        """Read a finished index; one swapped in by `index add` while reading is read again."""
        path = Path(path)
        for _ in range(5):
            before = index_stamp(path)
            idx = cls._read(path)
            if before is not None and index_stamp(path) == before:
                idx.stamp = before
                return idx
        raise InputError(f"{path}: the index kept changing while it was read; try again")

    @classmethod
    def _read(cls, path: Path) -> ImageIndex:
        faiss = _faiss()

        mf = path / INDEX_MANIFEST
        if not mf.is_file():
            if (path / JOB_FILE).is_file():
                raise InputError(f"{path}: unfinished index (no {INDEX_MANIFEST}); rerun `llm2clip index` to finish it")
            raise InputError(f"{path}: not an image index (no {INDEX_MANIFEST})")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{mf}: unreadable manifest: {err}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InputError(f"{mf}: not a {FORMAT} manifest")
        for key in ("model", "images_dir", "count", "dim", "index"):
            if key not in manifest:
                raise InputError(f"{mf}: field '{key}' missing")
        try:
            files = (path / FILES_FILE).read_text(encoding="utf-8").split("\n")[:-1]
        except OSError as err:
            raise InputError(f"{path / FILES_FILE}: {err}") from None
        try:
            index = faiss.read_index(str(path / FAISS_FILE))
        except RuntimeError as err:
            raise InputError(f"{path / FAISS_FILE}: unreadable faiss index: {str(err).splitlines()[0]}") from None
        if len(files) != manifest["count"] or index.ntotal != manifest["count"] or index.d != manifest["dim"]:
            raise InputError(f"{path}: {FILES_FILE} has {len(files)} lines and {FAISS_FILE} {index.ntotal} vectors "
                             f"of dim {index.d}; the manifest says {manifest['count']} of dim {manifest['dim']}")
        if manifest["index"].get("kind") == "hnsw":
            index.hnsw.efSearch = int(manifest["index"].get("ef_search", 64))
        return cls(path, manifest, files, index)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def images_dir(self) -> Path:
        return Path(self.manifest["images_dir"])

    def skipped(self) -> list[tuple[str, str]]:
        p = self.path / SKIPPED_FILE
        if not p.is_file():
            return []
        return [tuple(ln.split("\t", 1)) for ln in p.read_text(encoding="utf-8").splitlines() if ln]

    def check_model(self, lm) -> None:
        """Refuse a model other than the one that built the index (naming what differs)."""
        have = {k: v for k, v in self.manifest["model"].items() if k != "path"}
        got = lm.identity()
        diff = differing_keys(have, got)
        if diff:
            def who(ident: dict, path) -> str:
                return f"{path} (weights sha256 {str(ident.get('weights_sha256'))[:12]})"

            raise ConfigError(f"{self.path}: built with another model: {who(have, self.manifest['model'].get('path'))}"
                              f"; {who(got, lm.path)} differs in {', '.join(diff)}. Search with the model that "
                              "built the index, or build a new index with this one")

    def set_ef_search(self, ef: int) -> None:
        if self.manifest["index"].get("kind") != "hnsw":
            raise ConfigError("ef_search applies to HNSW indexes only")
        self.index.hnsw.efSearch = int(ef)

    def search(self, queries, k: int = 10) -> list[list[Hit]]:
        """For each query vector (L2-normalised, [Q, E] or [E]), the top ``k`` images by cosine."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        q = np.asarray(queries.numpy() if hasattr(queries, "numpy") else queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.index.d:
            raise InputError(f"query vectors have shape {q.shape}; this index holds {self.index.d}-d vectors")
        scores, rows = self.index.search(np.ascontiguousarray(q), min(k, len(self)))
        out = []
        for srow, rrow in zip(scores, rows):
            hits = []
            for s, r in zip(srow, rrow):
                if r < 0:  # HNSW may find fewer than k
                    continue
                rel = self.files[r]
                hits.append(Hit(len(hits) + 1, float(s), rel, str(self.images_dir / rel), int(r)))
            out.append(hits)
        return out


def index_stamp(path: str | Path) -> tuple[int, int, int] | None:
    """A cheap fingerprint of the index version at ``path`` (its manifest's inode, size and mtime), or None
    while there is none (mid-swap). `index add` replaces the whole folder, so a new version has a new one."""
    try:
        st = os.stat(Path(path) / INDEX_MANIFEST)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def query_truncated(lm, texts: Sequence[str]) -> list[bool]:
    """For each text: would the caption encoder cut it at its max_length? (False for encoders without one.)"""
    enc = lm.caption_encoder
    if enc is not None and callable(getattr(enc, "tokenize", None)):
        return [bool(t.truncated) for t in enc.tokenize(list(texts))]
    tok, limit = getattr(enc, "tokenizer", None), getattr(getattr(enc, "config", None), "max_length", None)
    if tok is not None and limit:  # a sentence encoder: its tokenizer, with specials
        return [len(ids) > limit for ids in tok(list(texts), truncation=False)["input_ids"]]
    return [False] * len(texts)


def open_model_for(index: ImageIndex, model=None, device: str = "auto", precision=None, caption_encoder=None, *,
                   dtype=None):
    """The index's own model (or ``model``, which must be the same), with the caption encoder built lazily."""
    from ..api import LoadedModel, load

    if isinstance(model, LoadedModel):
        lm = model
    else:
        path = model or index.manifest["model"].get("path")
        if not path or not Path(path).exists():
            raise ConfigError(f"{index.path}: the model that built this index ({path}) is not there; "
                              "pass --model with the same model's folder")
        lm = load(path, device=device, precision=precision, dtype=dtype, caption_encoder=caption_encoder,
                  lazy_text=True)
    index.check_model(lm)
    return lm


def search_index(index: str | Path | ImageIndex, query: str | None = None, *, image=None, k: int = 10, model=None,
                 device: str = "auto", precision=None, caption_encoder=None, ef_search: int | None = None,
                 dtype=None) -> list[Hit]:
    """Top ``k`` images for a text query or a query image (a path or PIL image)."""
    if (query is None) == (image is None):
        raise InputError("give a text query or --image PATH (one of them)")
    idx = index if isinstance(index, ImageIndex) else ImageIndex.open(index)
    if ef_search is not None:
        idx.set_ef_search(ef_search)
    lm = open_model_for(idx, model, device, precision, caption_encoder, dtype=dtype)
    q = lm.encode_text([query]) if query is not None else lm.encode_image([image])
    return idx.search(q, k)[0]


# ------------------------------------------------------------------------------------ adding
@dataclass
class AddResult:
    path: Path
    count: int  # images in the new version
    added: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files of this run
    version: int = 1


def add_to_index(index: str | Path, images_dir: str | Path, model=None, *, batch_size: int = 64, workers: int = 0,
                 device: str = "auto", precision=None, progress: bool | None = None) -> AddResult:
    """Add the images under ``images_dir`` that ``index`` does not hold yet, as a new version of it.

    The new version is built in a folder beside the index and swapped in whole (fileio.building_dir): a
    reader (``llm2clip serve``) sees the old version or the new one. Rows of the old version keep their
    numbers. Images outside the index's image folder are recorded by absolute path. One add at a time: a
    second process adding to the same index fails at once, naming the first (each would build on the same
    old version, and the later swap would drop the earlier one's images)."""
    from ..fileio import folder_lock

    with folder_lock(index, "llm2clip index add"):
        return _add_to_index(index, images_dir, model, batch_size, workers, device, precision, progress)


def _add_to_index(index, images_dir, model, batch_size, workers, device, precision, progress) -> AddResult:
    from tqdm.auto import tqdm

    from ..fileio import building_dir

    if batch_size < 1 or workers < 0:
        raise ConfigError("batch_size must be >= 1 and workers >= 0")
    idx = ImageIndex.open(index)
    lm = open_model_for(idx, model, device, precision)
    root, base = Path(images_dir).resolve(), idx.images_dir
    found, bad_names = find_images(root, exclude=idx.path.resolve())
    names = [(root / r).relative_to(base).as_posix() if (root / r).is_relative_to(base) else str(root / r)
             for r in found]
    have = set(idx.files)
    new = [n for n in names if n not in have]
    if not new:
        return AddResult(idx.path, len(idx), 0, list(bad_names), idx.version)
    batches = [list(range(s, min(s + batch_size, len(new)))) for s in range(0, len(new), batch_size)]
    parts, ok_rows, bad = [], [], list(bad_names)
    with tqdm(total=len(new), unit="img", desc="index add", disable=(not progress) if progress is not None else None) \
            as bar:
        for items in _loader(lm, base, new, batches, workers):  # absolute names ignore the base
            emb, ok, why = _embed_items(lm, items)
            if emb is not None:
                parts.append(emb)
                ok_rows.extend(ok)
            bad.extend((new[i], r) for i, r in why)
            bar.update(len(items))
    added = [new[i] for i in ok_rows]
    if not added:
        return AddResult(idx.path, len(idx), 0, bad, idx.version)
    emb = np.concatenate([idx.index.reconstruct_n(0, len(idx))] + parts)
    settings = idx.manifest["index"]
    faiss_index = _faiss_index(emb, settings["kind"] == "hnsw", settings.get("M", 32),
                               settings.get("ef_construction", 80), settings.get("ef_search", 64))
    files = idx.files + added
    now = set(added)  # a file that failed before and reads now leaves the skipped list
    skipped = [(r, why) for r, why in idx.skipped() if r not in now] + bad
    manifest = {**idx.manifest, "version": idx.version + 1, "count": len(files), "skipped": len(skipped)}
    with building_dir(idx.path) as tmp:
        _write_index_files(tmp, faiss_index, files, skipped)
        write_bytes_atomic(tmp / INDEX_MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return AddResult(idx.path, len(files), len(added), bad, idx.version + 1)
