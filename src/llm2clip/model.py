"""LLM2CLIP: a vision tower with a new head, a text side, and a logit scale (docs/METHOD.md 3.1).

The text side is either the TextAdapter over stored LLM caption embeddings (the method; the LLM
never runs in training) or a plain CLIP text transformer trained jointly (the vanilla-CLIP
baseline on the same data and code). A saved model is ``model.safetensors`` plus
``llm2clip_model.json``, which holds the config and pins the caption encoder's identity;
``save_pretrained`` adds ``config.json`` and a ``README.md`` model card (huggingface_hub's
ModelHubMixin gives ``push_to_hub``), and ``from_pretrained`` also takes a Hub id.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin
from pydantic import Field
from torch import nn

from . import hub
from .config import StrictModel
from .errors import ConfigError, InputError
from .identity import numerics_note, without_numerics
from .vision import VisionConfig, build_vision_tower

log = logging.getLogger(__name__)

MODEL_MANIFEST = "llm2clip_model.json"
MODEL_WEIGHTS = "model.safetensors"
MANIFEST_FORMAT = "llm2clip-model/1"
HUB_CONFIG = "config.json"  # for the Hub's tooling; llm2clip_model.json stays what loading reads


# ---------------------------------------------------------------------------------- configs
class AdapterConfig(StrictModel):
    """The official TextProj: L2-normalise the input, `depth` pre-LN residual MLP blocks, LayerNorm, Linear.

    The official adapter normalises its input (the stored LLM vector) and not its output; `l2_norm: true`
    (the default) does the same. `l2_norm: false` is only an option, for adapters trained on raw vectors.
    """

    kind: Literal["adapter"] = "adapter"
    in_dim: int | None = Field(None, ge=1, description="LLM embedding size; null: taken from the feature store")
    depth: int = Field(4, ge=0)
    expansion: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    l2_norm: bool = True
    standardize: bool = Field(False, description=(
        "z-score each dimension of the normalised embedding with training-caption statistics (frozen buffers). "
        "Not in the official recipe: small LLMs' pooled embeddings share one direction (a few huge "
        "dimensions), which leaves the adapter little signal to start from"))


class ClipTextConfig(StrictModel):
    """open_clip's text transformer (causal, 77 tokens, its BPE tokenizer), trained from scratch."""

    kind: Literal["clip"] = "clip"
    context_length: int = Field(77, ge=4)
    vocab_size: int = 49408
    width: int = Field(512, ge=8)
    heads: int = Field(8, ge=1)
    layers: int = Field(12, ge=1)
    mlp_ratio: float = 4.0


TextSideConfig = Annotated[AdapterConfig | ClipTextConfig, Field(discriminator="kind")]


class ModelConfig(StrictModel):
    vision: VisionConfig
    text: TextSideConfig = Field(default_factory=AdapterConfig)
    embed_dim: int = Field(1280, ge=1, description="shared embedding size (1280 in every LLM2CLIP release)")
    head_init_std: float = Field(2e-5, gt=0, description="std of the new vision head (official: 0.02 x 0.001)")
    loss: Literal["clip", "siglip"] = "clip"
    logit_scale_init: float | None = Field(None, description="null: ln(1/0.07) for clip, ln(10) for siglip")
    logit_scale_max: float = math.log(100)
    logit_bias_init: float = Field(-10.0, description="siglip only")

    def resolve_paths(self, base: Path) -> None:
        self.vision.resolve_paths(base)


# ----------------------------------------------------------------------------------- text side
class _AdapterBlock(nn.Module):
    def __init__(self, dim: int, expansion: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(F.gelu(self.fc1(self.norm(x)))))


class TextAdapter(nn.Module):
    """Maps a stored LLM caption embedding [B, in_dim] to the shared space [B, out_dim].

    With ``l2_norm`` (the default, as in the official TextProj) the input is L2-normalised; the output is
    not (the CLIP loss and ``encode_text`` normalise it).
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 4, expansion: int = 2, dropout: float = 0.0,
                 l2_norm: bool = True, standardize: bool = False):
        super().__init__()
        self.in_dim, self.out_dim, self.l2_norm, self.standardize = in_dim, out_dim, l2_norm, standardize
        if standardize:
            self.register_buffer("in_mean", torch.zeros(in_dim))
            self.register_buffer("in_std", torch.ones(in_dim))
        self.blocks = nn.ModuleList(_AdapterBlock(in_dim, expansion, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise InputError(f"caption embeddings have dim {x.shape[-1]}, the adapter expects {self.in_dim}")
        x = x.to(self.proj.weight.dtype)
        if self.l2_norm:  # stored embeddings are raw pooled vectors (docs/METHOD.md 2)
            x = F.normalize(x, dim=-1)
        if self.standardize:
            x = (x - self.in_mean) / self.in_std
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x))

    @torch.no_grad()
    def fit_standardization(self, embeddings: torch.Tensor) -> None:
        """Set the z-score statistics from training-caption embeddings [N, in_dim] (raw, as stored)."""
        x = embeddings.float()
        if self.l2_norm:
            x = F.normalize(x, dim=-1)
        if x.shape[0] < 2:
            raise InputError("standardize needs at least 2 training caption embeddings")
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp_min(1e-6))


@lru_cache(maxsize=4)
def _clip_tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)  # slow to build (BPE merges): share one


class ClipTextTower(nn.Module):
    """open_clip TextTransformer with its own tokenizer; output already projected to out_dim."""

    def __init__(self, cfg: ClipTextConfig, out_dim: int):
        super().__init__()
        from open_clip.transformer import TextTransformer

        self.transformer = TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                           width=cfg.width, heads=cfg.heads, layers=cfg.layers,
                                           mlp_ratio=cfg.mlp_ratio, output_dim=out_dim)
        self.tokenizer = _clip_tokenizer(cfg.context_length)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from .text.clip_tower import clip_text_forward

        return clip_text_forward(self.transformer, tokens)  # per length bucket: same features, fewer positions


# ----------------------------------------------------------------------------------- identity
def check_identity(expected: dict | None, actual: dict | None, what: str = "caption encoder") -> None:
    """Raise unless the two identities agree on every key they share (and share one); numerics that differ
    (compute dtype, batching) are a warning."""
    if not expected or not actual:
        return
    note = numerics_note(expected, actual, "model trained on", "now")
    if note:
        log.warning("%s %s", what, note)
    expected, actual = without_numerics(expected), without_numerics(actual)
    common = set(expected) & set(actual)
    if not common:
        raise ConfigError(f"{what} identity shares no field with the model's: {sorted(actual)} vs {sorted(expected)}")
    diff = sorted(k for k in common if expected[k] != actual[k])
    if diff:
        lines = "; ".join(f"{k}: model has {expected[k]!r}, got {actual[k]!r}" for k in diff)
        raise ConfigError(f"{what} does not match the one this model was trained with ({lines})")


def caption_encoder_record(features_config, features) -> dict | None:
    """The config that rebuilds the caption encoder behind stage-2 features (JSON), or None when unknown:
    ``data.features.encoder`` for in-memory embeddings, else the encoder a feature store's manifest names."""
    if features_config is None:
        return None
    enc = getattr(features_config, "encoder", None)
    if enc is not None:
        return enc.model_dump(mode="json")
    rec = (getattr(features, "manifest", None) or {}).get("encoder")  # stores made by write_store have none
    return dict(rec) if isinstance(rec, dict) else None


# -------------------------------------------------------------------------------------- model
class LLM2CLIP(nn.Module, ModelHubMixin, library_name="llm2clip", paper_url=hub.PAPER, tags=["llm2clip", "clip"],
               pipeline_tag="zero-shot-image-classification"):
    def __init__(self, cfg: ModelConfig, text_dim: int | None = None, text_identity: dict | None = None,
                 load_pretrained: bool = True, caption_encoder_config: dict | None = None):
        super().__init__()
        self.config = cfg
        self.visual = build_vision_tower(cfg.vision, load_weights=load_pretrained)
        self.head = nn.Linear(self.visual.width, cfg.embed_dim)
        nn.init.trunc_normal_(self.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(self.head.bias)
        t = cfg.text
        if isinstance(t, AdapterConfig):
            dim = t.in_dim or text_dim
            if dim is None:
                raise ConfigError("model.text.in_dim: unknown; set it or give a feature store")
            if t.in_dim and text_dim and t.in_dim != text_dim:
                raise ConfigError(f"model.text.in_dim is {t.in_dim} but the caption embeddings have dim {text_dim}")
            self.text = TextAdapter(dim, cfg.embed_dim, t.depth, t.expansion, t.dropout, t.l2_norm, t.standardize)
        else:
            self.text = ClipTextTower(t, cfg.embed_dim)
        init = cfg.logit_scale_init
        if init is None:
            init = math.log(10.0) if cfg.loss == "siglip" else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(float(init)))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.logit_bias_init)) if cfg.loss == "siglip" else None
        self.text_identity = dict(text_identity) if text_identity else None
        # How to rebuild the caption encoder (its config as JSON), saved so llm2clip.load needs no spec.
        self.caption_encoder_config = dict(caption_encoder_config) if caption_encoder_config else None
        self.caption_encoder = None  # optional, for encode_text(list of str); not saved
        self.training_record: dict | None = None  # what the trainer records for the model card
        self.source_dir: Path | None = None  # the folder it was loaded from (its eval results feed a card)

    # ------------------------------------------------------------------------------ encoders
    @property
    def uses_adapter(self) -> bool:
        return isinstance(self.text, TextAdapter)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if isinstance(self.text, ClipTextTower):
            self.text.transformer.set_grad_checkpointing(enable)

    def attach_caption_encoder(self, encoder) -> None:
        """Use ``encoder`` (llm2clip.text.build_text_encoder(...)) for raw captions; its identity must
        match the one the model was trained with."""
        check_identity(self.text_identity, encoder.identity())
        self.caption_encoder = encoder

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.head(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize: bool = True) -> torch.Tensor:
        """From stored embeddings [B, D] (adapter), token ids [B, 77] (CLIP text tower), or raw captions."""
        if isinstance(text, (list, tuple)):
            if self.uses_adapter:
                if self.caption_encoder is None:
                    raise ConfigError("encode_text got captions but no caption encoder is attached "
                                      "(model.attach_caption_encoder(build_text_encoder(cfg)))")
                text = self.caption_encoder.encode(list(text))
            else:
                text = self.text.tokenize(text)
            text = text.to(self.logit_scale.device)
        x = self.text(text)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, text) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(text)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, self.config.logit_scale_max)

    # ---------------------------------------------------------------------------- save / load
    def manifest(self) -> dict:
        out = {"format": MANIFEST_FORMAT, "config": self.config.model_dump(mode="json"),
               "text_dim": self.text.in_dim if self.uses_adapter else None, "text_identity": self.text_identity,
               "caption_encoder": self.caption_encoder_config}
        if self.training_record:
            out["training"] = self.training_record
        return out

    def save(self, path: str | Path) -> Path:
        """Weights and manifest only (checkpoints); ``save_pretrained`` adds config.json and the card."""
        from safetensors.torch import save_model

        from .fileio import save_atomic, write_json_atomic

        path = Path(path)
        save_atomic(path / MODEL_WEIGHTS, lambda tmp: save_model(self, str(tmp)))
        write_json_atomic(path / MODEL_MANIFEST, self.manifest())  # last: a folder with it is a whole model
        return path

    def hub_config(self) -> dict:
        return {"architectures": ["LLM2CLIP"], "library_name": "llm2clip", "llm2clip_format": MANIFEST_FORMAT,
                "model_config": self.config.model_dump(mode="json"), "embed_dim": self.config.embed_dim,
                "caption_embedding_dim": self.text.in_dim if self.uses_adapter else None}

    def write_hub_config(self, path: str | Path) -> None:
        from .fileio import write_json_atomic

        write_json_atomic(Path(path) / HUB_CONFIG, self.hub_config())

    def _save_pretrained(self, save_directory: Path) -> None:
        # ModelHubMixin.save_pretrained: weights, manifest, config.json here; then the card, which it
        # writes only where no README.md is, so a card of ours is removed to be rewritten.
        self.save(save_directory)
        self.write_hub_config(save_directory)
        card = save_directory / hub.CARD
        if card.is_file() and hub.CARD_MARK in card.read_text(encoding="utf-8"):
            card.unlink()
        self._card_folder = save_directory

    def generate_model_card(self, eval_results: str | Path | None = None, title: str | None = None,
                            **_) -> ModelCard:
        """The card from this model's manifest and, when found, the evaluation results beside the folder
        being written (or the folder it was loaded from)."""
        folder = getattr(self, "_card_folder", None) or self.source_dir
        if eval_results is None:
            for f in (folder, self.source_dir):
                eval_results = eval_results or (hub.find_eval_results(Path(f)) if f else None)
        if title is None and folder is not None:
            title = hub.folder_title(folder)
        return ModelCard(hub.model_card(self.manifest(), eval_results, title or "llm2clip model"))

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """ModelHubMixin.push_to_hub, with the card titled by the repo id."""
        kwargs["model_card_kwargs"] = {"title": repo_id, **(kwargs.get("model_card_kwargs") or {})}
        return super().push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, force_download: bool = False,
                        token: str | bool | None = None, local_files_only: bool = False,
                        map_location: str = "cpu", text_identity: dict | None = None) -> LLM2CLIP:
        """A saved model folder or a Hugging Face Hub id (snapshot_download); reads llm2clip_model.json, so
        folders saved before config.json existed load too."""
        path = hub.resolve_model_dir(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                     token=token, force_download=force_download, local_files_only=local_files_only)
        return cls.load(path, text_identity=text_identity, map_location=map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", text_identity: dict | None = None,
                         **hub_kwargs) -> LLM2CLIP:
        keep = ("revision", "cache_dir", "force_download", "token", "local_files_only")
        return cls.from_pretrained(model_id, map_location=map_location, text_identity=text_identity,
                                   **{k: v for k, v in hub_kwargs.items() if k in keep})

    @classmethod
    def load(cls, path: str | Path, text_identity: dict | None = None, map_location: str = "cpu") -> LLM2CLIP:
        """A saved model, in eval mode; ``text_identity`` (of the store or encoder to be used) is checked
        against the manifest."""
        from safetensors.torch import load_model

        path = Path(path)
        mf = path / MODEL_MANIFEST
        if not mf.is_file():
            raise ConfigError(f"{path}: no {MODEL_MANIFEST}; not a saved LLM2CLIP model")
        manifest = json.loads(mf.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ConfigError(f"{mf}: unknown format {manifest.get('format')!r}")
        check_identity(manifest.get("text_identity"), text_identity)
        cfg = ModelConfig.model_validate(manifest["config"])
        model = cls(cfg, manifest.get("text_dim"), manifest.get("text_identity"), load_pretrained=False,
                    caption_encoder_config=manifest.get("caption_encoder"))
        load_model(model, str(path / MODEL_WEIGHTS), device=map_location)
        model.training_record, model.source_dir = manifest.get("training"), path
        return model.eval()


def write_model_card(folder: str | Path, eval_results: str | Path | None = None, title: str | None = None) -> Path:
    """(Re)write the README.md card of a saved model folder from its manifest, e.g. after ``llm2clip eval``
    (its results are found beside the folder, or give ``eval_results``). A README not written by llm2clip
    is kept (ConfigError)."""
    folder = Path(folder)
    mf = folder / MODEL_MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{folder}: no {MODEL_MANIFEST}; not a saved LLM2CLIP model")
    text = hub.model_card(json.loads(mf.read_text(encoding="utf-8")), eval_results or hub.find_eval_results(folder),
                          title or hub.folder_title(folder))
    return hub.write_card(folder, text)
