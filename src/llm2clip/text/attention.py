"""Bidirectional (or causal) attention for a decoder LLM, given at the call boundary.

Transformers uses a ready 4-D attention mask as given and then no longer applies its causal
mask (and SDPA runs with ``is_causal=False``). So bidirectionality is an input, not a patched
attention class: a [B, 1, T, T] additive mask that hides only padding keys. Position ids count
real tokens only, so left padding never shifts a caption's rotary positions.
"""

from __future__ import annotations

import torch


def attention_inputs(token_mask: torch.Tensor, *, bidirectional: bool, dtype: torch.dtype) -> dict:
    """``attention_mask`` (4-D, additive) and ``position_ids`` for a left- or right-padded batch.

    token_mask: [B, T] bool/int, 1 for real tokens.
    """
    real = token_mask.bool()
    B, T = real.shape
    allowed = real[:, None, :].expand(B, T, T)  # query row may see every real key
    if not bidirectional:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    # A padding query sees itself, so no row is empty (an empty row gives NaN, which would
    # leak into real tokens through 0 * NaN in the next layer).
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=real.device)
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=real.device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
    return {"attention_mask": mask, "position_ids": position_ids}
