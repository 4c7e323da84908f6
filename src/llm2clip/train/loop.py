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
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed as _dist
from ..data.images import (
    PairDataset,
    StepBatchSampler,
    build_caption_encoder,
    caption_texts,
    collate,
    encode_captions,
    load_image_file,
    load_manifest,
)
from ..data.shards import sync_positions
from ..errors import ConfigError, InputError
from ..fileio import write_json_atomic
from ..losses import build_loss
from ..model import LLM2CLIP, caption_encoder_record, check_identity, write_model_card
from ..tracking import TENSORBOARD_DIR, Tracker
from ..vision import build_transform
from .checkpoint import (
    all_rng_states,
    clear_checkpoints,
    load_train_state,
    load_weights_and_optimizer,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    save_model,
)
from .config import FashionMnistSource, ManifestSource, RunConfig, ScenesSource, WebDatasetSource
from .distributed import DistInfo, barrier, init_distributed
from .evaluate import evaluate_retrieval
from .fsdp import gather_full_model, reduce_replicated_grads

HELDOUT_RANKS = "heldout_ranks.json"  # every held-out query's rank at the final step

log = logging.getLogger(__name__)
_TRUNCATION_WARNED: set[str] = set()  # stores already warned about in this process (a run trains many)


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
        return load_manifest(src.path, src.image_root, src.allow_absolute_paths), load_image_file
    if isinstance(src, FashionMnistSource):
        from ..data import fashion_mnist as fm

        ds = fm.FashionMnist(src.split, src.count, src.root or fm.DEFAULT_DIR, src.per_class)
        return ds.records, ds.image
    if isinstance(src, WebDatasetSource):  # every sample's captions read up front (validation, in-memory encoding)
        from ..data.shards import expand_shards, load_shard_records, source_fetcher

        shards = expand_shards(src.shards)
        return load_shard_records(shards, source_fetcher(src, shards))
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
def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on a GPU, fp32 elsewhere; any other value as given."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def use_tf32(device: torch.device, enabled: bool) -> None:
    """On a GPU, let fp32 matmuls and convolutions use TF32 tensor cores (a CPU is left as it is)."""
    if device.type == "cuda" and enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class _Metrics:
    """metrics.jsonl (the record), each row also forwarded to the run's tracker (TensorBoard / wandb)."""

    def __init__(self, path: Path | None, tracker: Tracker | None = None):
        self.f = open(path, "a", encoding="utf-8") if path else None
        self.tracker = tracker

    def write(self, row: dict) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        if self.tracker is not None:
            self.tracker.log(row)

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tracker is not None:
            self.tracker.close()


def global_figures(loss: float, skipped: int, device: torch.device) -> tuple[float, int]:
    """(mean loss over ranks, bad images summed over ranks): the run's figures, not rank 0's; a
    collective, so every rank calls it. One process: the values as given."""
    if not _dist.is_initialized():
        return loss, skipped
    t = torch.tensor([loss, float(skipped)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t[0].item() / _dist.world_size(), round(t[1].item())


def describe_source(src) -> dict | None:
    """A data source for the model card: its kind and size, file names without their folders."""
    if src is None:
        return None
    d = src.model_dump(mode="json")
    keep = {k: d[k] for k in ("kind", "count", "offset", "split") if d.get(k) is not None}
    if d.get("path"):
        keep["path"] = Path(d["path"]).name
    return keep


# ------------------------------------------------------------------------------------- trainer
class Callback:
    """Hooks into a run; tests use them (e.g. to kill a run between checkpoints)."""

    def on_step_end(self, trainer: Stage2Trainer, step: int) -> None:
        pass


class Stage2Trainer:
    """One stage-2 run, in named steps: data, model, restore, loader, then per step train_step, log,
    evaluate and checkpoint, and finish. ``fit`` runs them in that order."""

    def __init__(self, cfg: RunConfig, resume: str | bool | None = True, progress: bool | None = None,
                 dist_info: DistInfo | None = None, callbacks=()):
        self.cfg, self.resume, self.progress, self.callbacks = cfg, resume, progress, list(callbacks)
        T = cfg.train
        if T.threads:
            torch.set_num_threads(T.threads)
        self.di = dist_info or init_distributed(T.device)
        self.precision = resolve_precision(T.precision, self.di.device)
        use_tf32(self.di.device, T.tf32)
        self.run_dir = Path(cfg.run_dir)
        self.step, self.data_state = 0, {"skipped": 0, "seen": 0}
        self.last: dict = {}
        self.full = None  # FSDP: the full state gathered on rank 0 for the final model/

    # --------------------------------------------------------------------------------- setup
    def data(self) -> None:
        """Records, caption features and the validation set's records (a webdataset source streams; its
        records are read up front only for in-memory caption encoding)."""
        cfg = self.cfg
        self.streamed = isinstance(cfg.data.train, WebDatasetSource)
        in_memory = cfg.data.features is not None and cfg.data.features.encoder is not None
        self.train_records, self.train_loader_fn = (([], None) if self.streamed and not in_memory
                                                    else build_source(cfg.data.train))
        val_records, self.val_loader_fn = build_source(cfg.data.val) if cfg.data.val is not None else ([], None)
        self.val_records = val_records[: cfg.data.val_max]
        self.features = build_features(cfg, [self.train_records, self.val_records])
        # recorded at embed time by newer stores: captions cut at the caption encoder's max_length
        self.truncated = int((getattr(self.features, "manifest", None) or {}).get("truncated_captions") or 0)
        store = str(getattr(self.features, "path", "") or id(self.features))
        if self.truncated and self.di.main and store not in _TRUNCATION_WARNED:  # once per store and process
            _TRUNCATION_WARNED.add(store)
            log.warning("the feature store reports %d caption(s) truncated at the caption encoder's max_length; "
                        "their embeddings miss the cut text", self.truncated)

    def model(self) -> None:
        cfg, T, di, features = self.cfg, self.cfg.train, self.di, self.features
        self.identity = dict(features.identity) if features is not None else None
        model = LLM2CLIP(cfg.model, text_dim=features.dim if features is not None else None,
                         text_identity=self.identity,
                         caption_encoder_config=caption_encoder_record(cfg.data.features, features))
        if model.uses_adapter and model.text.standardize:
            model.text.fit_standardization(_training_embeddings(features, self.train_records))
        if T.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(di.device)
        self.fsdp = T.strategy == "fsdp" and di.world > 1
        if self.fsdp:
            from .fsdp import shard_model

            shard_model(model, di.device)
        self.net = model
        self.tokenize = None if model.uses_adapter else model.text.tokenize
        v = model.visual
        self.train_tf = build_transform(v.image_size, v.mean, v.std, train=True, augment=cfg.data.augment)
        self.eval_tf = build_transform(v.image_size, v.mean, v.std, train=False)
        self.optimizer = _build_opt(model, cfg.optim)
        from .optim import build_scheduler

        self.scheduler = build_scheduler(self.optimizer, T.steps, cfg.optim.warmup_steps, cfg.optim.lr,
                                         cfg.optim.min_lr)
        self.scaler = torch.amp.GradScaler(di.device.type) if self.precision == "fp16" else None

    def restore(self) -> None:
        """Continue from the checkpoint ``resume`` names; without one the run starts over, and the
        folder's earlier checkpoints and metrics are cleared (they belong to the run it replaces)."""
        ckpt = _dist.from_rank0(resolve_resume(self.run_dir, self.resume))  # rank 0's view of the folder
        if ckpt is None:
            if self.di.main:
                n = clear_checkpoints(self.run_dir)
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)  # the replaced run's view of it
                if n:
                    log.info("starting over: removed %d checkpoint(s) of %s", n, self.run_dir)
            barrier()
            return
        state = load_train_state(ckpt)
        check_identity(json.loads((ckpt / "llm2clip_model.json").read_text()).get("text_identity"), self.identity,
                       "feature store")
        load_weights_and_optimizer(self.net, self.optimizer, ckpt, state["optimizer"], self.fsdp, self.di.device)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], self.di.rank, self.di.world)
        self.step, self.data_state = int(state["step"]), dict(state["data"])
        if self.di.main:
            log.info("resumed from %s at step %d", ckpt, self.step)

    def loaders(self) -> None:
        """The training loader from the current step on, the wrapped (DDP) model and the validation set."""
        cfg, T, di, model = self.cfg, self.cfg.train, self.di, self.net
        self.train_model = model
        if di.world > 1 and not self.fsdp:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
        self.loss_fn = build_loss(cfg.model.loss, T.local_loss, T.gather_with_grad)
        feats = self.features if model.uses_adapter else None
        if feats is not None and cfg.data.workers and hasattr(feats, "check_all"):
            feats.check_all()  # here, once: the forked workers inherit the checked files instead of hashing them
        if self.streamed:
            from ..data.shards import stream_loader

            self.loader = stream_loader(cfg.data.train, cfg, di, self.train_tf, feats, self.tokenize, self.step,
                                        self.data_state)
        else:
            # a small set under a deterministic transform is decoded and transformed once per image, not per draw
            small = len(self.train_records) * 3 * model.visual.image_size**2 * 4 <= 512 << 20
            dataset = PairDataset(self.train_records, self.train_loader_fn, self.train_tf, cfg.data.caption_kinds,
                                  cfg.seed, feats, self.tokenize,
                                  cache_images=cfg.data.augment == "none" and cfg.data.workers == 0 and small)
            sampler = StepBatchSampler(len(dataset), T.batch_size, di.world, di.rank, T.accum_steps, cfg.seed,
                                       self.step, T.steps)
            self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                                                      collate_fn=collate, persistent_workers=False,
                                                      pin_memory=_dist.pin_memory(di.device))
        self.val_set = None
        if self.val_records:
            imgs = torch.stack([self.eval_tf(self.val_loader_fn(r.image)) for r in self.val_records])
            texts = {}
            for kind, caps in first_captions(self.val_records, cfg.data.caption_kinds).items():
                texts[kind] = (torch.from_numpy(np.asarray(self.features.get_by_ids([c.id for c in caps]),
                                                           np.float32))
                               if model.uses_adapter else self.tokenize([c.text for c in caps]))
            self.val_set = (imgs, texts)

    # ---------------------------------------------------------------------------------- steps
    def train_step(self) -> float:
        T = self.cfg.train
        micro = [next(self._it) for _ in range(T.accum_steps)]
        for m in micro:
            self.data_state["skipped"] += m[2]
        if self.streamed:
            self.data_state["position"] = micro[-1][3]
        self.data_state["seen"] += sum(len(m[0]) for m in micro)
        _check_bad(self.data_state, self.cfg.data.max_bad_fraction)
        loss = _train_step(self.train_model, self.net, micro, self.loss_fn, self.optimizer, self.scaler,
                           self.precision, self.cfg.optim, self.di)
        self.scheduler.step()
        self.net.clamp_logit_scale()
        self.step += 1
        self._n += T.batch_size
        return loss

    def skipped_since_start(self) -> int:
        """Bad images this process passed over since it started (or resumed)."""
        return self.data_state["skipped"] - self._skipped_start

    def log_step(self, loss: float) -> None:
        T = self.cfg.train
        if self.step % T.log_every == 0 or self.step == T.steps:
            loss, skipped = global_figures(loss, self.skipped_since_start(), self.di.device)  # collective
            dt = time.perf_counter() - self._t0
            self.last = {"step": self.step, "loss": loss, "lr": max(g["lr"] for g in self.optimizer.param_groups),
                         "logit_scale": float(self.net.logit_scale.detach().exp()),
                         "images_per_s": self._n / dt if dt else None,
                         "skipped_images": self._skipped_base + skipped}
            self.metrics.write(self.last)
            self.bar.set_postfix(loss=f"{loss:.3f}", ips=f"{self.last['images_per_s']:.0f}")
            self._t0, self._n = time.perf_counter(), 0

    def evaluate(self) -> None:
        T, di = self.cfg.train, self.di
        if self.val_set is None or not ((T.eval_every and self.step % T.eval_every == 0) or self.step == T.steps):
            return
        if di.main or self.fsdp:  # FSDP: every rank takes part in the forward passes
            final = self.step == T.steps
            ranks: dict | None = {} if final else None
            ev = evaluate_retrieval(self.net, *self.val_set, di.device, T.eval_k, T.eval_batch_size,
                                    _autocast(di.device, self.precision) if self.precision != "fp32" else None, ranks)
            if final and di.main:  # every query's rank: models compared on the same images, query by query
                write_json_atomic(self.run_dir / HELDOUT_RANKS, {"step": self.step, "n": ev["n"], "ranks": ranks},
                                  indent=None)
            self.metrics.write({"step": self.step, "eval": ev})
            self.last = {**self.last, "eval": ev}
            if di.main and self.progress is not False:  # a quiet run (the pipeline's) keeps them in metrics.jsonl
                self.bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if "R@1" in k))
        barrier()

    def checkpoint(self) -> None:
        T = self.cfg.train
        if not ((T.checkpoint_every and self.step % T.checkpoint_every == 0) or self.step == T.steps):
            return
        if self.streamed:
            sync_positions(self.data_state)  # collective: every rank's shard position
        # collective: the run's bad-image count, so that a resumed run logs it on from there
        self.data_state["skipped_global"] = self._skipped_base + global_figures(0.0, self.skipped_since_start(),
                                                                                 self.di.device)[1]
        rng = all_rng_states()  # collective: each rank resumes with its own generators
        args = (self.run_dir, self.step, self.net, self.optimizer, self.scheduler, self.scaler, self.data_state,
                self.cfg.model_dump(mode="json"), T.keep_checkpoints)
        if T.strategy == "fsdp":  # collective: each rank writes its own shards (dcp/), nothing is gathered
            save_checkpoint(*args, rng=rng, sharded=True)
        elif self.di.main:
            save_checkpoint(*args, rng=rng)
        barrier()

    def training_record(self) -> dict:
        """What the model card says about this run (llm2clip.hub); no paths, only file names."""
        cfg, T, f = self.cfg, self.cfg.train, self.cfg.data.features
        feats = None if f is None else (f"feature store `{Path(f.store).name}`" if f.store
                                        else f"embedded in memory ({f.encoder.kind})")
        return {"name": self.run_dir.resolve().name, "steps": T.steps, "batch_size": T.batch_size,
                "lr": cfg.optim.lr, "precision": self.precision, "world_size": self.di.world, "seed": cfg.seed,
                "data": {"train": describe_source(cfg.data.train), "val": describe_source(cfg.data.val),
                         "caption_kinds": cfg.data.caption_kinds},
                "features": feats, "final_loss": self.last.get("loss"),
                "skipped_images": self.last.get("skipped_images"), "truncated_captions": self.truncated,
                "final_eval": self.last.get("eval")}

    def finish(self) -> dict:
        """The final model/ (gathered off the ranks under FSDP) with config.json and its card (save_pretrained);
        returns the last metrics."""
        if self.fsdp and self.full is None:  # the weights only: the optimizer state stays sharded
            self.full = (gather_full_model(self.net), None)
        if self.di.main:
            out = self.run_dir / "model"
            self.net.training_record = self.training_record()
            if self.full:
                save_model(self.net, out, self.full[0])
                self.net.write_hub_config(out)
                write_model_card(out)
            else:
                self.net.save_pretrained(out)
        return self.last

    # ------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        cfg, T, di = self.cfg, self.cfg.train, self.di
        if di.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.data()
        self.model()
        self.restore()
        if di.main:
            write_json_atomic(self.run_dir / "config.json", cfg.model_dump(mode="json"))
        self.loaders()
        self.metrics = _Metrics(self.run_dir / "metrics.jsonl" if di.main else None,
                                Tracker(cfg.logging, self.run_dir, cfg.model_dump(mode="json"), enabled=di.main))
        self._skipped_start = self.data_state["skipped"]
        # the run's count before this process (rank 0's own count in checkpoints written before it was kept)
        self._skipped_base = int(self.data_state.get("skipped_global", self.data_state["skipped"]))
        if self.truncated:
            self.metrics.write({"step": self.step, "truncated_captions": self.truncated})
        p = self.progress
        self.bar = tqdm(total=T.steps, initial=self.step, unit="step", desc="stage 2",
                        disable=True if (not di.main or p is False) else (None if p is None else False))
        self._t0, self._n = time.perf_counter(), 0
        self._it = iter(self.loader)
        self.train_model.train()
        try:
            while self.step < T.steps:
                loss = self.train_step()
                self.log_step(loss)
                self.evaluate()
                self.checkpoint()
                self.bar.update(1)
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step)
        finally:
            self.bar.close()
            self.metrics.close()
        return self.finish()


def fit(cfg: RunConfig, resume: str | bool | None = True, progress: bool | None = None,
        dist_info: DistInfo | None = None, callbacks=()) -> dict:
    """Train from ``cfg``; returns the last metrics.

    ``resume``: True/'latest' continues from the run's newest checkpoint (a fresh start when there is
    none), a path from that checkpoint folder; False/None starts over, clearing the folder's old
    checkpoints and metrics. ``callbacks``: objects with ``on_step_end(trainer, step)``.
    """
    return Stage2Trainer(cfg, resume, progress, dist_info, callbacks).run()


def _build_opt(model, optim_cfg):
    from .optim import build_optimizer

    return build_optimizer(model, optim_cfg)


def _check_bad(state: dict, max_fraction: float) -> None:
    bad, seen = state["skipped"], state["seen"]
    if bad and (max_fraction == 0 or bad + seen >= 200) and bad / (bad + seen) > max_fraction:
        raise InputError(f"{bad} of {bad + seen} images could not be read, more than data.max_bad_fraction="
                         f"{max_fraction}")


def _train_step(train_model, model, micro, loss_fn, optimizer, scaler, precision, optim_cfg, di) -> float:
    """One optimizer step over ``accum_steps`` micro-batches, contrasting the whole accumulated batch.

    With accumulation, features of every micro-batch are first computed without gradients; then each
    micro-batch is recomputed with gradients and the loss over all cached features is backpropagated
    through it (open_clip's accum-freq). The summed gradients equal those of one big batch.
    """
    dev = di.device
    ac = _autocast(dev, precision)
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
    if optim_cfg.grad_clip:
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    val = float(loss.detach())
    if not math.isfinite(val):
        raise FloatingPointError(f"loss is {val}; lower optim.lr or use precision bf16/fp32")
    return val
