"""The CLIP text tower's forward over length buckets.

open_clip's ``TextTransformer`` runs every caption at the full context length (77 tokens). With a causal mask and
pooling at the end-of-text token, what a caption's pooled feature sees does not depend on the padding after it, so
the batch can be split by length and each part run only as long as its longest caption: the same features (up to
float rounding), at a fraction of the work when short and long captions are mixed (a 9-token short caption next to a
77-token dense one costs 9 positions instead of 77).
"""

from __future__ import annotations

import torch


def bucketable(tt) -> bool:
    """Whether ``tt`` (an open_clip TextTransformer) is the causal, argmax-pooled kind this path reproduces."""
    return (getattr(tt, "cls_emb", None) is None and getattr(tt, "pool_type", None) == "argmax"
            and getattr(tt, "attn_mask", None) is not None and not getattr(tt, "use_pad_mask", False)
            and not getattr(tt, "output_tokens", False))


def split_by_length(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Indices of at most two groups, cut where the positions run (group size x its longest length) are fewest."""
    order = lengths.argsort(stable=True)
    sorted_len = lengths[order]
    n = len(order)
    first = torch.arange(1, n + 1, device=lengths.device)
    cost = first * sorted_len + (n - first) * sorted_len[-1]
    cut = n - int(cost.flip(0).argmin())  # on a tie, the larger first group: fewer, longer runs
    return [g for g in (order[:cut], order[cut:]) if len(g)]


def _trimmed_forward(tt, tokens: torch.Tensor) -> torch.Tensor:
    length = tokens.shape[1]
    x = tt.token_embedding(tokens).to(tt.transformer.get_cast_dtype())
    x = x + tt.positional_embedding[:length].to(x.dtype)
    x = tt.transformer(x, attn_mask=tt.attn_mask[:length, :length])
    x = tt.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # EOT has the largest id
    proj = tt.text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj


def clip_text_forward(tt, tokens: torch.Tensor) -> torch.Tensor:
    """``tt(tokens)`` computed per length bucket; falls back to ``tt(tokens)`` for kinds it does not reproduce."""
    if not bucketable(tt) or tokens.shape[0] == 0:
        return tt(tokens)
    lengths = tokens.argmax(dim=-1) + 1
    groups = split_by_length(lengths)
    parts = [_trimmed_forward(tt, tokens[g, : int(lengths[g].max())]) for g in groups]
    out = torch.cat(parts)
    inverse = torch.empty_like(lengths)
    inverse[torch.cat(groups)] = torch.arange(len(lengths), device=lengths.device)
    return out[inverse]
