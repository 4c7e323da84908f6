"""Packed caption batches: many captions in one row, no padding between them.

Each caption of a row attends only to itself (bidirectionally or causally), through a block-diagonal
4-D additive mask that transformers uses as given; its position ids restart at 0, so rotary positions
are those it has alone. Pooling is done per caption segment. A caption's embedding is then computed as
if it were encoded alone: it cannot depend on the captions it shares a row or a batch with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .pooling import POOLING_MODES


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L], restarting at each caption
    segment: torch.Tensor  # [R, L] caption index within the batch, -1 on padding
    pool_pos: torch.Tensor  # [P] flat positions (row * L + t) of the pooled tokens
    pool_owner: torch.Tensor  # [P] caption index of each pooled token
    pool_rank: torch.Tensor  # [P] 1-based rank of the token within its caption's pooled span
    first_pos: torch.Tensor  # [N] flat position of each caption's first token
    last_pos: torch.Tensor  # [N] flat position of each caption's last token

    @property
    def n(self) -> int:
        return int(self.first_pos.shape[0])

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def plan_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` in rows of at most ``row_tokens`` tokens (a longer caption gets a row of its
    own): first fit, longest first, which leaves little room unused when captions are short."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(row_tokens, n) - n)
    return rows


def pack(items: Sequence, rows: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    """One packed batch of ``items`` (TokenizedCaption: ``ids``, ``pool_start``, ``pool_end``) laid out in
    ``rows`` of item indices. Caption k of the batch is ``[i for row in rows for i in row][k]``."""
    L = max(sum(len(items[i].ids) for i in row) for row in rows)
    R = len(rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros(R, L, dtype=torch.long)
    seg = torch.full((R, L), -1, dtype=torch.long)
    pool_pos, pool_owner, pool_rank, first, last = [], [], [], [], []
    k = 0
    for r, row in enumerate(rows):
        off = 0
        for i in row:
            t = items[i]
            n = len(t.ids)
            ids[r, off : off + n] = torch.tensor(t.ids)
            pos[r, off : off + n] = torch.arange(n)
            seg[r, off : off + n] = k
            base = r * L + off
            span = range(base + t.pool_start, base + t.pool_end)
            pool_pos.extend(span)
            pool_owner.extend([k] * len(span))
            pool_rank.extend(range(1, len(span) + 1))
            first.append(base)
            last.append(base + n - 1)
            off += n
            k += 1
    as_long = lambda x: torch.tensor(x, dtype=torch.long)
    return PackedBatch(ids, pos, seg, as_long(pool_pos), as_long(pool_owner), as_long(pool_rank),
                       as_long(first), as_long(last))


def packed_attention_mask(segment: torch.Tensor, *, bidirectional: bool, dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, L, L] additive mask: a token sees the tokens of its own caption (earlier ones only, if causal).
    A padding token sees itself only, so no row of the softmax is empty."""
    R, L = segment.shape
    same = segment[:, :, None] == segment[:, None, :]
    real = segment >= 0
    allowed = same & real[:, None, :]
    if not bidirectional:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=segment.device).tril()
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=segment.device)
    mask = torch.zeros(R, 1, L, L, dtype=dtype, device=segment.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def pool_packed(hidden: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
    """[N, H] caption embeddings from packed hidden states [R, L, H], per caption segment (as ``pool``)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if mode in ("mean", "weighted_mean"):
        w = torch.ones_like(batch.pool_rank, dtype=hidden.dtype) if mode == "mean" else batch.pool_rank.to(hidden.dtype)
        sums = torch.zeros(batch.n, flat.shape[1], dtype=hidden.dtype, device=hidden.device)
        sums.index_add_(0, batch.pool_owner, flat[batch.pool_pos] * w[:, None])
        total = torch.zeros(batch.n, dtype=hidden.dtype, device=hidden.device).index_add_(0, batch.pool_owner, w)
        return sums / total[:, None]
    if mode == "last_token":
        return flat[batch.last_pos]
    if mode == "first_token":
        return flat[batch.first_pos]
    raise ValueError(f"unknown pooling mode {mode!r}; one of {POOLING_MODES}")
