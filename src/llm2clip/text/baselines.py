"""The text encoders a caption encoder is compared with: a sentence encoder and random vectors."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..assets import resolve_model_alias
from ..errors import ConfigError
from .config import RandomEncoderConfig, SentenceEncoderConfig
from .encoder import check_captions
from .loading import weight_hash


class SentenceEncoder:
    """BERT-style encoder with attention-masked mean pooling and L2 normalisation (all-MiniLM-L6-v2)."""

    def __init__(self, config: SentenceEncoderConfig):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_alias(config.model)
        if not Path(path).is_dir():
            raise ConfigError(f"model: {path}: sentence-encoder directory not found")
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(config.device).eval()
        self.model.requires_grad_(False)
        self._identity = {"base_model": config.model, "weight_hash": weight_hash(self.model), "pooling": "mean",
                          "max_length": config.max_length, "dim": self.dim}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def identity(self) -> dict:
        return dict(self._identity)

    @torch.inference_mode()
    def encode(self, captions: Sequence[str], batch_size: int | None = None,
               progress: bool | None = None) -> torch.Tensor:
        captions = check_captions(captions)
        bs = batch_size or self.config.batch_size
        order = sorted(range(len(captions)), key=lambda i: -len(captions[i]))
        out = torch.empty(len(captions), self.dim)
        for s in tqdm(range(0, len(order), bs), desc="encode", leave=False,
                      disable=(not progress) if progress is not None else None):
            idx = order[s : s + bs]
            enc = self.tokenizer([captions[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.config.max_length, return_tensors="pt").to(self.config.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].to(h.dtype)
            out[idx] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).float().cpu()
        return out


class RandomEncoder:
    """A fixed random vector per caption text (seeded), the chance floor."""

    def __init__(self, config: RandomEncoderConfig):
        self.config = config
        self.dim = config.dim

    def identity(self) -> dict:
        return {"base_model": "random", "seed": self.config.seed, "dim": self.dim}

    def encode(self, captions: Sequence[str], batch_size: int | None = None,
               progress: bool | None = None) -> torch.Tensor:
        captions = check_captions(captions)
        out = torch.empty(len(captions), self.dim)
        for i, c in enumerate(captions):
            seed = int.from_bytes(hashlib.sha256(f"{self.config.seed}:{c}".encode()).digest()[:8], "little")
            out[i] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
        return out
