"""Caption-contrastive (supervised SimCSE) loss, cross-process gather, and gradient caching."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients flow back to each rank's rows."""
    rank, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), 0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    if size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def caption_contrastive_loss(
    queries: torch.Tensor,
    docs: torch.Tensor,
    positive_index: torch.Tensor,
    query_groups: torch.Tensor,
    doc_groups: torch.Tensor,
    scale: float = 50.0,
    mask_same_group: bool = True,
    symmetric: bool = False,
) -> torch.Tensor:
    """Cross-entropy of each query over all documents (positives and hard negatives).

    scores = scale * cos(q, d). The official loss counts captions of the query's own group
    (other than its positive) as negatives; with ``mask_same_group`` they are removed from
    the candidates. ``symmetric`` adds the positive -> query direction over all queries.
    """
    q = F.normalize(queries.float(), dim=-1)
    d = F.normalize(docs.float(), dim=-1)
    # index tensors are built on the CPU by the batcher; the logits live where the model does
    positive_index, query_groups, doc_groups = (t.to(q.device) for t in (positive_index, query_groups, doc_groups))
    rows = torch.arange(q.shape[0], device=q.device)
    logits = scale * q @ d.T
    if mask_same_group:
        same = query_groups[:, None] == doc_groups[None, :]
        same[rows, positive_index] = False
        logits = logits.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(logits, positive_index)
    if symmetric:
        back = scale * d[positive_index] @ q.T
        if mask_same_group:
            same = query_groups[:, None] == query_groups[None, :]
            same[rows, rows] = False
            back = back.masked_fill(same, float("-inf"))
        loss = (loss + F.cross_entropy(back, rows)) / 2
    return loss


def distributed_contrastive_loss(q_local, docs_local, pos_local, qg_local, dg_local, **kw) -> torch.Tensor:
    """Local queries against every rank's documents (gathered with gradients).

    Each rank's loss is the mean over its own queries; averaging the gradients over ranks
    (what data parallelism does) gives the gradient of the global-batch loss.
    """
    rank, size = world()
    if size == 1:
        return caption_contrastive_loss(q_local, docs_local, pos_local, qg_local, dg_local, **kw)
    # NCCL gathers device tensors only
    pos_local, qg_local, dg_local = (t.to(q_local.device) for t in (pos_local, qg_local, dg_local))
    docs = gather_with_grad(docs_local)
    doc_groups = gather_no_grad(dg_local)
    offset = rank * docs_local.shape[0]  # equal shapes on every rank
    kw_sym = kw.pop("symmetric", False)
    loss = caption_contrastive_loss(q_local, docs, pos_local + offset, qg_local, doc_groups, **kw)
    if kw_sym:
        queries = gather_with_grad(q_local)
        q_groups = gather_no_grad(qg_local)
        d = F.normalize(docs_local.float(), dim=-1)[pos_local]
        qa = F.normalize(queries.float(), dim=-1)
        back = kw.get("scale", 50.0) * d @ qa.T
        rows = torch.arange(d.shape[0], device=d.device) + rank * q_local.shape[0]
        if kw.get("mask_same_group", True):
            same = qg_local[:, None] == q_groups[None, :]
            same[torch.arange(d.shape[0], device=d.device), rows] = False
            back = back.masked_fill(same, float("-inf"))
        loss = (loss + F.cross_entropy(back, rows)) / 2
    return loss


def length_buckets(lengths: Sequence[int], ratio: float | None = 1.25, max_size: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` (sorted ascending) cut into forwards whose longest sequence is at most
    ``ratio`` times their shortest, and of at most ``max_size`` sequences: a batch that mixes 25-token
    and 190-token captions is otherwise padded, and computed, at 190 tokens throughout."""
    out: list[list[int]] = []
    for i, n in enumerate(lengths):
        if i and lengths[i - 1] > n:
            raise ValueError("length_buckets: lengths must be sorted ascending")
        cur = out[-1] if out else None
        if cur is None or (ratio and n > ratio * lengths[cur[0]]) or (max_size and len(cur) >= max_size):
            out.append([i])
        else:
            cur.append(i)
    return out


def bucketed_backward(
    embed: Callable[[Sequence], torch.Tensor],
    chunks: Sequence,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Backpropagate ``loss_fn(embed(all inputs))`` with one forward per chunk, every graph kept:
    exact, no recomputation, memory for the whole batch (``grad_cached_backward`` trades a second
    forward for memory)."""
    loss = loss_fn(torch.cat([embed(c) for c in chunks]))
    loss.backward()
    return loss.detach()


def grad_cached_backward(
    embed: Callable[[Sequence], torch.Tensor],
    chunks: Sequence,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Backpropagate ``loss_fn(embed(all inputs))`` chunk by chunk (gradient caching).

    1. embed every chunk without a graph (saving the RNG state of each, for dropout);
    2. compute the loss on all embeddings at once and its gradient w.r.t. the embeddings;
    3. re-embed each chunk with a graph under the same RNG state and backpropagate its slice.
    The contrastive batch is then as large as wanted while memory holds one chunk's graph.
    With one chunk this is a plain forward and backward.
    """
    if len(chunks) == 1:
        loss = loss_fn(embed(chunks[0]))
        loss.backward()
        return loss.detach()
    states, parts = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(rng_state())
            parts.append(embed(c))
    cached = torch.cat(parts).detach().requires_grad_(True)
    loss = loss_fn(cached)
    loss.backward()
    grads = cached.grad.split([p.shape[0] for p in parts])
    after = rng_state()
    for c, state, g in zip(chunks, states, grads):
        set_rng_state(state)
        embed(c).backward(g.to(parts[0].dtype))
    set_rng_state(after)
    return loss.detach()


def rng_state() -> tuple:
    """The CPU generator's state and, once CUDA is in use, every GPU's: dropout on a GPU draws from its
    own generator, so replaying a chunk under the CPU state alone would drop other units."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
