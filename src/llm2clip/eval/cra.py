"""CRA, caption retrieval accuracy (docs/METHOD.md 4 and 8).

Every caption is a query against all *other* captions of the pool; a query hits at K when one
of its top-K neighbours (cosine) shares its group (the same image, or the same subject). Queries
whose group has no other caption cannot hit and are left out of the mean (counted in the
result). Similarities are computed a chunk of queries at a time, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

from ..errors import InputError


def group_ids(groups: Sequence[Hashable]) -> torch.Tensor:
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return torch.as_tensor(inverse, dtype=torch.long)


def caption_retrieval_accuracy(
    embeddings: torch.Tensor,
    groups: Sequence[Hashable],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    max_chunk_bytes: int = 256 << 20,
) -> dict:
    """R@K for each K, plus ``pool_size`` and ``queries`` (queries with at least one positive)."""
    if embeddings.ndim != 2:
        raise InputError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if len(groups) != n:
        raise InputError(f"{len(groups)} group ids for {n} embeddings")
    if n < 2:
        raise InputError("CRA needs a pool of at least 2 captions")
    emb = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    g = group_ids(groups)
    counts = torch.bincount(g)
    has_pos = counts[g] > 1
    kmax = min(max(ks), n - 1)
    if chunk_size is None:
        chunk_size = max(1, max_chunk_bytes // (4 * n))
    hits = torch.zeros(len(ks), dtype=torch.long)
    for s in range(0, n, chunk_size):
        q = emb[s : s + chunk_size]
        sims = q @ emb.T
        rows = torch.arange(q.shape[0])
        sims[rows, rows + s] = float("-inf")  # a caption never retrieves itself
        top = sims.topk(kmax, dim=1).indices
        same = g[top] == g[s : s + chunk_size, None]
        valid = has_pos[s : s + chunk_size]
        for j, k in enumerate(ks):
            hits[j] += (same[:, :k].any(1) & valid).sum()
    queries = int(has_pos.sum())
    out = {f"R@{k}": (hits[j].item() / queries if queries else float("nan")) for j, k in enumerate(ks)}
    out.update(pool_size=n, queries=queries)
    return out


def paired_caption_retrieval(
    queries: torch.Tensor,
    positives: torch.Tensor,
    positive_texts: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """CRA across caption kinds (e.g. dense -> short): query i's positive is caption i of
    ``positives``; the pool is the *distinct* positive texts (identical captions of several images
    are one candidate), so a query hits at K when its own positive text is among its top K.
    Ties count for the query (strictly higher scores rank above it)."""
    if queries.shape[0] != positives.shape[0] or len(positive_texts) != queries.shape[0]:
        raise InputError(f"{queries.shape[0]} queries, {positives.shape[0]} positives, {len(positive_texts)} texts")
    first: dict[str, int] = {}
    for i, t in enumerate(positive_texts):
        first.setdefault(t, i)
    uniq = sorted(first)
    col = {t: j for j, t in enumerate(uniq)}
    cand = torch.nn.functional.normalize(positives.float()[[first[t] for t in uniq]], dim=-1)
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    target = torch.tensor([col[t] for t in positive_texts])
    sims = q @ cand.T
    rank = (sims > sims.gather(1, target[:, None])).sum(1)
    out = {f"R@{k}": float((rank < k).float().mean()) for k in ks}
    out.update(pool_size=len(uniq), queries=int(q.shape[0]))
    return out


def evaluate_cra(model, benchmark, ks: Sequence[int] = (1, 5, 10), batch_size: int = 256,
                 progress: bool | None = None) -> dict:
    """CRA of a caption benchmark (task "cra") through ``model``'s own text path; the result dict the
    reports consume.

    When the model has ``text_stages()`` -> (caption encoder, head), the captions go through the
    encoder once and CRA is reported both after the head (``R@K``, what the model uses) and of the
    raw caption embeddings (``caption_encoder_R@K``): what the adapter adds or loses.
    """
    import time

    from .encoding import encode_texts

    if benchmark.task != "cra":
        raise InputError(f"benchmark {benchmark.name!r} is a {benchmark.task} benchmark, not cra")
    stages = getattr(model, "text_stages", None)
    stages = stages() if callable(stages) else None
    t0 = time.perf_counter()
    if stages is not None:
        raw = encode_texts(stages[0], benchmark.captions, batch_size, progress)
        feats = torch.cat([stages[1](raw[s: s + batch_size]) for s in range(0, len(raw), batch_size)])
    else:
        raw, feats = None, encode_texts(model.encode_text, benchmark.captions, batch_size, progress)
    t1 = time.perf_counter()
    metrics = caption_retrieval_accuracy(feats, benchmark.groups, ks)
    if raw is not None:
        ref = caption_retrieval_accuracy(raw, benchmark.groups, ks)
        metrics.update({f"caption_encoder_R@{k}": ref[f"R@{k}"] for k in ks})
    return {"benchmark": benchmark.name, "task": "cra", "metrics": metrics, "data": benchmark.identity(),
            "encode_s": round(t1 - t0, 3), "score_s": round(time.perf_counter() - t1, 3)}
