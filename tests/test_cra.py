"""CRA against an independent loop, chunked against full, and its edge cases."""

import pytest
import torch

from llm2clip.errors import InputError
from llm2clip.eval.cra import caption_retrieval_accuracy


def naive_cra(emb, groups, ks):
    emb = torch.nn.functional.normalize(emb, dim=-1)
    hits = {k: 0 for k in ks}
    queries = 0
    for i in range(len(groups)):
        if sum(g == groups[i] for g in groups) < 2:
            continue
        queries += 1
        others = [j for j in range(len(groups)) if j != i]
        sims = [(float(emb[i] @ emb[j]), j) for j in others]
        ranked = [j for _, j in sorted(sims, key=lambda t: -t[0])]
        for k in ks:
            hits[k] += any(groups[j] == groups[i] for j in ranked[:k])
    return {f"R@{k}": hits[k] / queries for k in ks}, queries


def test_matches_independent_loop_and_chunking():
    torch.manual_seed(0)
    groups = [f"g{i % 37}" for i in range(200)] + ["alone"]
    centers = torch.randn(38, 16)
    emb = torch.cat([centers[i % 37] + 0.9 * torch.randn(16) for i in range(200)]
                    + [torch.randn(1, 16)[0]]).view(-1, 16)
    ref, q = naive_cra(emb, groups, (1, 5, 10))
    full = caption_retrieval_accuracy(emb, groups, chunk_size=len(groups))
    for cs in (1, 7, 64):
        chunked = caption_retrieval_accuracy(emb, groups, chunk_size=cs)
        assert chunked == full
    for k in (1, 5, 10):
        assert full[f"R@{k}"] == pytest.approx(ref[f"R@{k}"])
    assert full["pool_size"] == 201 and full["queries"] == q == 200
    assert 0 < full["R@1"] < full["R@10"] < 1


def test_memory_bound_picks_small_chunks():
    torch.manual_seed(1)
    emb, groups = torch.randn(500, 8), [i // 5 for i in range(500)]
    # 500 * 4 bytes per row: a 4 kB budget means two query rows at a time
    assert caption_retrieval_accuracy(emb, groups, max_chunk_bytes=4000) == caption_retrieval_accuracy(emb, groups)


def test_perfect_and_self_excluded():
    emb = torch.eye(4).repeat_interleave(3, 0)  # 4 groups x 3 identical captions
    res = caption_retrieval_accuracy(emb, [i // 3 for i in range(12)], ks=(1, 2))
    assert res["R@1"] == 1.0 and res["R@2"] == 1.0
    # with one caption per group, nothing can hit: no query counts
    res = caption_retrieval_accuracy(torch.randn(5, 3), list("abcde"), ks=(1,))
    assert res["queries"] == 0


def test_bad_inputs():
    with pytest.raises(InputError, match="3 group ids for 4"):
        caption_retrieval_accuracy(torch.randn(4, 3), [0, 0, 1])
    with pytest.raises(InputError, match=r"\[N, D\]"):
        caption_retrieval_accuracy(torch.randn(4), [0, 0, 1, 1])
