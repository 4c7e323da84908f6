"""AdamW parameter groups (decay on matrices only, layer-wise lr decay of the vision tower) and the
warmup + cosine schedule (docs/METHOD.md 3.3)."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

# Block containers across towers: ours (blocks.N), open_clip (resblocks.N), timm (blocks.N), HF (layers.N).
_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers)\.(\d+)\.")
# Parameters before the first block: patch/position/class embeddings and pre-norms (layer id 0).
_EMBED = ("conv1", "patch_embed", "class_embedding", "cls_token", "positional_embedding", "pos_embed",
          "ln_pre", "embeddings", "norm_pre", "pre_layrnorm", "reg_token", "rope")
# Excluded from weight decay besides 1-d tensors and biases.
_NO_DECAY = ("positional_embedding", "pos_embed", "position_embedding", "class_embedding", "cls_token",
             "reg_token", "logit_scale", "logit_bias")


def block_index(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def num_blocks(names) -> int:
    ids = {block_index(n) for n in names} - {None}
    return max(ids) + 1 if ids else 0


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings, i+1 for block i, n_blocks+1 for what follows the blocks (final norm, head)."""
    b = block_index(name)
    if b is not None:
        return b + 1
    if any(k in name.split(".") or name.startswith(k) or f".{k}" in name for k in _EMBED):
        return 0
    return n_blocks + 1


def wants_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and not name.endswith(".bias") and not any(k in name for k in _NO_DECAY)


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0,
                 visual_lr: float | None = None, text_lr: float | None = None) -> list[dict]:
    """Groups keyed by (decay, lr scale). The vision tower's block i gets lr x decay^(L+1-(i+1))."""
    visual = dict(model.visual.named_parameters())
    nb = num_blocks(visual)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("visual."):
            base = visual_lr or lr
            scale = layer_decay ** (nb + 1 - layer_id(name[len("visual."):], nb))
            part = "visual"
        elif name.startswith("text."):
            base, scale, part = text_lr or lr, 1.0, "text"
        else:  # head, logit scale/bias
            base, scale, part = lr, 1.0, "other"
        decay = wants_decay(name, p)
        key = (part, decay, round(scale, 12))
        g = groups.setdefault(key, {"params": [], "names": [], "lr": base * scale, "lr_scale": scale,
                                    "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def can_fuse(params) -> bool:
    """PyTorch's fused AdamW kernel takes plain floating-point tensors on CPU or CUDA (not sharded DTensors)."""
    params = list(params)
    return bool(params) and all(type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``; the fused kernel where it applies: the same update in one pass over all
    tensors (3.6x faster than the per-tensor loop, the CPU default, on the quickstart's model: benchmarks/STAGE2.md)."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.visual_lr, cfg.text_lr)
    for g in groups:
        g.pop("names")
    fused = can_fuse(p for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    opt.llm2clip_kernel = {"fused": opt.defaults.get("fused"), "foreach": opt.defaults.get("foreach")}
    return opt


def restore_kernel(optimizer: torch.optim.Optimizer) -> None:
    """After loading a checkpoint: its param groups carry the kernel flags of the run that saved it (an earlier
    version's: not fused), which would leave this optimizer on the loop while it still tells a GradScaler that it
    unscales itself. Put back this run's choice, with the step counters the fused kernel expects (float32, on the
    parameters' device)."""
    kernel = getattr(optimizer, "llm2clip_kernel", None)
    if kernel is None:
        return
    for g in optimizer.param_groups:
        g.update(kernel)
        if not kernel["fused"]:
            continue
        for p in g["params"]:
            st = optimizer.state.get(p)
            if st is not None and "step" in st:
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1, then cosine down to min_ratio at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, total: int, warmup: int, lr: float, min_lr: float):
    ratio = min_lr / lr if lr else 0.0
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, ratio))
