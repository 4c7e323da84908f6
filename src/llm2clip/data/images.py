"""Image-caption data for stage 2: records, manifests, caption features, and the training dataset.

A record is one image with its captions grouped by kind (short, dense, ...). The dataset picks
one caption per sample (kind by configured probability, seeded by sample and epoch) and returns
its stored LLM embedding (adapter text side) or its CLIP tokens (baseline text side). Embeddings
come from anything with ``dim`` and ``get_by_ids(ids)``: the on-disk FeatureStore, or
``InMemoryFeatures`` for tests and CPU runs.

A missing or corrupt image is skipped (the next record stands in, so batches keep their size,
which the cross-process gather needs) and counted; the training loop turns too many into an error.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from ..config import StrictModel
from ..errors import InputError
from ..fileio import image_errors, open_image
from .jsonl import read_manifest


class CaptionFeatures(Protocol):
    """What stage 2 needs from a caption-embedding store."""

    dim: int

    def get_by_ids(self, ids: list[str]) -> np.ndarray: ...


class InMemoryFeatures:
    """A dict-backed stand-in for the FeatureStore (same reader API)."""

    def __init__(self, vectors: dict[str, np.ndarray], identity: dict | None = None):
        if not vectors:
            raise InputError("no caption features")
        self._ids = {k: i for i, k in enumerate(vectors)}
        self._mat = np.stack([np.asarray(v, dtype=np.float32) for v in vectors.values()])
        self.dim = int(self._mat.shape[1])
        self.identity = dict(identity or {"dim": self.dim})

    def __len__(self) -> int:
        return len(self._ids)

    def get_by_ids(self, ids: list[str]) -> np.ndarray:
        try:
            rows = [self._ids[i] for i in ids]
        except KeyError as err:
            raise InputError(f"caption id {err.args[0]!r} is not in the feature store") from None
        return self._mat[rows]

    def check_identity(self, expected: dict) -> None:
        from ..model import check_identity

        check_identity(expected, self.identity, "feature store")


# -------------------------------------------------------------------------- bag-of-words encoder
class BagOfWordsConfig(StrictModel):
    """A cheap deterministic caption encoder: the sum of seeded random vectors of words and word
    pairs. Not a model of language; a fast stand-in with real text dependence for tests."""

    kind: Literal["bow"] = "bow"
    dim: int = Field(256, ge=8)
    seed: int = 0
    bigrams: bool = True


class BagOfWordsEncoder:
    def __init__(self, config: BagOfWordsConfig):
        self.config = config
        self.dim = config.dim
        self._cache: dict[str, np.ndarray] = {}

    def identity(self) -> dict:
        c = self.config
        return {"base_model": "bag-of-words", "seed": c.seed, "bigrams": c.bigrams, "dim": c.dim}

    def _vec(self, token: str) -> np.ndarray:
        v = self._cache.get(token)
        if v is None:
            h = int.from_bytes(hashlib.sha256(f"{self.config.seed}:{token}".encode()).digest()[:8], "little")
            v = self._cache[token] = np.random.default_rng(h).standard_normal(self.dim).astype(np.float32)
        return v

    def encode(self, captions: Sequence[str], batch_size: int | None = None, progress: bool | None = None):
        out = np.zeros((len(captions), self.dim), dtype=np.float32)
        for i, c in enumerate(captions):
            words = "".join(ch.lower() if ch.isalnum() else " " for ch in c).split()
            toks = words + ([f"{a}_{b}" for a, b in zip(words, words[1:])] if self.config.bigrams else [])
            for t in toks:
                out[i] += self._vec(t)
        return torch.from_numpy(out)


def build_caption_encoder(config):
    """llm2clip.text.build_text_encoder, plus the bag-of-words stand-in."""
    if isinstance(config, BagOfWordsConfig):
        return BagOfWordsEncoder(config)
    from ..text import build_text_encoder

    return build_text_encoder(config)


def encode_captions(captions: dict[str, str], encoder, batch_size: int = 64) -> InMemoryFeatures:
    """Embed captions (id -> text) in memory with a caption encoder; the LLM-free stand-in for the store."""
    ids = list(captions)
    texts = [captions[i] for i in ids]
    vecs = encoder.encode(texts, batch_size=batch_size)
    vecs = vecs.float().cpu().numpy() if isinstance(vecs, torch.Tensor) else np.asarray(vecs, np.float32)
    return InMemoryFeatures(dict(zip(ids, vecs)), encoder.identity())


# ------------------------------------------------------------------------------------- records
@dataclass
class Caption:
    id: str
    text: str | None = None


@dataclass
class Record:
    image: str | int  # a path, or an index for in-memory image sources
    captions: dict[str, list[Caption]] = field(default_factory=dict)


def _add(rec: Record, kind: str, cid: str, text: str | None) -> None:
    rec.captions.setdefault(kind, []).append(Caption(cid, text))


def image_path(root: Path, name: str, where: str, allow_absolute: bool = False) -> str:
    """A manifest's image path joined to ``root``: a relative one whose ``..`` parts lead out of ``root`` is
    refused, an absolute one unless allowed. Checked by the names alone (no file access, so cheap on
    millions of rows); a symlink inside ``root`` may still point elsewhere, as the data's owner set it up."""
    p = Path(name)
    if p.is_absolute():
        if not allow_absolute:
            raise InputError(f"{where}: image path {name!r} is absolute; manifests name images relative to the "
                             "image root (set allow_absolute_paths: true on the manifest source to allow it)")
        return name
    joined, base = os.path.abspath(root / p), os.path.abspath(root)
    if os.path.commonpath([base, joined]) != base:
        raise InputError(f"{where}: image path {name!r} leads outside the image root {str(root)!r}")
    return str(root / p)


def load_manifest(path: str | Path, image_root: str | Path | None = None,
                  allow_absolute_paths: bool = False) -> list[Record]:
    """Image records of a manifest (``llm2clip.data.jsonl.read_manifest``: JSONL, one image per line,
    {"image": "a.jpg", "captions": [{"id": "c1", "kind": "dense", "text": "..."}]}, text optional; or CSV
    image, caption_id, kind[, text], rows of an image grouped by its path). Relative image paths are taken
    from ``image_root`` (default: the manifest's folder) and must stay inside it; absolute ones need
    ``allow_absolute_paths``."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    records: dict[str, Record] = {}
    for cap in read_manifest(path):
        rec = records.get(cap.image)
        if rec is None:  # the image's path checked on first sight
            rec = records[cap.image] = Record(image_path(root, cap.image, cap.where, allow_absolute_paths))
        _add(rec, cap.kind, cap.id, cap.text)
    if not records:
        raise InputError(f"{path}: no records")
    return list(records.values())


def load_image_file(path: str) -> Image.Image:
    """Decoded now, so a truncated file fails here (one of ``fileio.image_errors()``) and is skipped."""
    return open_image(path)


def caption_texts(records: Sequence[Record]) -> dict[str, str]:
    out = {}
    for r in records:
        for caps in r.captions.values():
            for c in caps:
                if c.text is None:
                    raise InputError(f"caption {c.id} has no text; in-memory encoding and the CLIP text tower need it")
                out[c.id] = c.text
    return out


# ------------------------------------------------------------------------------------- dataset
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


class PairDataset(torch.utils.data.Dataset):
    """Indexed by (record index, epoch); returns (image [3,H,W], text, skipped).

    text is the caption's stored embedding (``features`` given) or its token ids (``tokenize`` given).
    ``skipped`` counts the unreadable images passed over to produce this sample.
    """

    def __init__(self, records: Sequence[Record], load_image: Callable[[str | int], Image.Image], transform,
                 kinds: dict[str, float], seed: int = 0, features: CaptionFeatures | None = None,
                 tokenize: Callable[[list[str]], torch.Tensor] | None = None, max_tries: int = 64,
                 cache_images: bool = False):
        if (features is None) == (tokenize is None):
            raise ValueError("give exactly one of features (adapter) or tokenize (CLIP text tower)")
        if not kinds or any(p < 0 for p in kinds.values()) or sum(kinds.values()) <= 0:
            raise InputError(f"caption_kinds must give non-negative probabilities with a positive sum: {kinds}")
        self.records, self.load_image, self.transform = list(records), load_image, transform
        self.kinds, self.seed, self.features, self.tokenize = dict(kinds), seed, features, tokenize
        self.max_tries = max_tries
        # cache_images: keep each transformed image (only for a deterministic transform and a small set)
        self._images: dict[int, torch.Tensor] | None = {} if cache_images else None
        for i, r in enumerate(self.records):
            if not any(k in r.captions for k in self.kinds):
                raise InputError(f"record {i} ({r.image}): none of the caption kinds {sorted(self.kinds)}")

    def __len__(self) -> int:
        return len(self.records)

    def choose_caption(self, index: int, epoch: int) -> Caption:
        """Seeded by (seed, index, epoch): the same choice in every worker, rank and resume."""
        rec = self.records[index]
        kinds = [k for k in self.kinds if k in rec.captions and self.kinds[k] > 0]
        p = np.array([self.kinds[k] for k in kinds], dtype=np.float64)
        rng = _rng(self.seed, index, epoch, 1)
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        caps = rec.captions[kind]
        return caps[int(rng.integers(len(caps)))]

    def _image(self, index: int, epoch: int) -> torch.Tensor:
        if self._images is not None:
            if index not in self._images:
                self._images[index] = self.transform(self.load_image(self.records[index].image))
            return self._images[index]
        im = self.load_image(self.records[index].image)
        with torch.random.fork_rng(devices=[]):  # seeded augmentation that leaves the trainer's RNG alone
            # the CPU generator only: torch.manual_seed also seeds every accelerator backend, which
            # (uninitialised) formats a stack trace each time, about 0.5 ms a sample
            torch.default_generator.manual_seed(int(_rng(self.seed, index, epoch, 2).integers(2**62)))
            return self.transform(im)

    def _sample(self, key) -> tuple[torch.Tensor, Caption, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        for skipped in range(self.max_tries):
            i = (index + skipped) % len(self.records)
            try:
                img = self._image(i, epoch)
            except image_errors():  # missing, corrupt, truncated or oversized (decompression bomb) files
                continue
            return img, self.choose_caption(i, epoch), skipped
        raise InputError(f"{self.max_tries} images in a row from record {index} could not be read")

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """A batch of samples, the text side fetched in one call (the DataLoader uses this for a batch)."""
        samples = [self._sample(k) for k in keys]
        texts = batch_texts([cap for _, cap, _ in samples], self.features, self.tokenize)
        return [(img, text, skipped) for (img, _, skipped), text in zip(samples, texts)]


def batch_texts(captions: Sequence[Caption], features: CaptionFeatures | None,
                  tokenize: Callable[[list[str]], torch.Tensor] | None) -> torch.Tensor:
    """The text side of a batch: the captions' stored embeddings [B, D] in one store lookup (adapter), or
    their token ids (CLIP text tower) in one tokenizer call; per-caption calls cost more than the step's data."""
    if features is not None:
        return torch.from_numpy(np.asarray(features.get_by_ids([c.id for c in captions]), dtype=np.float32))
    return tokenize([c.text for c in captions])


def collate(batch):
    imgs, texts, skipped = zip(*batch)
    return torch.stack(imgs), torch.stack(texts), int(sum(skipped))


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys, indexed by global step, so that data position = step.

    Every step takes the next ``global_batch`` samples of a per-epoch seeded permutation; micro-batch
    ``a`` of rank ``r`` is its slice ``(a * world + r)``. Resuming at step s yields exactly what an
    uninterrupted run would, and N ranks together see the samples one rank would.
    """

    def __init__(self, n: int, global_batch: int, world: int = 1, rank: int = 0, accum: int = 1, seed: int = 0,
                 start_step: int = 0, total_steps: int | None = None):
        if global_batch % (world * accum):
            raise InputError(f"batch_size {global_batch} is not divisible by world size x accum_steps "
                             f"({world * accum})")
        if n < global_batch:
            raise InputError(f"the data set has {n} samples, fewer than one batch of {global_batch}")
        self.n, self.G, self.world, self.rank, self.accum, self.seed = n, global_batch, world, rank, accum, seed
        self.micro = global_batch // (world * accum)
        self.per_epoch = n // global_batch  # incomplete last batches are dropped
        self.start_step, self.total_steps = start_step, total_steps

    def __len__(self) -> int:
        steps = (self.total_steps - self.start_step) if self.total_steps is not None else 10**12
        return steps * self.accum

    def _perm(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, epoch, 3).permutation(self.n)

    def __iter__(self):
        step = self.start_step
        epoch, perm = -1, None
        while self.total_steps is None or step < self.total_steps:
            e = step // self.per_epoch
            if e != epoch:
                epoch, perm = e, self._perm(e)
            base = (step % self.per_epoch) * self.G
            for a in range(self.accum):
                s = base + (a * self.world + self.rank) * self.micro
                yield [(int(i), epoch) for i in perm[s : s + self.micro]]
            step += 1
