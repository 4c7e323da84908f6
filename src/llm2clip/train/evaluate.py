"""Retrieval on a held-out set during training: I2T and T2I R@K with one caption per image and kind.

A simple 1:1 metric for monitoring; the full metric module lives in llm2clip.eval.
"""

from __future__ import annotations

import torch


def recall_at_k(image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Caption i belongs to image i. Ties count in the query's favour (strict >)."""
    sim = image.float() @ text.float().T
    diag = sim.diagonal()
    i2t_rank = (sim > diag[:, None]).sum(1)
    t2i_rank = (sim > diag[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t_rank < k).float().mean())
        out[f"t2i_R@{k}"] = float((t2i_rank < k).float().mean())
    return out


@torch.no_grad()
def evaluate_retrieval(model, images: torch.Tensor, texts: dict[str, torch.Tensor], device, ks=(1, 5, 10),
                       batch_size: int = 256, autocast=None) -> dict[str, float]:
    """``texts``: kind -> stored embeddings or tokens aligned with ``images``. Keys like 'dense/i2t_R@1'."""
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
        for key, v in recall_at_k(img, run(model.encode_text, t), ks).items():
            out[f"{kind}/{key}"] = v
    model.train(was)
    return out
