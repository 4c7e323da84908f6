"""The stage-1 training loop: caption-contrastive or MNTP LoRA fine-tuning of the caption encoder.

Resumable exactly: batches are a pure function of (seed, step), and a checkpoint (llm2clip.checkpointing,
the layout stage 2 uses) holds the LoRA weights, optimizer, scheduler and RNG states. Data parallel
over torchrun processes: each rank takes its slice of the global batch, contrastive embeddings are
gathered with gradients, and gradients are averaged over ranks after every backward (explicitly rather
than through DDP hooks, which would fire once per chunk under gradient caching).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import checkpointing
from ..data.captions import cupl_caption_set
from ..distributed import from_rank0
from ..errors import ConfigError
from ..eval.cra import caption_retrieval_accuracy, paired_caption_retrieval
from ..fileio import fsync_dir, read_json, write_json_atomic
from ..text.encoder import ENCODER_MANIFEST, CaptionEncoder
from ..tracking import TENSORBOARD_DIR, Tracker
from .config import FinetuneConfig
from .contrastive import bucketed_backward, distributed_contrastive_loss, grad_cached_backward, length_buckets, world
from .data import (
    CaptionGroup,
    GroupedCaptions,
    PairSampler,
    cupl_train_groups,
    load_groups_jsonl,
    load_text_corpus,
    merge_groups,
)
from .lora import TrunkCache, add_lora
from .mntp import mask_id_and_blocks, mask_tokens, mntp_evaluate, mntp_loss, special_mask

log = logging.getLogger(__name__)
STAGE = "stage1"
KEEP_CHECKPOINTS = 2


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - frac) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return f


class Stage1Trainer:
    def __init__(self, cfg: FinetuneConfig, progress: bool | None = None):
        self.cfg = cfg
        self.rank, self.world = world()
        self.out = Path(cfg.out)
        self.progress = progress
        self.ckpt_dir = self.out / "checkpoints"
        if self.cfg.contrastive.batch_size % self.world:
            raise ConfigError(f"contrastive.batch_size {cfg.contrastive.batch_size} is not divisible by "
                              f"{self.world} processes")
        torch.manual_seed(cfg.optim.seed)  # the same LoRA initialisation on every rank

        # the frozen weights in fp32 (bf16 matmuls via autocast) or, to halve a large LLM's memory, in bf16;
        # LoRA's own weights stay fp32 either way (peft keeps adapters in fp32 over a bf16 base)
        ecfg = cfg.encoder.model_copy(update={"dtype": cfg.optim.frozen_dtype})
        mntp = cfg.objective == "mntp"
        self.encoder = CaptionEncoder.from_config(ecfg, with_lm_head=mntp)
        self.base_identity = dict(self.encoder.identity())
        body = self.encoder.model
        if cfg.optim.grad_checkpointing:
            body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        L = cfg.lora
        self.peft = add_lora(body, L.r, L.alpha, L.dropout, L.target_modules, L.top_layers)
        self.encoder.model = self.peft
        if mntp:
            self.encoder.lm.set_decoder(self.peft)
        self.params = [p for p in self.peft.parameters() if p.requires_grad]
        if self.world > 1:
            for p in self.params:
                dist.broadcast(p.data, 0)
        # per-rank streams from here on (dropout masks differ across ranks, as in DDP)
        torch.manual_seed(cfg.optim.seed + self.rank)
        random.seed(cfg.optim.seed + self.rank)
        np.random.seed((cfg.optim.seed + self.rank) % 2**32)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.steps))
        self.step = 0
        self.tracker: Tracker | None = None  # TensorBoard / wandb (rank 0), opened by run()
        # training wall time: earlier processes' (from the checkpoint) + this one's since run(), evaluations excluded
        self._train_s_before, self._t_start, self._eval_s = 0.0, None, 0.0
        self.trunk = None
        if not mntp and L.top_layers and cfg.contrastive.cache_trunk and L.top_layers < body.config.num_hidden_layers:
            self.trunk = TrunkCache(self.encoder, L.top_layers, autocast=self.autocast)
        self.query_encoder = CaptionEncoder(
            self.peft, self.encoder.tokenizer,
            self.encoder.config.model_copy(update={"instruction": cfg.contrastive.query_instruction}))
        self._data()

    # ------------------------------------------------------------------------------ data
    def _data(self) -> None:
        c = self.cfg
        parts: list[GroupedCaptions] = []
        if c.data.cupl_train:
            parts.append(cupl_train_groups(c.data.cupl_per_class, seed=c.optim.seed))
        parts += [load_groups_jsonl(p) for p in c.data.groups]
        if c.objective == "contrastive" and c.data.text:
            # pure text mixed in as unsupervised SimCSE pairs: a document and itself, told apart by dropout
            docs = [t for p in c.data.text for t in load_text_corpus(p)]
            parts.append(GroupedCaptions([CaptionGroup(f"text:{i}", [d, d]) for i, d in enumerate(docs)]))
        self.groups = merge_groups(parts) if parts else GroupedCaptions()
        if c.objective == "contrastive":
            self.sampler = PairSampler(self.groups, seed=c.optim.seed, hard_negatives=c.contrastive.hard_negatives)
        else:
            docs = [t for p in c.data.text for t in load_text_corpus(p)] + self.groups.all_captions()
            self.mask_id, blocks = mask_id_and_blocks(self.encoder.tokenizer, docs, c.mntp)
            rng = random.Random(c.optim.seed)
            rng.shuffle(blocks)
            n_eval = max(1, int(len(blocks) * c.data.heldout_text_fraction)) if c.data.heldout_text_fraction else 0
            self.eval_blocks, self.train_blocks = blocks[:n_eval], blocks[n_eval:]
            if not self.train_blocks:
                raise ConfigError("mntp: the text gives no training block; add text or lower mntp.block_size")
        e = c.eval
        self.eval_set = cupl_caption_set("heldout", e.cupl_classes, e.per_class, e.mask_class_names)
        self.eval_pairs = {}  # held-out group file -> (query captions, positive captions)
        for path in e.groups:
            pairs = [(g.captions[g.kinds.index(e.query_kind)], g.captions[g.kinds.index(e.doc_kind)])
                     for g in load_groups_jsonl(path).groups if g.kinds and {e.query_kind, e.doc_kind} <= set(g.kinds)]
            if not pairs:
                raise ConfigError(f"eval.groups: {path} has no group with both a {e.query_kind!r} and a "
                                  f"{e.doc_kind!r} caption")
            name = Path(path).stem
            if name in self.eval_pairs:
                raise ConfigError(f"eval.groups: two files named {name}.jsonl (their metrics would share a name)")
            self.eval_pairs[name] = ([q for q, _ in pairs], [p for _, p in pairs])

    def eval_captions(self) -> list[str]:
        return [*self.eval_set.captions, *(c for q, p in self.eval_pairs.values() for c in (*q, *p))]

    def autocast(self):
        if self.cfg.optim.precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.cfg.encoder.device).type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------ steps
    def embed_items(self, items) -> torch.Tensor:
        batch = self.encoder.collate(items).to(self.encoder.device)
        with self.autocast():
            return self.trunk.forward(items, batch) if self.trunk else self.encoder.forward(batch)

    def contrastive_step(self) -> dict:
        c = self.cfg.contrastive
        B = c.batch_size // self.world
        pairs = self.sampler.batch(self.step, c.batch_size)[self.rank * B : (self.rank + 1) * B]
        if len(pairs) < B:
            raise ConfigError(f"contrastive.batch_size {c.batch_size} is larger than the number of groups")
        q_items = self.query_encoder.tokenize([p.query for p in pairs])
        docs = [p.positive for p in pairs] + ([p.negative for p in pairs] if c.hard_negatives else [])
        items = q_items + self.encoder.tokenize(docs)
        groups = torch.tensor([p.group for p in pairs])
        doc_groups = (torch.cat([groups, torch.tensor([p.negative_group for p in pairs])]) if c.hard_negatives
                      else groups)
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        buckets = length_buckets([len(items[i].ids) for i in order], c.bucket_ratio, c.chunk_size)
        chunks = [[items[order[j]] for j in b] for b in buckets]

        def loss_fn(emb_sorted):
            emb = emb_sorted[inverse]
            return distributed_contrastive_loss(
                emb[:B], emb[B:], torch.arange(B), groups, doc_groups, scale=c.scale,
                mask_same_group=c.mask_same_group, symmetric=c.symmetric)

        backward = grad_cached_backward if c.chunk_size else bucketed_backward
        loss = backward(self.embed_items, chunks, loss_fn)
        return {"loss": loss.item(), "tokens": sum(len(t.ids) for t in items)}

    def mntp_step(self) -> dict:
        m = self.cfg.mntp
        rng = random.Random(f"{self.cfg.optim.seed}:{self.step}")
        bs = m.batch_size * self.world
        idx = [rng.randrange(len(self.train_blocks)) for _ in range(bs)][self.rank * m.batch_size:][: m.batch_size]
        part = [self.train_blocks[i] for i in idx]
        T = max(len(b) for b in part)
        tok = self.encoder.tokenizer
        ids = torch.full((len(part), T), self.encoder.pad_id, dtype=torch.long)
        tm = torch.zeros(len(part), T, dtype=torch.bool)
        for i, b in enumerate(part):
            ids[i, : len(b)] = torch.tensor(b)
            tm[i, : len(b)] = True
        g = torch.Generator().manual_seed(hash((self.cfg.optim.seed, self.step, self.rank)) % 2**62)
        vocab = self.encoder.lm.get_output_embeddings().weight.shape[0]
        inputs, labels = mask_tokens(ids, special_mask(tok, ids) | ~tm, self.mask_id, vocab, g, m.mask_probability)
        dev = self.encoder.device
        with self.autocast():
            loss, info = mntp_loss(self.encoder.lm, inputs.to(dev), labels.to(dev), tm.to(dev),
                                   self.cfg.encoder.bidirectional)
        loss.backward()
        return {"loss": loss.item(), "masked_accuracy": info["masked_accuracy"], "tokens": int(tm.sum())}

    def _sync_grads(self) -> None:
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world

    def train_step(self) -> dict:
        self.peft.train()
        self.opt.zero_grad(set_to_none=True)
        info = self.contrastive_step() if self.cfg.objective == "contrastive" else self.mntp_step()
        self._sync_grads()
        if self.world > 1:  # log the global-batch loss and token count, not this rank's share
            t = torch.tensor([info["loss"], info["tokens"]], dtype=torch.float64, device=self.encoder.device)  # NCCL
            dist.all_reduce(t)
            info["loss"], info["tokens"] = t[0].item() / self.world, int(t[1].item())
        if self.cfg.optim.grad_clip:
            info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip))
        self.opt.step()
        self.sched.step()
        self.step += 1
        info["lr"] = self.sched.get_last_lr()[0]
        return info

    # ----------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        self.peft.eval()
        if self.cfg.objective == "mntp":
            res = mntp_evaluate(self.encoder.lm, self.encoder.tokenizer, self.eval_blocks, self.mask_id) \
                if self.eval_blocks else {}
        else:
            res = {}
        items = self.encoder.tokenize(self.eval_captions())
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        emb = torch.empty(len(items), self.encoder.dim)
        for s in range(0, len(order), 64):
            idx = order[s : s + 64]
            emb[idx] = self.embed_items([items[i] for i in idx]).float().cpu()
        n = len(self.eval_set.captions)
        cra = caption_retrieval_accuracy(emb[:n], self.eval_set.groups)
        res.update({f"cra_{k}": v for k, v in cra.items()})
        e = self.cfg.eval
        for name, (q, p) in self.eval_pairs.items():
            m = paired_caption_retrieval(emb[n : n + len(q)], emb[n + len(q) : n + 2 * len(q)], p)
            res.update({f"{name}_{e.query_kind}_{e.doc_kind}_{k}": v for k, v in m.items()})
            n += 2 * len(q)
        return res

    # ----------------------------------------------------------------------- checkpoints
    def state(self, rng: list[dict] | None = None) -> dict:
        """Tensors and plain data only, so that loading needs no pickle (weights_only)."""
        return {
            "lora": {n: p.detach().cpu() for n, p in self.peft.named_parameters() if p.requires_grad},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng if rng is not None else [checkpointing.rng_state()],
            "config": self.cfg.model_dump(mode="json"),
            "train_s": self.train_s(),
        }

    def save_checkpoint(self) -> None:
        rng = checkpointing.all_rng_states()  # collective: each rank resumes with its own generators
        if self.rank != 0:
            return
        checkpointing.write_checkpoint(self.ckpt_dir, self.step, self.state(rng), STAGE, keep=KEEP_CHECKPOINTS)

    def latest_checkpoint(self) -> Path | None:
        return checkpointing.latest_checkpoint(self.ckpt_dir)

    def load_checkpoint(self, path: Path) -> None:
        """Checkpoint folder ``path``; one holding pickled objects is refused unread (InputError)."""
        st = checkpointing.load_state(path, STAGE)
        named = dict(self.peft.named_parameters())
        with torch.no_grad():
            for n, t in st["lora"].items():
                named[n].copy_(t)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        checkpointing.restore_rng(st["rng"], self.rank, self.world)
        self.step = int(st["step"])
        self._train_s_before = float(st.get("train_s", 0.0))

    # ------------------------------------------------------------------------------ run
    def train_s(self) -> float:
        """Seconds spent training so far, by this process and the ones it resumed from (evaluations excluded)."""
        here = 0.0 if self._t_start is None else time.perf_counter() - self._t_start - self._eval_s
        return self._train_s_before + here

    def log(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tracker is not None:
                self.tracker.log(rec)

    def run(self, resume: bool = True) -> dict:
        c = self.cfg
        done, summary = self.out / "encoder" / ENCODER_MANIFEST, self.out / "summary.json"
        if from_rank0(done.is_file() and summary.is_file()):  # one decision for every rank
            log.info("%s is finished already (%s exists); nothing to do", self.out, done)
            return read_json(summary)
        if done.is_file() and self.rank == 0:
            # an encoder without its summary (killed in between by an older version): not finished; the
            # final checkpoint is resumed, so no step is trained again, and the export redone
            log.info("%s: encoder without summary.json; exporting again from the final checkpoint", self.out)
            shutil.rmtree(self.out / "encoder")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            write_json_atomic(self.out / "config.json", c.model_dump())
        ck = from_rank0(self.latest_checkpoint() if resume else None)  # rank 0's view of the folder
        if ck:
            self.load_checkpoint(ck)
            log.info("resumed from %s (step %d)", ck.name, self.step)
        elif self.rank == 0:  # starting over: the earlier run's checkpoints and metrics go
            if checkpointing.clear(self.ckpt_dir):
                log.info("starting over: removed the checkpoints of %s", self.out)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.out / TENSORBOARD_DIR, ignore_errors=True)
        self.tracker = Tracker(c.logging, self.out, c.model_dump(mode="json"), enabled=self.rank == 0)
        try:
            return self._train()
        finally:
            self.tracker.close()

    def _train(self) -> dict:
        c = self.cfg
        self._t_start, self._eval_s = time.perf_counter(), 0.0
        t_start = self._t_start
        if self.trunk:
            # every caption's frozen trunk once, up front, in length-sorted batches
            caps = sorted({c for g in self.sampler.groups for c in g.captions})
            evals = self.eval_captions() if c.eval.final or c.eval.every else []
            items = self.encoder.tokenize(caps) + (self.encoder.tokenize(evals) if evals else [])
            if self.cfg.contrastive.query_instruction:
                items += self.query_encoder.tokenize(caps)
            self.trunk.fill(items, progress=self.progress if self.rank == 0 else False)
            self.log({"step": self.step, "trunk_captions": len(self.trunk.store),
                      "trunk_s": round(time.perf_counter() - t_start, 1)})
        bar = tqdm(total=c.optim.steps, initial=self.step, desc=f"stage 1 {c.objective}", unit="step",
                   disable=(self.rank != 0) or ((not self.progress) if self.progress is not None else None))
        while self.step < c.optim.steps:
            t0 = time.perf_counter()
            info = self.train_step()
            info.update(step=self.step, step_s=round(time.perf_counter() - t0, 3))
            if c.eval.every and self.step % c.eval.every == 0 and self.step < c.optim.steps:
                t_eval = time.perf_counter()
                info["train_s"] = round(self.train_s(), 3)
                info.update(self.evaluate())
                self._eval_s += time.perf_counter() - t_eval
            if self.step % c.log_every == 0 or "cra_R@1" in info:
                self.log(info)
            if self.step % c.save_every == 0 and self.step < c.optim.steps:
                self.save_checkpoint()
            bar.set_postfix(loss=f"{info['loss']:.3f}")
            bar.update(1)
        bar.close()
        train_s = self.train_s()
        final = {"step": self.step, **(self.evaluate() if c.eval.final else {})}
        self.log({**final, "final": True})
        self.save_checkpoint()
        summary = {**final, "train_s": round(train_s, 3)}
        if self.rank == 0:  # the summary first: encoder/ appearing is what marks the run finished
            write_json_atomic(self.out / "summary.json", summary)
            self.export(summary)
        return summary

    def export(self, summary: dict | None = None) -> None:
        """adapter/ (LoRA on the body) and encoder/ (merged weights, manifest and a README.md card)."""
        self.peft.save_pretrained(self.out / "adapter")
        merged = self.peft.merge_and_unload()
        tmp = self.out / "encoder.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        enc = CaptionEncoder(merged, self.encoder.tokenizer,
                             self.encoder.config.model_copy(update={"adapters": []}),
                             {"base_model": self.base_identity["base_model"],
                              "adapters": [*self.base_identity.get("adapters", []), f"{self.out.name}/adapter"]})
        from ..text.loading import weight_hash

        enc._identity["weight_hash"] = weight_hash(merged)
        enc.save(tmp)
        from ..hub import encoder_card, write_card

        mf = json.loads((tmp / ENCODER_MANIFEST).read_text(encoding="utf-8"))
        write_card(tmp, encoder_card(mf, summary, self.cfg.model_dump(mode="json"), f"{self.out.name} caption encoder"))
        shutil.rmtree(self.out / "encoder", ignore_errors=True)
        os.replace(tmp, self.out / "encoder")
        fsync_dir(self.out)
