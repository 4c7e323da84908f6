"""The extraction job: every caption embedded once, offline, into a FeatureStore (docs/METHOD.md 2).

Captions come from image manifests (the caption-record shape stage 2 and eval-text read too; older
{id, caption} JSONL/CSV files still read, with a deprecation warning) or the built-in CuPL sets.
Equal caption texts share one row; rows are the unique texts in first-seen order, cut into fixed-size shards. A shard is
a pure function of its texts, so a killed run resumes by skipping the shards on disk, and
``torchrun --nproc_per_node=N`` gives shard k to rank k % N: both give the same bytes as one
uninterrupted process. Rank 0 plans rows and ids on disk in bounded memory (``plan.py``, in ``out/plan`` until
the store is finished: transient disk of roughly 3x the captions' text); the other ranks wait, then read only
their shards' texts from that plan.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Discriminator, Field, Tag, field_validator
from tqdm.auto import tqdm

from ..config import StrictModel, load_config
from ..data.jsonl import is_manifest, read_jsonl, read_manifest, warn_old_shape
from ..distributed import from_rank0
from ..errors import InputError, Llm2ClipError
from ..jobs import Job
from ..text.config import TextEncoderConfig
from .plan import Plan, plan_captions
from .store import (
    JOB_FILE,
    JOB_KIND,
    STORE_MANIFEST,
    FeatureStore,
    IdentityMismatchError,
    Layout,
    StoreError,
    _identity_diff,
    _jsonable,
    finalize_store,
    shard_name,
    to_storage,
    write_shard,
)

log = logging.getLogger(__name__)

BUILTIN_SETS = ("cupl-train", "cupl-heldout")
StoreDType = Literal["float16", "bfloat16", "float32"]


# ------------------------------------------------------------------------------------- config
class FileSource(StrictModel):
    """A caption file: an image manifest (every caption's id and text; llm2clip.data.jsonl.read_manifest), or,
    deprecated, JSONL of {id, caption} objects or CSV/TSV with id and caption columns."""

    path: str
    format: Literal["auto", "manifest", "jsonl", "csv", "tsv"] = Field(
        "auto", description="auto: a manifest when the file's first row is one, else jsonl/csv/tsv by the suffix "
        "(deprecated there; set the format to read a flat caption file without the warning)")
    id_field: str = Field("id", description="jsonl/csv/tsv only")
    caption_field: str = Field("caption", description="jsonl/csv/tsv only")


class BuiltinSource(StrictModel):
    """A built-in caption set; ids are '<class>/<n>'."""

    builtin: Literal["cupl-train", "cupl-heldout"]
    classes: int | None = Field(None, ge=1, description="first N classes of the split (default all)")
    per_class: int | None = Field(None, ge=1, description="descriptions per class (default all)")
    mask_class_names: bool = False


def _source_tag(v) -> str | None:
    if isinstance(v, dict):
        return "builtin" if "builtin" in v else "file"
    return "builtin" if isinstance(v, BuiltinSource) else "file" if isinstance(v, FileSource) else None


CaptionSource = Annotated[Annotated[FileSource, Tag("file")] | Annotated[BuiltinSource, Tag("builtin")],
                          Discriminator(_source_tag)]


class EmbedConfig(StrictModel):
    """What `llm2clip embed CONFIG` runs. Relative paths resolve against the config file's folder."""

    encoder: TextEncoderConfig
    captions: list[CaptionSource] = Field(min_length=1, description="caption sources, read in order")
    out: str = Field(description="the store directory")
    shard_size: int = Field(8192, ge=1, description="rows per shard")
    dtype: StoreDType = Field("float16", description="stored precision (the encoder's output is cast to it)")
    batch_size: int | None = Field(None, ge=1, description="encoding batch size (default: the encoder's)")
    progress: bool = True

    @field_validator("captions", mode="before")
    @classmethod
    def _shorthand(cls, v):
        # `- cupl-train` or `- data/caps.jsonl` as a shorthand for the mapping forms.
        if isinstance(v, list):
            return [({"builtin": s} if s in BUILTIN_SETS else {"path": s}) if isinstance(s, str) else s for s in v]
        return v

    def resolve_paths(self, base: Path) -> None:
        hook = getattr(self.encoder, "resolve_paths", None)
        if callable(hook):
            hook(base)
        for s in self.captions:
            if isinstance(s, FileSource):
                s.path = str(_under(base, s.path))
        self.out = str(_under(base, self.out))


def _under(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else Path(base).absolute() / q  # absolute: a later chdir cannot move it


def load_embed_config(path: str | Path) -> EmbedConfig:
    return load_config(path, EmbedConfig)


# ------------------------------------------------------------------------------------ reading
def _check_id(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}: the id must be a string or an integer, got {type(value).__name__}")
    s = str(value)
    if not s.strip():
        raise InputError(f"{where}: empty id")
    if "\0" in s:
        raise InputError(f"{where}: the id contains a NUL character")
    return s


def _check_caption(value, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: the caption must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{where}: empty caption")
    return value.strip()


def _read_jsonl(src: FileSource, path: Path) -> Iterator[tuple[str, str, str]]:
    for ln, rec in read_jsonl(path):
        where = f"{path}:{ln}"
        for key in (src.id_field, src.caption_field):
            if key not in rec:
                raise InputError(f"{where}: field '{key}' missing")
        yield _check_id(rec[src.id_field], where), _check_caption(rec[src.caption_field], where), where


def _read_csv(src: FileSource, path: Path, delimiter: str) -> Iterator[tuple[str, str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames
            if not header:
                raise InputError(f"{path}: empty file (no header row)")
            for key in (src.id_field, src.caption_field):
                if key not in header:
                    raise InputError(f"{path}:1: the header has no column '{key}' (columns: {', '.join(header)})")
            for rec in reader:
                where = f"{path}:{reader.line_num}"
                if None in rec:
                    raise InputError(f"{where}: more fields than header columns")
                if rec.get(src.id_field) is None or rec.get(src.caption_field) is None:
                    raise InputError(f"{where}: fewer fields than header columns")
                yield _check_id(rec[src.id_field], where), _check_caption(rec[src.caption_field], where), where
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{reader.line_num + 1}: not UTF-8 text: {err.reason}") from None
        except csv.Error as err:
            raise InputError(f"{path}:{reader.line_num}: bad CSV: {err}") from None


def iter_source(src) -> Iterator[tuple[str, str, str]]:
    """(id, caption, 'file:line') records of one source, validated."""
    if isinstance(src, BuiltinSource):
        from ..data.captions import cupl_caption_set

        cs = cupl_caption_set(src.builtin.split("-")[1], src.classes, src.per_class or 10**9, src.mask_class_names)
        seen: dict[str, int] = {}
        for cap, group in zip(cs.captions, cs.groups):
            n = seen[group] = seen.get(group, -1) + 1
            cid = f"{group}/{n}"
            yield cid, _check_caption(cap, f"{src.builtin}:{cid}"), f"{src.builtin}:{cid}"
        return
    path = Path(src.path)
    if not path.is_file():
        raise InputError(f"{path}: caption file not found")
    fmt = src.format
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"{path}: cannot tell the format from the suffix; set format: manifest, jsonl, csv "
                             "or tsv")
        if fmt != "tsv" and is_manifest(path):
            fmt = "manifest"
    if fmt == "manifest":
        yield from ((c.id, c.text, c.where) for c in read_manifest(path, need_text=True))
        return
    if src.format == "auto":  # a format set explicitly asks for the flat shape: no warning
        warn_old_shape(path, f'{fmt.upper()} {{"{src.id_field}", "{src.caption_field}"}}')
    if fmt == "jsonl":
        yield from _read_jsonl(src, path)
    else:
        yield from _read_csv(src, path, "," if fmt == "csv" else "\t")


@dataclass
class Captions:
    """Unique caption texts (one per row, first-seen order) and every id's row."""

    texts: list[str]
    ids: list[str]
    id_rows: np.ndarray
    records: int
    repeated_ids: int  # records whose id was seen before with the same caption
    fingerprint: str = field(default="")

    def __post_init__(self):
        if not self.fingerprint:
            h = hashlib.sha256()
            for t in self.texts:
                h.update(t.encode("utf-8") + b"\0")
            h.update(b"\1")
            for i, r in zip(self.ids, self.id_rows.tolist()):
                h.update(f"{i}\0{r}\0".encode())
            self.fingerprint = h.hexdigest()


def read_captions(sources) -> Captions:
    """All sources, validated: an id seen twice must carry the same caption."""
    row_of_text: dict[str, int] = {}
    id_seen: dict[str, tuple[int, str]] = {}
    ids, rows = [], []
    records = repeated = 0
    for src in sources:
        for cid, text, where in iter_source(src):
            records += 1
            prev = id_seen.get(cid)
            if prev is not None:
                if prev[0] != row_of_text.get(text):
                    raise InputError(f"{where}: id {cid!r} was given at {prev[1]} with a different caption")
                repeated += 1
                continue
            row = row_of_text.setdefault(text, len(row_of_text))
            id_seen[cid] = (row, where)
            ids.append(cid)
            rows.append(row)
    if not ids:
        raise InputError(_no_captions(sources))
    return Captions(list(row_of_text), ids, np.asarray(rows, dtype=np.int64), records, repeated)


def _no_captions(sources) -> str:
    return "no captions in " + ", ".join(_describe(s) for s in sources)


def plan_sources(sources, folder: str | Path, **knobs) -> Plan:
    """``read_captions`` on disk, in bounded memory (``plan.plan_captions``): the same rows, ids and fingerprint."""
    return plan_captions(lambda: (r for src in sources for r in iter_source(src)), folder,
                         empty=_no_captions(sources), **knobs)


def _describe(src) -> str:
    return src.builtin if isinstance(src, BuiltinSource) else src.path


# ----------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        from .. import distributed as d

        return cls(d.env_rank(), d.env_world(), d.local_rank())

    def init(self, device: str) -> None:
        from ..distributed import init_from_env

        # A long timeout: other ranks wait while rank 0 plans the captions of a large store (reads, dedups, id files).
        init_from_env(device, timeout=timedelta(hours=4))

    def barrier(self) -> None:
        from ..distributed import barrier

        barrier()


# ------------------------------------------------------------------------------------- the job
def _encoder_for_rank(cfg, dist: Dist):
    device = getattr(cfg, "device", None)
    if dist.world > 1 and device == "cuda":
        return cfg.model_copy(update={"device": f"cuda:{dist.local_rank}"})
    return cfg


def _max_length(encoder) -> int | None:
    return getattr(getattr(encoder, "config", None), "max_length", None)


def _truncated(encoder, texts: list[str]) -> int:
    """Captions of the last ``encode`` call that were cut at max_length. The LLM encoder counts them
    itself; for a tokenizer-based one without that count the tokenizer is asked; an encoder with
    neither a tokenizer nor a max_length (random, bag of words) reads every caption whole."""
    n = getattr(encoder, "truncated_count", None)
    if n is not None:
        return int(n)
    tokenizer, limit = getattr(encoder, "tokenizer", None), _max_length(encoder)
    if tokenizer is None or limit is None:
        return 0
    return sum(len(ids) > limit for ids in tokenizer(texts)["input_ids"])


class _DropPerCallTruncationWarnings(logging.Filter):
    """The LLM encoder warns about truncation on every encode call; the embed job sums the counts and
    warns once per run instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "truncated" not in str(record.msg)


def _encode_shard(encoder, texts: list[str], batch_size: int, bar) -> tuple[np.ndarray, int]:
    """(float32 [n, D], captions truncated); longest first in chunks so each encode call pads little and
    progress moves."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    chunk, truncated = batch_size * 8, 0
    for s in range(0, len(order), chunk):
        idx = order[s : s + chunk]
        part = [texts[i] for i in idx]
        vecs = encoder.encode(part, batch_size=batch_size, progress=False)
        truncated += _truncated(encoder, part)
        vecs = vecs.float().cpu().numpy() if hasattr(vecs, "cpu") else np.asarray(vecs, np.float32)
        if vecs.shape != (len(idx), encoder.dim):
            raise StoreError(f"the encoder returned shape {vecs.shape}, expected {(len(idx), encoder.dim)}")
        out[idx] = vecs
        bar.update(len(idx))
    return out, truncated


def _job_record(config: EmbedConfig, plan: Plan, identity: dict, dim: int) -> dict:
    return {"identity": identity, "dim": dim, "dtype": config.dtype, "shard_size": config.shard_size,
            "rows": plan.rows, "ids": plan.ids, "captions_sha256": plan.fingerprint}


PLAN_DIR = "plan"  # in 'out' while the job runs; a scratch folder of the job


def _not_ours(out: Path) -> str:
    return f"{out}: not empty and not a store of this job; choose an empty or new 'out'"


def _plan_on_rank0(config: EmbedConfig, out: Path) -> Path:
    """Rank 0: claim 'out' and plan into out/plan (replanned on every run: the captions may have changed); for
    a finished store, whose check against the captions needs a plan too, into a temporary folder outside it
    (a finished store is not written to). Returns the plan's folder."""
    job = Job(out, JOB_KIND, STORE_MANIFEST, error=StoreError)  # this process is the folder's one writer from here
    if out.is_dir() and not (out / JOB_FILE).is_file() and not (out / STORE_MANIFEST).is_file() and any(
            p.name != PLAN_DIR for p in out.iterdir()):
        raise StoreError(_not_ours(out))  # before a plan is written into someone else's folder
    folder = Path(tempfile.mkdtemp(prefix="llm2clip-plan-")) / PLAN_DIR if job.is_complete() else out / PLAN_DIR
    try:
        plan_sources(config.captions, folder)
    except BaseException:
        if folder.parent != out:
            shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    return folder


def _prepare_out(out: Path, record: dict) -> bool:
    """Rank 0: start, resume or recognise a finished store. True when there is nothing left to do."""
    job = Job(out, JOB_KIND, STORE_MANIFEST, error=StoreError)
    if job.is_complete():
        try:
            m = FeatureStore.open(out).manifest
            have = {"identity": m["identity"], "dim": m["dim"], "dtype": m["dtype"], "shard_size": m["shard_size"],
                    "rows": m["rows"], "ids": m["ids"], "captions_sha256": m.get("captions", {}).get("sha256")}
            _same_job(job.manifest_path, have, record)
        finally:  # a finished store keeps no plan
            shutil.rmtree(out / PLAN_DIR, ignore_errors=True)
        return True
    if job.open(record, check=_same_job, not_empty=_not_ours(out), keep=[PLAN_DIR]) == "resume":
        log.info("resuming %s (partial files of the killed run removed)", out)
    return False


def _on_every_rank(dist: Dist, fn):
    """``fn()`` on rank 0; its error, if any, raised on every rank (the others would wait for rank 0)."""
    err = None
    if dist.rank == 0:
        try:
            fn()
        except Exception as e:  # re-raised below, on every rank
            err = e
    # our errors travel as they are (one line each on every rank); anything else as what it was on rank 0
    got = from_rank0(None if err is None else err if isinstance(err, Llm2ClipError) else
                     RuntimeError(f"rank 0 failed: {type(err).__name__}: {err}"))
    if err is not None:
        raise err
    if got is not None:
        raise got


def _same_job(where: Path, have: dict, want: dict) -> None:
    diff, _ = _identity_diff(have.get("identity") or {}, want["identity"], "have", "want")
    if diff:  # numerics included: one store holds one dtype's vectors
        raise IdentityMismatchError(
            f"{where}: this store was started with another encoder (differing fields: {', '.join(diff)}); "
            "use a new 'out' directory")
    diff = [k for k in want if k != "identity" and have.get(k) != want[k]]
    if diff:
        what = ", ".join(f"{k} {have.get(k)!r} -> {want[k]!r}" for k in diff)
        raise StoreError(f"{where}: this store was started with other settings or captions ({what}); "
                         "use a new 'out' directory")


def run_embedding(config: EmbedConfig, *, encoder=None, progress: bool | None = None) -> Path:
    """Fill (or finish) the store at ``config.out``; returns its path. Runs under torchrun too."""
    from ..text import build_text_encoder

    dist = Dist.from_env()
    enc_cfg = _encoder_for_rank(config.encoder, dist)
    dist.init(getattr(enc_cfg, "device", "cpu") or "cpu")
    out = Path(config.out)
    where = [out / PLAN_DIR]
    _on_every_rank(dist, lambda: where.__setitem__(0, _plan_on_rank0(config, out)))  # input errors before models
    if from_rank0(where[0] != out / PLAN_DIR):  # finished: rank 0 checks it against a plan made aside, alone
        done = [False]
        try:
            def check():
                enc = encoder or build_text_encoder(enc_cfg)
                rec = _job_record(config, Plan.open(where[0]), _jsonable(enc.identity()), int(enc.dim))
                done[0] = _prepare_out(out, rec)

            _on_every_rank(dist, check)
        finally:
            if dist.rank == 0:
                shutil.rmtree(where[0].parent, ignore_errors=True)
        if not from_rank0(done[0]):
            raise StoreError(f"{out}: was complete when planned and is not now; another process changed it")
        log.info("%s: already complete", out)
        return out
    if dist.rank != 0 and not (out / PLAN_DIR / "plan.json").is_file():
        raise StoreError(f"{out}: not visible from rank {dist.rank}; 'out' must be on a shared filesystem")
    plan = Plan.open(out / PLAN_DIR)
    encoder = encoder or build_text_encoder(enc_cfg)
    identity, dim = _jsonable(encoder.identity()), int(encoder.dim)
    layout = Layout(plan.rows, config.shard_size)
    job = _job_record(config, plan, identity, dim)
    # rank 0's view decides (a node's network-filesystem cache may not show the manifest yet)
    done = [False]
    _on_every_rank(dist, lambda: done.__setitem__(0, _prepare_out(out, job)))
    if from_rank0(done[0]):
        log.info("%s: already complete", out)
        return out
    if dist.rank != 0 and not (out / JOB_FILE).is_file():
        raise StoreError(f"{out}: not visible from rank {dist.rank}; 'out' must be on a shared filesystem")

    mine = range(dist.rank, layout.n_shards, dist.world)
    todo = [k for k in mine if not (out / shard_name(k)).is_file()]
    total = sum(layout.shard_rows(k) for k in mine)
    left = sum(layout.shard_rows(k) for k in todo)
    bs = config.batch_size or getattr(getattr(encoder, "config", None), "batch_size", None) or 32
    show = (config.progress if progress is None else progress) and dist.rank == 0
    desc = "embed" if dist.world == 1 else f"embed (rank 0 of {dist.world})"
    bar = tqdm(total=total, initial=total - left, unit="caption", desc=desc, smoothing=0.1,
               disable=not show or None)
    quiet = _DropPerCallTruncationWarnings()
    encoder_log = logging.getLogger("llm2clip.text.encoder")
    encoder_log.addFilter(quiet)
    try:
        for k in todo:  # each shard records its truncated captions, so a resumed run still counts them all
            lo, hi = layout.shard_range(k)
            vecs, truncated = _encode_shard(encoder, plan.texts(lo, hi), bs, bar)
            write_shard(out, k, to_storage(vecs, config.dtype, where=f"shard {k} (rows {lo}-{hi - 1})"), identity,
                        truncated_captions=truncated)
    finally:
        encoder_log.removeFilter(quiet)
    bar.close()
    dist.barrier()
    if dist.rank == 0:
        extra = {"max_length": _max_length(encoder), "encoder": config.encoder.model_dump(mode="json"),
                 "captions": {"sources": [s.model_dump(mode="json") for s in config.captions],
                              "records": plan.records, "repeated_ids": plan.repeated_ids,
                              "ids_sharing_a_row": plan.ids - plan.rows, "sha256": plan.fingerprint}}
        m = finalize_store(out, layout, identity=identity, dim=dim, dtype=config.dtype,
                           keys_from=(plan.folder, plan.keys), extra=extra, scratch=[PLAN_DIR])
        log.info("wrote %s: %d captions, %d unique, %d shards", out, plan.ids, plan.rows, layout.n_shards)
        if m.get("truncated_captions"):
            log.warning("%s: %d of %d unique captions were longer than max_length=%s tokens and were cut (their "
                        "embeddings see only the start); recorded as truncated_captions in the store manifest",
                        out, m["truncated_captions"], plan.rows, m["max_length"])
    dist.barrier()
    return out


__all__ = ["EmbedConfig", "FileSource", "BuiltinSource", "Captions", "read_captions", "plan_sources", "iter_source",
           "run_embedding", "load_embed_config"]
