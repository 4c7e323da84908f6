"""Pooling token states into one caption embedding (LLM2Vec's modes, docs/METHOD.md 6)."""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "weighted_mean", "last_token", "first_token")


def pool(hidden: torch.Tensor, pool_mask: torch.Tensor, token_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, T, H]; pool_mask [B, T] marks the pooled (caption) tokens; token_mask the real ones.

    mean / weighted_mean average over the pooled tokens only (weights 1..n by position for
    weighted_mean); last_token / first_token take the last / first real token of the sequence,
    whatever the padding side.
    """
    if mode in ("mean", "weighted_mean"):
        w = pool_mask.to(hidden.dtype)
        if mode == "weighted_mean":
            w = w * pool_mask.long().cumsum(-1).to(hidden.dtype)
        return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    idx = torch.arange(hidden.shape[1], device=hidden.device)
    real = token_mask.bool()
    if mode == "last_token":
        pos = torch.where(real, idx, -1).amax(1)
    elif mode == "first_token":
        pos = torch.where(real, idx, hidden.shape[1]).amin(1)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; one of {POOLING_MODES}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
