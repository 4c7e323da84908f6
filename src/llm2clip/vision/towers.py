"""Vision towers behind one interface: ``forward(images) -> [B, width]`` pooled features, before any projection.

Every tower exposes ``width``, ``image_size``, ``mean``, ``std`` and ``set_grad_checkpointing``.
Layer-wise lr decay finds the blocks by parameter name (see train/optim.py), so towers need no
extra hooks for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .config import HFVisionConfig, OpenClipVisionConfig, SmallViTConfig

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTower(nn.Module):
    width: int
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Every tower kind overrides this; the base class only names the interface."""
        raise TypeError(f"{type(self).__name__} does not define set_grad_checkpointing")


# ------------------------------------------------------------------------------ small ViT
class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SmallViT(VisionTower):
    """Pre-LN ViT with a CLS token and learned positions, for from-scratch CPU runs."""

    def __init__(self, cfg: SmallViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"vision.image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.width % cfg.heads:
            raise ConfigError(f"vision.width {cfg.width} is not a multiple of heads {cfg.heads}")
        self.width, self.image_size = cfg.width, cfg.image_size
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.grad_checkpointing = False
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        return self.norm(x[:, 0])


# ------------------------------------------------------------------------------ open_clip
class OpenClipTower(VisionTower):
    """The visual part of an open_clip model with its projection removed."""

    def __init__(self, cfg: OpenClipVisionConfig, load_weights: bool = True):
        super().__init__()
        import open_clip

        name, pretrained = cfg.name, cfg.pretrained
        kw = {"force_image_size": cfg.image_size} if cfg.image_size else {}
        if pretrained and Path(pretrained).is_dir():
            # open_clip's own folder layout (config + weights); the architecture comes from it
            name, pretrained = f"local-dir:{pretrained}", None
            kw["load_weights"] = load_weights
        elif load_weights and pretrained and not Path(pretrained).exists() and (
                pretrained.startswith((".", "/")) or pretrained.endswith((".pt", ".bin", ".safetensors"))):
            raise ConfigError(f"vision.pretrained: {pretrained}: file not found")
        if not load_weights:
            pretrained = None  # a checkpoint supplies every weight
        if name not in open_clip.list_models() and not name.startswith(("local-dir:", "hf-hub:")):
            raise ConfigError(f"vision.name: unknown open_clip model {cfg.name!r} (see open_clip.list_models())")
        model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=cfg.quick_gelu, **kw)
        visual = model.visual
        del model  # the CLIP text tower is not needed
        if hasattr(visual, "trunk"):  # timm towers (EVA02, SigLIP-so400m, ...)
            if any(isinstance(m, nn.Module) and m.__class__.__name__.endswith("AttentionPool2d") for m in visual.head):
                raise ConfigError(f"vision.name: {cfg.name}: attention-pool timm heads are not supported")
            visual.trunk.reset_classifier(0)
            visual.head = nn.Identity()
            width = visual.trunk.num_features
        elif hasattr(visual, "proj") and hasattr(visual, "transformer"):  # open_clip VisionTransformer
            width = visual.output_dim if getattr(visual, "attn_pool", None) is not None else visual.transformer.width
            visual.proj = None
        else:
            width = visual.output_dim
            log.warning("%s: tower has no separable projection; its %d-d output is used as is", cfg.name, width)
        self.visual = visual
        self.width = int(width)
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pre = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(pre.get("mean", OPENAI_MEAN))
        self.std = tuple(pre.get("std", OPENAI_STD))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------- transformers
class HFTower(VisionTower):
    """transformers CLIPVisionModel / SiglipVisionModel; pooled output (CLS after post-LN, or MAP head)."""

    def __init__(self, cfg: HFVisionConfig, load_weights: bool = True):
        super().__init__()
        import transformers as tf

        model_cls, cfg_cls = ((tf.CLIPVisionModel, tf.CLIPVisionConfig) if cfg.kind == "hf_clip"
                              else (tf.SiglipVisionModel, tf.SiglipVisionConfig))
        if cfg.path and load_weights:
            if not Path(cfg.path).exists() and cfg.path.startswith((".", "/")):
                raise ConfigError(f"vision.path: {cfg.path}: directory not found")
            # fp32 master weights: transformers 5 would otherwise keep the checkpoint's stored dtype (often bf16)
            self.model = model_cls.from_pretrained(cfg.path, dtype=torch.float32)
        elif cfg.path:  # architecture only; weights come from our checkpoint
            self.model = model_cls(cfg_cls.from_pretrained(cfg.path))
        elif cfg.config is not None:
            self.model = model_cls(cfg_cls(**cfg.config))
        else:
            raise ConfigError(f"vision: {cfg.kind} needs a `path` (pretrained) or a `config` (random weights)")
        c = self.model.config
        self.width, self.image_size = int(c.hidden_size), int(c.image_size)
        if cfg.kind == "hf_siglip":
            self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        pre = Path(cfg.path or "") / "preprocessor_config.json"
        if cfg.path and pre.is_file():
            import json

            p = json.loads(pre.read_text())
            self.mean, self.std = tuple(p.get("image_mean", self.mean)), tuple(p.get("image_std", self.std))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output


def build_vision_tower(cfg, load_weights: bool = True) -> VisionTower:
    """The registry: one tower class per config kind. ``load_weights=False`` skips pretrained files
    (used when a checkpoint supplies every weight)."""
    if isinstance(cfg, SmallViTConfig):
        return SmallViT(cfg)
    if isinstance(cfg, OpenClipVisionConfig):
        return OpenClipTower(cfg, load_weights)
    if isinstance(cfg, HFVisionConfig):
        return HFTower(cfg, load_weights)
    raise TypeError(f"not a vision config: {type(cfg).__name__}")

