"""Retrieval on a held-out set during training: I2T and T2I R@K with one caption per image and kind.

Scored by llm2clip.eval.retrieval, the module `llm2clip eval` uses, so the numbers a run logs follow
the same rule (ties count against the query: constant features score 0, not 100 %).
"""

from __future__ import annotations

import torch

# the module itself: llm2clip.eval's other modules (benchmarks, reports) are not needed here
from ..eval.retrieval import retrieval_ranks


def recall_at_k(image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10), ranks_out: dict | None = None
                ) -> dict[str, float]:
    """Caption i belongs to image i; scores are cosine similarities, as in `llm2clip eval`. ``ranks_out``
    receives the 0-based rank of every query ("i2t", "t2i"), for paired comparisons between models."""
    ranks = retrieval_ranks(image, text, torch.arange(len(text)))
    if ranks_out is not None:
        ranks_out.update(i2t=ranks.i2t.tolist(), t2i=ranks.t2i.tolist())
    return ranks.recall(ks)


@torch.no_grad()
def evaluate_retrieval(model, images: torch.Tensor, texts: dict[str, torch.Tensor], device, ks=(1, 5, 10),
                       batch_size: int = 256, autocast=None, ranks_out: dict | None = None) -> dict[str, float]:
    """``texts``: kind -> stored embeddings or tokens aligned with ``images``. Keys like 'dense/i2t_R@1'.
    ``ranks_out`` receives, per kind, every query's rank (see ``recall_at_k``)."""
    was = model.training
    model.eval()
    ctx = autocast or torch.autocast(device.type, enabled=False)

    def run(fn, x):
        outs = []
        for s in range(0, len(x), batch_size):
            with ctx:
                outs.append(fn(x[s : s + batch_size].to(device)).float().cpu())
        return torch.cat(outs)

    img = run(model.encode_image, images)
    out = {"n": float(len(images))}
    for kind, t in texts.items():
        kind_ranks = {} if ranks_out is not None else None
        for key, v in recall_at_k(img, run(model.encode_text, t), ks, kind_ranks).items():
            out[f"{kind}/{key}"] = v
        if ranks_out is not None:
            ranks_out[kind] = kind_ranks
    model.train(was)
    return out
