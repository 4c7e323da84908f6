"""Key maps between the official LLM2CLIP checkpoints, our model and Hugging Face CLIP.

Pure functions over state dicts (name -> tensor); nothing here builds a model. docs/CHECKPOINTS.md
has the same maps as tables. Every map consumes every key it is given: a key it does not know is
an error naming it, never silently dropped (the official code's loaders use ``strict=False``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError

Tensor = torch.Tensor


def _preview(keys, n: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# --------------------------------------------------------------------------- vision layouts
@dataclass(frozen=True)
class VisionGeometry:
    layout: str  # "eva" (EVA-CLIP EVAVisionTransformer) or "openai" (OpenAI / open_clip ViT)
    width: int
    layers: int
    patch_size: int
    image_size: int
    head_dim: int | None  # EVA: from the stored RoPE tables; OpenAI: not in the weights


def _block_count(keys, pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if ids and ids != set(range(len(ids))):
        raise ConfigError(f"block indices are not contiguous: {sorted(ids)}")
    return len(ids)


def _grid(n_tokens: int, what: str) -> int:
    g = math.isqrt(n_tokens - 1)
    if g * g != n_tokens - 1:
        raise ConfigError(f"{what} has {n_tokens} rows, not 1 + a square grid")
    return g


def vision_geometry(visual: dict[str, Tensor]) -> VisionGeometry:
    """Which layout the official ``visual.*`` weights use, and their shapes (prefix already stripped)."""
    if "patch_embed.proj.weight" in visual and any(k.startswith("blocks.") for k in visual):
        w = visual["patch_embed.proj.weight"]
        grid = _grid(visual["pos_embed"].shape[-2], "visual.pos_embed")
        rope = next((v for k, v in visual.items() if k.endswith("rope.freqs_cos")), None)
        return VisionGeometry("eva", int(w.shape[0]), _block_count(visual, r"blocks\.(\d+)\."), int(w.shape[-1]),
                              grid * int(w.shape[-1]), int(rope.shape[-1]) if rope is not None else None)
    if "conv1.weight" in visual and any(k.startswith("transformer.resblocks.") for k in visual):
        w = visual["conv1.weight"]
        grid = _grid(visual["positional_embedding"].shape[0], "visual.positional_embedding")
        return VisionGeometry("openai", int(w.shape[0]), _block_count(visual, r"transformer\.resblocks\.(\d+)\."),
                              int(w.shape[-1]), grid * int(w.shape[-1]), None)
    raise ConfigError("the visual.* weights are neither an EVA-CLIP ViT (visual.patch_embed, visual.blocks.N) nor "
                      f"an OpenAI-CLIP ViT (visual.conv1, visual.transformer.resblocks.N); keys: {_preview(visual)}")


# Inside one EVA block: official name -> timm Eva name (timm's Eva is open_clip's EVA02 trunk).
_EVA_BLOCK_RENAMES = (
    ("attn.inner_attn_ln.", "attn.norm."),  # sub-LN after attention
    ("mlp.w1.", "mlp.fc1_g."),  # SwiGLU gate branch (SiLU applied to it)
    ("mlp.w2.", "mlp.fc1_x."),  # SwiGLU value branch
    ("mlp.w3.", "mlp.fc2."),
    ("mlp.ffn_ln.", "mlp.norm."),  # sub-LN inside the MLP
)


def eva_visual_to_timm(visual: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """EVA-CLIP ``visual.*`` (prefix stripped) -> (timm Eva trunk state, head {weight, bias}, dropped keys).

    The RoPE tables (``rope.freqs_cos/sin``, also under every ``blocks.N.attn.rope``) are dropped:
    they are a function of the geometry and timm rebuilds them.
    """
    trunk, head, dropped = {}, {}, []
    for k, v in visual.items():
        if k.startswith("head."):
            head[k[len("head."):]] = v
            continue
        if k.startswith("rope.") or ".rope." in k:
            dropped.append(k)
            continue
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = m.groups()
            separate_qkv = f"blocks.{i}.attn.q_proj.weight" in visual
            if separate_qkv and rest in ("attn.q_bias", "attn.v_bias"):
                rest = f"attn.{rest[5]}_proj.bias"  # EVA keeps q/v biases as loose parameters; k has none
            for old, new in _EVA_BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            k = f"blocks.{i}.{rest}"
        trunk[k] = v
    if set(head) != {"weight", "bias"}:
        raise ConfigError(f"visual.head: expected weight and bias, found {sorted(head) or 'nothing'}")
    return trunk, head, dropped


def openai_visual_split(visual: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """OpenAI-layout ``visual.*`` -> (tower state in open_clip names, head {weight, bias}).

    ``visual.proj`` is a [width, embed] matrix applied as ``x @ proj``; our head is a Linear, so its
    weight is ``proj.T`` and its bias zero.
    """
    tower = {k: v for k, v in visual.items() if k != "proj"}
    if "proj" not in visual:
        raise ConfigError("visual.proj not found: the OpenAI-layout tower has no projection to the shared space")
    proj = visual["proj"]
    return tower, {"weight": proj.t().contiguous(), "bias": torch.zeros(proj.shape[1], dtype=proj.dtype)}


# ------------------------------------------------------------------- OpenAI ViT <-> HF CLIP
_HF_TOP = {
    "class_embedding": "embeddings.class_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_HF_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openai_vit_to_hf_clip(tower: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI / open_clip ViT names (no ``proj``) -> transformers CLIPVisionModel names, without the
    ``vision_model.`` prefix. The fused ``in_proj`` of each attention is split into q, k, v."""
    out, left = {}, []
    for k, v in tower.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", k)
        if m is None:
            left.append(k)
            continue
        i, rest = m.groups()
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            continue
        mod, _, kind = rest.rpartition(".")
        if mod in _HF_BLOCK and kind in ("weight", "bias"):
            out[f"encoder.layers.{i}.{_HF_BLOCK[mod]}.{kind}"] = v
        else:
            left.append(k)
    if left:
        raise ConfigError(f"no CLIPVisionModel counterpart for: {_preview(left)}")
    return out


# --------------------------------------------------------------------------- text adapter
@dataclass(frozen=True)
class AdapterShape:
    in_dim: int
    out_dim: int
    depth: int
    expansion: int
    proj_bias: bool


def official_adapter_to_ours(text: dict[str, Tensor]) -> tuple[dict[str, Tensor], AdapterShape]:
    """Official ``text.*`` (prefix stripped; ``TextProj.text_adaptor`` is an nn.Sequential of N
    LinearBlocks, a LayerNorm and a Linear) -> our TextAdapter state and its shape.

    LinearBlock i: ``text_adaptor.i.ln`` (pre-LN), ``.fn.0`` (Linear D->eD), ``.fn.3`` (Linear eD->D);
    ``fn.1`` is the GELU and ``fn.2`` the dropout, which hold no weights.
    """
    other = [k for k in text if not k.startswith("text_adaptor.")]
    if other:
        raise ConfigError(f"text.*: expected only text.text_adaptor.* (the official TextProj), found {_preview(other)}")
    n = _block_count([k for k in text if ".fn." in k or ".ln." in k], r"text_adaptor\.(\d+)\.(?:fn|ln)\.")
    if n == 0 or "text_adaptor.0.fn.0.weight" not in text:
        raise ConfigError("text.text_adaptor.0.fn.0.weight not found: no LinearBlock in the adapter")
    fc1 = text["text_adaptor.0.fn.0.weight"]
    hidden, dim = int(fc1.shape[0]), int(fc1.shape[1])
    if hidden % dim:
        raise ConfigError(f"text adapter: hidden size {hidden} is not a whole multiple of its input dim {dim}")
    ln_w, proj_w = text.get(f"text_adaptor.{n}.weight"), text.get(f"text_adaptor.{n + 1}.weight")
    if ln_w is None or ln_w.dim() != 1 or proj_w is None or proj_w.dim() != 2:
        raise ConfigError(f"text adapter: expected a LayerNorm at text_adaptor.{n} and a Linear at "
                          f"text_adaptor.{n + 1} after {n} blocks")
    ours, used = {}, set()

    def take(src: str, dst: str) -> None:
        if src not in text:
            raise ConfigError(f"text adapter: text.{src} not found")
        ours[dst] = text[src]
        used.add(src)

    for i in range(n):
        for kind in ("weight", "bias"):
            take(f"text_adaptor.{i}.ln.{kind}", f"blocks.{i}.norm.{kind}")
            take(f"text_adaptor.{i}.fn.0.{kind}", f"blocks.{i}.fc1.{kind}")
            take(f"text_adaptor.{i}.fn.3.{kind}", f"blocks.{i}.fc2.{kind}")
    for kind in ("weight", "bias"):
        take(f"text_adaptor.{n}.{kind}", f"norm.{kind}")
    take(f"text_adaptor.{n + 1}.weight", "proj.weight")
    proj_bias = f"text_adaptor.{n + 1}.bias" in text
    if proj_bias:
        take(f"text_adaptor.{n + 1}.bias", "proj.bias")
    else:  # TextProj(proj_bias=False): our Linear has a bias; zero is the same map
        ours["proj.bias"] = torch.zeros(proj_w.shape[0], dtype=proj_w.dtype)
    left = set(text) - used
    if left:
        raise ConfigError(f"text adapter: unexpected keys {_preview('text.' + k for k in left)}")
    return ours, AdapterShape(dim, int(proj_w.shape[0]), n, hidden // dim, proj_bias)
