"""Stage-2 training: the vision tower learns against stored caption embeddings through the adapter.

``fit(config)`` runs on one process or under torchrun (DDP, or FSDP with train.strategy: fsdp). Data
position is the global step (see StepBatchSampler), or for webdataset shards each rank's stream
position saved in the checkpoint, so a resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.images import (PairDataset, StepBatchSampler, build_caption_encoder, caption_texts, collate,
                           encode_captions, load_image_file, load_manifest)
from ..data.shards import sync_positions
from ..errors import ConfigError, InputError
from ..losses import build_loss
from ..model import LLM2CLIP, caption_encoder_record, check_identity
from ..vision import build_transform
from .checkpoint import (load_train_state, load_weights_and_optimizer, resolve_resume, save_checkpoint, save_model,
                         set_rng_state)
from .config import FashionMnistSource, ManifestSource, RunConfig, ScenesSource, WebDatasetSource
from .distributed import DistInfo, barrier, init_distributed
from .evaluate import evaluate_retrieval
from .fsdp import gather_full_state, reduce_replicated_grads

log = logging.getLogger(__name__)


class SimulatedCrash(RuntimeError):
    """Raised by ``fit(stop_at_step=...)``: tests use it to kill a run between checkpoints."""


# ------------------------------------------------------------------------------------- data
def build_source(src) -> tuple[list, object]:
    """(records, load_image) of a data source."""
    if isinstance(src, ScenesSource):
        from ..data.images import Caption, Record
        from ..data.scenes import SceneSet

        scenes = SceneSet(src.count, src.seed, src.offset, src.min_objects, src.max_objects, src.render_size)
        records = []
        for i in range(len(scenes)):
            caps = scenes[i].captions()
            records.append(Record(i, {k: [Caption(scenes.caption_id(i, k), t)] for k, t in caps.items()}))
        return records, scenes.image
    if isinstance(src, ManifestSource):
        return load_manifest(src.path, src.image_root), load_image_file
    if isinstance(src, FashionMnistSource):
        from ..data import fashion_mnist as fm

        ds = fm.FashionMnist(src.split, src.count, src.root or fm.DEFAULT_DIR, src.per_class)
        return ds.records, ds.image
    if isinstance(src, WebDatasetSource):  # every sample's captions read up front (validation, in-memory encoding)
        from ..data.shards import expand_shards, load_shard_records

        return load_shard_records(expand_shards(src.shards))
    raise TypeError(type(src).__name__)


def build_features(cfg: RunConfig, record_sets: list[list]):
    """The caption-embedding source: the on-disk store, or the configured encoder run in memory."""
    f = cfg.data.features
    if f is None:
        return None
    if f.store is not None:
        try:
            from ..features import FeatureStore
        except ImportError as err:
            raise ConfigError(f"data.features.store: the feature store module is not available ({err})") from None
        return FeatureStore.open(f.store)
    captions: dict[str, str] = {}
    for recs in record_sets:
        captions.update(caption_texts(recs))
    log.info("embedding %d captions in memory with %s", len(captions), f.encoder.kind)
    return encode_captions(captions, build_caption_encoder(f.encoder), f.batch_size)


def first_captions(records, kinds) -> dict[str, list]:
    """Per kind, the first caption of every record that has that kind (validation pairs)."""
    out = {}
    for k in kinds:
        if all(k in r.captions for r in records):
            out[k] = [r.captions[k][0] for r in records]
    return out


def _training_embeddings(features, records) -> torch.Tensor:
    """Every training caption's stored embedding (all rows of the store for a streamed source)."""
    if records:
        ids = sorted({c.id for r in records for caps in r.captions.values() for c in caps})
        return torch.from_numpy(np.asarray(features.get_by_ids(ids), np.float32))
    if hasattr(features, "get_rows"):
        return torch.from_numpy(np.asarray(features.get_rows(np.arange(len(features))), np.float32))
    raise ConfigError("model.text.standardize: no training captions to take statistics from")


# ------------------------------------------------------------------------------------- helpers
def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class _Metrics:
    def __init__(self, path: Path | None):
        self.f = open(path, "a", encoding="utf-8") if path else None

    def write(self, row: dict) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


# ------------------------------------------------------------------------------------- fit
def fit(cfg: RunConfig, resume: str | bool | None = None, stop_at_step: int | None = None,
        progress: bool | None = None, dist_info: DistInfo | None = None) -> dict:
    """Train from ``cfg``; returns the last metrics. ``resume``: True/'latest' or a checkpoint folder."""
    T, O = cfg.train, cfg.optim
    if T.threads:
        torch.set_num_threads(T.threads)
    di = dist_info or init_distributed(T.device)
    run_dir = Path(cfg.run_dir)
    if di.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    torch.manual_seed(cfg.seed)  # identical init on every rank

    # data (a webdataset source streams; its records are read up front only for in-memory caption encoding)
    streamed = isinstance(cfg.data.train, WebDatasetSource)
    in_memory = cfg.data.features is not None and cfg.data.features.encoder is not None
    train_records, train_loader_fn = ([], None) if streamed and not in_memory else build_source(cfg.data.train)
    val_records, val_loader_fn = (build_source(cfg.data.val) if cfg.data.val is not None else ([], None))
    val_records = val_records[: cfg.data.val_max]
    features = build_features(cfg, [train_records, val_records])

    # model
    identity = dict(features.identity) if features is not None else None
    model = LLM2CLIP(cfg.model, text_dim=features.dim if features is not None else None, text_identity=identity,
                     caption_encoder_config=caption_encoder_record(cfg.data.features, features))
    if model.uses_adapter and model.text.standardize:
        model.text.fit_standardization(_training_embeddings(features, train_records))
    if T.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(di.device)
    fsdp = T.strategy == "fsdp" and di.world > 1
    if fsdp:
        from .fsdp import shard_model

        shard_model(model, di.device)
    tokenize = None if model.uses_adapter else model.text.tokenize
    v = model.visual
    train_tf = build_transform(v.image_size, v.mean, v.std, train=True, augment=cfg.data.augment)
    eval_tf = build_transform(v.image_size, v.mean, v.std, train=False)
    # a small set under a deterministic transform is decoded and transformed once per image, not per draw
    small = len(train_records) * 3 * v.image_size**2 * 4 <= 512 << 20
    dataset = PairDataset(train_records, train_loader_fn, train_tf, cfg.data.caption_kinds, cfg.seed,
                          features if model.uses_adapter else None, tokenize,
                          cache_images=cfg.data.augment == "none" and cfg.data.workers == 0 and small)

    optimizer = _build_opt(model, O)
    from .optim import build_scheduler

    scheduler = build_scheduler(optimizer, T.steps, O.warmup_steps, O.lr, O.min_lr)
    scaler = torch.amp.GradScaler(di.device.type) if T.precision == "fp16" else None

    step, data_state = 0, {"skipped": 0, "seen": 0}
    ckpt = resolve_resume(run_dir, resume)
    if ckpt is not None:
        state = load_train_state(ckpt)
        check_identity(json.loads((ckpt / "llm2clip_model.json").read_text()).get("text_identity"), identity,
                       "feature store")
        load_weights_and_optimizer(model, optimizer, ckpt, state["optimizer"], fsdp, di.device)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, data_state = int(state["step"]), dict(state["data"])
        if di.main:
            log.info("resumed from %s at step %d", ckpt, step)

    train_model = model
    if di.world > 1 and not fsdp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[di.device.index] if di.device.type == "cuda" else None)

    loss_fn = build_loss(cfg.model.loss, T.local_loss, T.gather_with_grad)
    if streamed:
        from ..data.shards import stream_loader

        loader = stream_loader(cfg.data.train, cfg, di, train_tf, features if model.uses_adapter else None, tokenize,
                               step, data_state)
    else:
        sampler = StepBatchSampler(len(dataset), T.batch_size, di.world, di.rank, T.accum_steps, cfg.seed, step,
                                   T.steps)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                                             collate_fn=collate, persistent_workers=False)

    val_set = None
    if val_records:
        imgs = torch.stack([eval_tf(val_loader_fn(r.image)) for r in val_records])
        texts = {}
        for kind, caps in first_captions(val_records, cfg.data.caption_kinds).items():
            texts[kind] = (torch.from_numpy(np.asarray(features.get_by_ids([c.id for c in caps]), np.float32))
                           if model.uses_adapter else tokenize([c.text for c in caps]))
        val_set = (imgs, texts)

    metrics = _Metrics(run_dir / "metrics.jsonl" if di.main else None)
    bar = tqdm(total=T.steps, initial=step, unit="step", desc="stage 2",
               disable=True if (not di.main or progress is False) else (None if progress is None else False))
    last: dict = {}
    full = None  # FSDP: the state last gathered on rank 0
    t0, n0 = time.perf_counter(), 0
    it = iter(loader)
    train_model.train()
    try:
        while step < T.steps:
            micro = [next(it) for _ in range(T.accum_steps)]
            for m in micro:
                data_state["skipped"] += m[2]
            if streamed:
                data_state["position"] = micro[-1][3]
            data_state["seen"] += sum(len(m[0]) for m in micro)
            _check_bad(data_state, cfg.data.max_bad_fraction)
            loss = _train_step(train_model, model, micro, loss_fn, optimizer, scaler, T, O, di)
            scheduler.step()
            model.clamp_logit_scale()
            step += 1
            n0 += T.batch_size
            if stop_at_step is not None and step >= stop_at_step:
                raise SimulatedCrash(f"stopped at step {step}")
            if step % T.log_every == 0 or step == T.steps:
                dt = time.perf_counter() - t0
                last = {"step": step, "loss": loss, "lr": max(g["lr"] for g in optimizer.param_groups),
                        "logit_scale": float(model.logit_scale.detach().exp()), "images_per_s": n0 / dt if dt else None,
                        "skipped_images": data_state["skipped"]}
                metrics.write(last)
                bar.set_postfix(loss=f"{loss:.3f}", ips=f"{last['images_per_s']:.0f}")
                t0, n0 = time.perf_counter(), 0
            if val_set is not None and ((T.eval_every and step % T.eval_every == 0) or step == T.steps):
                if di.main or fsdp:  # FSDP: every rank takes part in the forward passes
                    ev = evaluate_retrieval(model, *val_set, di.device, T.eval_k, T.eval_batch_size,
                                            _autocast(di.device, T.precision) if T.precision != "fp32" else None)
                    row = {"step": step, "eval": ev}
                    metrics.write(row)
                    last = {**last, "eval": ev}
                    if di.main:
                        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if "R@1" in k))
                barrier()
            if (T.checkpoint_every and step % T.checkpoint_every == 0) or step == T.steps:
                if streamed:
                    sync_positions(data_state)  # collective: every rank's shard position
                full = gather_full_state(model, optimizer) if fsdp else None  # collective
                if di.main:
                    save_checkpoint(run_dir, step, model, optimizer, scheduler, scaler, data_state,
                                    cfg.model_dump(mode="json"), T.keep_checkpoints, full)
                if step < T.steps:
                    full = None  # rank 0's CPU holds the gathered state only for the final model/
                barrier()
            bar.update(1)
    finally:
        bar.close()
        metrics.close()
    if fsdp and full is None:
        full = gather_full_state(model, optimizer)
    if di.main:
        save_model(model, run_dir / "model", full[0] if full else None)
    return last


def _build_opt(model, O):
    from .optim import build_optimizer

    return build_optimizer(model, O)


def _check_bad(state: dict, max_fraction: float) -> None:
    bad, seen = state["skipped"], state["seen"]
    if bad and (max_fraction == 0 or bad + seen >= 200) and bad / (bad + seen) > max_fraction:
        raise InputError(f"{bad} of {bad + seen} images could not be read, more than data.max_bad_fraction="
                         f"{max_fraction}")


def _train_step(train_model, model, micro, loss_fn, optimizer, scaler, T, O, di) -> float:
    """One optimizer step over ``accum_steps`` micro-batches, contrasting the whole accumulated batch.

    With accumulation, features of every micro-batch are first computed without gradients; then each
    micro-batch is recomputed with gradients and the loss over all cached features is backpropagated
    through it (open_clip's accum-freq). The summed gradients equal those of one big batch.
    """
    dev = di.device
    ac = _autocast(dev, T.precision)
    bias = model.logit_bias
    micro = [(m[0].to(dev, non_blocking=True), m[1].to(dev, non_blocking=True)) for m in micro]
    optimizer.zero_grad(set_to_none=True)
    if len(micro) == 1:
        im, tx = micro[0]
        with ac:
            fi, ft = train_model(im, tx)
            loss = loss_fn(fi, ft, model.logit_scale, bias)
        (scaler.scale(loss) if scaler else loss).backward()
    else:
        with torch.no_grad(), ac:
            cache = [train_model(im, tx) for im, tx in micro]
        for j, (im, tx) in enumerate(micro):
            sync = j == len(micro) - 1
            ctx = train_model.no_sync() if (hasattr(train_model, "no_sync") and not sync) else contextlib.nullcontext()
            with ctx:
                with ac:
                    fi, ft = train_model(im, tx)
                    imgs = torch.cat([c[0] for c in cache[:j]] + [fi] + [c[0] for c in cache[j + 1:]])
                    txts = torch.cat([c[1] for c in cache[:j]] + [ft] + [c[1] for c in cache[j + 1:]])
                    loss = loss_fn(imgs, txts, model.logit_scale, bias)
                (scaler.scale(loss) if scaler else loss).backward()
    reduce_replicated_grads(model)  # FSDP: the unsharded logit scale/bias (no-op otherwise)
    if O.grad_clip:
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), O.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    val = float(loss.detach())
    if not math.isfinite(val):
        raise FloatingPointError(f"loss is {val}; lower optim.lr or use precision bf16/fp32")
    return val
