"""CLIP and SigLIP losses against independent single-matrix computations, and 2 gloo processes
against 1 process on the same global batch."""

import math

import pytest
import torch
import torch.multiprocessing as mp
from stage2_helpers import free_port, loss_worker

from llm2clip.losses import ClipLoss, SigLipLoss, build_loss


def _features(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.requires_grad_(True), txt.requires_grad_(True), torch.tensor(math.log(1 / 0.07), dtype=torch.float64,
                                                                              requires_grad=True)


def _reference_clip(img, txt, log_scale):
    """Per-row loops: -log softmax of the matching pair, both directions."""
    s = log_scale.exp()
    sim = s * img @ txt.T
    n = sim.shape[0]
    i2t = sum(torch.logsumexp(sim[i], 0) - sim[i, i] for i in range(n)) / n
    t2i = sum(torch.logsumexp(sim[:, i], 0) - sim[i, i] for i in range(n)) / n
    return (i2t + t2i) / 2


def _reference_siglip(img, txt, log_scale, bias):
    s = log_scale.exp()
    n = img.shape[0]
    total = 0
    for i in range(n):
        for j in range(n):
            z = s * (img[i] @ txt[j]) + bias
            y = 1.0 if i == j else -1.0
            total = total + torch.log1p(torch.exp(-y * z))
    return total / n


@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_loss_and_grads_match_reference(local_loss):
    img, txt, ls = _features()
    loss = ClipLoss(local_loss=local_loss)(img, txt, ls)
    g = torch.autograd.grad(loss, [img, txt, ls])
    ref = _reference_clip(img, txt, ls)
    gr = torch.autograd.grad(ref, [img, txt, ls])
    assert torch.allclose(loss, ref, atol=1e-10)
    for a, b in zip(g, gr):
        assert torch.allclose(a, b, atol=1e-10)


def test_siglip_loss_and_grads_match_reference():
    img, txt, ls = _features(n=6)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    loss = SigLipLoss()(img, txt, ls, bias)
    g = torch.autograd.grad(loss, [img, txt, ls, bias])
    ref = _reference_siglip(img, txt, ls, bias)
    gr = torch.autograd.grad(ref, [img, txt, ls, bias])
    assert torch.allclose(loss, ref, atol=1e-10)
    for a, b in zip(g, gr):
        assert torch.allclose(a, b, atol=1e-10)


def test_perfect_alignment_gives_low_loss():
    x = torch.nn.functional.normalize(torch.eye(8), dim=-1)
    assert ClipLoss()(x, x, torch.tensor(math.log(100.0))) < 1e-3
    with pytest.raises(ValueError):
        build_loss("triplet")


def _single_process(inputs, kind):
    w_img = inputs["w_img"].clone().requires_grad_(True)
    w_txt = inputs["w_txt"].clone().requires_grad_(True)
    scale = inputs["scale"].clone().requires_grad_(True)
    img = torch.nn.functional.normalize(inputs["x_img"] @ w_img, dim=-1)
    txt = torch.nn.functional.normalize(inputs["x_txt"] @ w_txt, dim=-1)
    params = [w_img, w_txt, scale]
    bias = None
    if kind == "siglip":
        bias = inputs["bias"].clone().requires_grad_(True)
        params.append(bias)
    loss = build_loss(kind)(img, txt, scale, bias)
    return loss.detach(), torch.autograd.grad(loss, params)


CASES = [("clip", True, True), ("clip", False, True), ("siglip", True, True)]


def test_two_processes_equal_one(tmp_path):
    g = torch.Generator().manual_seed(1)
    inputs = {"x_img": torch.randn(8, 6, generator=g, dtype=torch.float64),
              "x_txt": torch.randn(8, 5, generator=g, dtype=torch.float64),
              "w_img": torch.randn(6, 4, generator=g, dtype=torch.float64),
              "w_txt": torch.randn(5, 4, generator=g, dtype=torch.float64),
              "scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64),
              "bias": torch.tensor(-2.0, dtype=torch.float64)}
    mp.spawn(loss_worker, args=(2, free_port(), inputs, str(tmp_path), CASES), nprocs=2, join=True)
    for c, (kind, _, _) in enumerate(CASES):
        loss1, grads1 = _single_process(inputs, kind)
        for r in range(2):
            out = torch.load(tmp_path / f"case{c}_rank{r}.pt")
            assert torch.allclose(out["loss"], loss1, atol=1e-10), (kind, r)
            for a, b in zip(out["grads"], grads1):
                assert torch.allclose(a, b, atol=1e-10), (kind, r)
