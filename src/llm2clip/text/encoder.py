"""CaptionEncoder: a decoder LLM, bidirectional, pooled over the caption tokens."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError
from ..fileio import write_json_atomic
from ..identity import NUMERICS
from .attention import attention_inputs
from .config import LLMEncoderConfig
from .loading import DTYPES, load_tokenizer, load_weights, resolve_source
from .packing import PackedBatch, pack, packed_attention_mask, plan_rows, pool_packed
from .pooling import pool
from .precision import cast_linears
from .template import PromptFormat, prompt_format

log = logging.getLogger(__name__)

ENCODER_MANIFEST = "llm2clip_encoder.json"


@dataclass
class TokenizedCaption:
    ids: list[int]
    pool_start: int  # pooled span [pool_start, pool_end) within ids
    pool_end: int
    truncated: bool


@dataclass
class CaptionBatch:
    input_ids: torch.Tensor  # [B, T], left padded
    token_mask: torch.Tensor  # [B, T] real tokens
    pool_mask: torch.Tensor  # [B, T] pooled tokens

    def to(self, device) -> CaptionBatch:
        return CaptionBatch(self.input_ids.to(device), self.token_mask.to(device), self.pool_mask.to(device))


def check_captions(captions: Sequence, where: str = "caption") -> list[str]:
    """Non-empty strings only; the error names the index of the first bad one."""
    if isinstance(captions, str):
        raise InputError("captions must be a list of strings, not one string")
    out = []
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise InputError(f"{where} {i}: expected a string, got {type(c).__name__}")
        if not c.strip():
            raise InputError(f"{where} {i}: empty caption")
        out.append(c.strip())
    return out


class CaptionEncoder:
    """Encodes captions with an LLM: ``encode(captions) -> Tensor[N, D]`` in input order."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: LLMEncoderConfig, identity: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.prompt: PromptFormat = prompt_format(tokenizer, config.template, config.instruction)
        room = config.max_length - len(self.prompt.prefix_ids) - len(self.prompt.suffix_ids)
        if room < 1:
            raise ConfigError(f"max_length: {config.max_length} leaves no room for the caption after the template")
        self.max_caption_tokens = room
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad with")
        self.pad_id = int(pad)
        self._identity = identity or {}
        self.truncated_count = 0
        self.lm = None

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_config(cls, config: LLMEncoderConfig, with_lm_head: bool = False) -> CaptionEncoder:
        """Load, merge adapters, cast. ``with_lm_head`` also keeps the LM head (for MNTP) as
        ``encoder.lm``, which shares the encoder's body."""
        source = resolve_source(config.model, config.gguf_file)
        manifest = Path(source.path) / ENCODER_MANIFEST
        base_identity = json.loads(manifest.read_text())["identity"] if manifest.is_file() else None
        tokenizer = load_tokenizer(source)
        # in the dtype asked for (an 8B encoder never passes through a 32 GB fp32 copy); the hash is the fp32 one
        loaded, digest = load_weights(source, dtype=DTYPES[config.dtype], causal_lm=with_lm_head,
                                      adapters=config.adapters, attn_implementation=config.attn_implementation)
        lm = loaded if with_lm_head else None
        model = loaded.get_decoder() if with_lm_head else loaded
        identity = {
            "base_model": (base_identity or {}).get("base_model", config.model),
            "weight_hash": digest,
            "adapters": [*(base_identity or {}).get("adapters", []), *[Path(a).name for a in config.adapters]],
        }
        (lm or model).to(device=config.device, dtype=DTYPES[config.dtype]).eval()
        (lm or model).requires_grad_(False)
        if config.bf16_linears != "none":
            if config.dtype != "float32":  # a config changed without validation (model_copy)
                raise ConfigError(f"bf16_linears {config.bf16_linears!r} needs dtype float32, not {config.dtype}")
            cast_linears(model, config.bf16_linears)  # after hashing: the identity keeps the fp32 weights
        enc = cls(model, tokenizer, config, identity)
        enc.lm = lm
        return enc

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> CaptionEncoder:
        """Load a saved caption encoder directory, with its settings from its manifest."""
        manifest = Path(path) / ENCODER_MANIFEST
        if not manifest.is_file():
            raise ConfigError(f"{path}: no {ENCODER_MANIFEST}; not a saved caption encoder")
        settings = json.loads(manifest.read_text())["encoder"]
        settings.update(model=str(path), adapters=[], gguf_file=None, **overrides)
        return cls.from_config(LLMEncoderConfig(**settings))

    def save(self, path: str | Path) -> None:
        """Weights (merged), tokenizer and the manifest that pins this encoder's identity."""
        if self.config.bf16_linears != "none":
            raise ConfigError("a caption encoder with bf16_linears holds bf16-rounded weights; save it from an fp32 "
                              "load (bf16_linears: none)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        settings = self.config.model_dump(exclude={"model", "adapters", "gguf_file", "device"})
        # the manifest goes last: a folder that has it holds a whole encoder
        write_json_atomic(path / ENCODER_MANIFEST, {"encoder": settings, "identity": self.identity()})

    def identity(self) -> dict:
        """Everything that changes an embedding: recorded in stores and checkpoints, checked on use."""
        c = self.config
        return {
            **self._identity,
            "bidirectional": c.bidirectional,
            "pooling": c.pooling,
            "template": c.template,
            "prefix": self.prompt.prefix_text,
            "suffix": self.prompt.suffix_text,
            "pool_template_suffix": c.pool_template_suffix,
            "instruction": c.instruction,
            "max_length": c.max_length,
            "dim": self.dim,
            # how the numbers were computed: recorded and compared, a difference is a warning (llm2clip.identity)
            NUMERICS: {"dtype": c.dtype, "batching": c.batching,
                       # recorded only when used: identities from before the option stay as they were
                       **({"bf16_linears": c.bf16_linears} if c.bf16_linears != "none" else {})},
        }

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------------------- tokens
    def tokenize(self, captions: Sequence[str]) -> list[TokenizedCaption]:
        captions = check_captions(captions)
        lead = self.prompt.caption_lead
        body = self.tokenizer([lead + c for c in captions], add_special_tokens=False)["input_ids"]
        pre, suf = list(self.prompt.prefix_ids), list(self.prompt.suffix_ids)
        out = []
        for i, ids in enumerate(body):
            if not ids:
                raise InputError(f"caption {i}: encodes to zero tokens: {captions[i]!r}")
            truncated = len(ids) > self.max_caption_tokens
            ids = ids[: self.max_caption_tokens]
            end = len(pre) + len(ids) + (len(suf) if self.config.pool_template_suffix else 0)
            out.append(TokenizedCaption(pre + ids + suf, len(pre), end, truncated))
        return out

    def collate(self, items: Sequence[TokenizedCaption], padding_side: str = "left") -> CaptionBatch:
        T = max(len(t.ids) for t in items)
        ids = torch.full((len(items), T), self.pad_id, dtype=torch.long)
        tok = torch.zeros(len(items), T, dtype=torch.bool)
        pm = torch.zeros(len(items), T, dtype=torch.bool)
        for b, t in enumerate(items):
            off = T - len(t.ids) if padding_side == "left" else 0
            ids[b, off : off + len(t.ids)] = torch.tensor(t.ids)
            tok[b, off : off + len(t.ids)] = True
            pm[b, off + t.pool_start : off + t.pool_end] = True
        return CaptionBatch(ids, tok, pm)

    # --------------------------------------------------------------------------- forward
    def hidden_states(self, batch: CaptionBatch) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        extra = attention_inputs(batch.token_mask, bidirectional=self.config.bidirectional, dtype=dtype)
        out = self.model(input_ids=batch.input_ids, use_cache=False, **extra)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(self, batch: CaptionBatch) -> torch.Tensor:
        """Pooled embeddings [B, D] in the model's dtype; differentiable (used by stage 1 too)."""
        return pool(self.hidden_states(batch), batch.pool_mask, batch.token_mask, self.config.pooling)

    __call__ = forward

    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """Pooled embeddings [N, D] of a packed batch, each caption computed as if alone."""
        dtype = next(self.model.parameters()).dtype
        mask = packed_attention_mask(batch.segment, bidirectional=self.config.bidirectional, dtype=dtype)
        out = self.model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                         use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool_packed(hidden, batch, self.config.pooling)

    def _batches(self, items: Sequence[TokenizedCaption], batch_size: int):
        """(item indices, batch) in the order they are encoded (see ``LLMEncoderConfig.batching``)."""
        mode = self.config.batching
        if mode in ("exact", "padded"):
            order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
            while order:
                n = min(batch_size, len(order))
                if mode == "exact":  # cut where the length changes: no caption is padded
                    n = next((j for j in range(1, n) if len(items[order[j]].ids) != len(items[order[0]].ids)), n)
                idx, order = order[:n], order[n:]
                yield idx, self.collate([items[i] for i in idx])
            return
        rows = plan_rows([len(t.ids) for t in items], self.config.pack_tokens)
        group: list[list[int]] = []
        for r, row in enumerate(rows):
            group.append(row)
            if sum(map(len, group)) >= batch_size or r == len(rows) - 1:
                yield [i for g in group for i in g], pack(items, group, self.pad_id)
                group = []

    @torch.inference_mode()
    def encode(self, captions: Sequence[str], batch_size: int | None = None,
               progress: bool | None = None) -> torch.Tensor:
        """Embeddings [N, D] (float32, CPU) in input order; batches sorted by length."""
        items = self.tokenize(captions)
        self.truncated_count = sum(t.truncated for t in items)
        if self.truncated_count:
            log.warning("%d of %d captions truncated to max_length=%d", self.truncated_count, len(items),
                        self.config.max_length)
        out = torch.empty(len(items), self.dim, dtype=torch.float32)
        bar = tqdm(total=len(items), unit="caption", desc="encode", leave=False,
                   disable=not progress if progress is not None else None)
        for idx, batch in self._batches(items, batch_size or self.config.batch_size):
            batch = batch.to(self.device)
            emb = self.forward_packed(batch) if isinstance(batch, PackedBatch) else self.forward(batch)
            out[idx] = emb.float().cpu()
            bar.update(len(idx))
        bar.close()
        return out
