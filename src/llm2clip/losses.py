"""Contrastive losses of stage 2: CLIP (InfoNCE both ways) and SigLIP (pairwise sigmoid).

Both take L2-normalised features. Across processes, features are gathered so that every
rank contrasts its local rows against the global batch (docs/METHOD.md 3.2). With
``gather_with_grad`` the gather is differentiable (torch.distributed.nn), and DDP's gradient
averaging then gives exactly the gradient of the single-process loss on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _up(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast for the softmax; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` [B, D] from every rank in rank order (every rank must pass the same B)."""
    rank, world = _dist_info()
    if world == 1:
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x  # keep the gradient path to this rank's own rows
    return torch.cat(parts, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

    local_loss: each rank scores only its own rows against all gathered columns (memory O(B_local x B)),
    otherwise every rank computes the full B x B matrix.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        rank, world = _dist_info()
        scale = logit_scale.exp()
        if world > 1:
            all_img = gather_features(image, self.gather_with_grad)
            all_txt = gather_features(text, self.gather_with_grad)
            if self.local_loss:
                li = scale * image @ all_txt.T
                lt = scale * text @ all_img.T
                labels = torch.arange(image.shape[0], device=image.device) + image.shape[0] * rank
            else:
                li = scale * all_img @ all_txt.T
                lt = li.T
                labels = torch.arange(all_img.shape[0], device=image.device)
        else:
            li = scale * image @ text.T
            lt = li.T
            labels = torch.arange(image.shape[0], device=image.device)
        if logit_bias is not None:
            li, lt = li + logit_bias, lt + logit_bias
        return 0.5 * (F.cross_entropy(_up(li), labels) + F.cross_entropy(_up(lt), labels))


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023): every image-text pair is a binary problem.

    Distributed: local images against all gathered texts; the sum over pairs is divided by the
    local batch size, so the rank mean equals the single-process value.
    """

    def __init__(self, gather_with_grad: bool = True):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        rank, world = _dist_info()
        all_txt = gather_features(text, self.gather_with_grad) if world > 1 else text
        logits = logit_scale.exp() * image @ all_txt.T
        if logit_bias is not None:
            logits = logits + logit_bias
        b = image.shape[0]
        labels = -torch.ones_like(logits)
        labels[torch.arange(b, device=image.device), torch.arange(b, device=image.device) + b * rank] = 1.0
        return -F.logsigmoid(labels * _up(logits)).sum() / b


def build_loss(kind: str, local_loss: bool = True, gather_with_grad: bool = True) -> nn.Module:
    if kind == "clip":
        return ClipLoss(local_loss, gather_with_grad)
    if kind == "siglip":
        return SigLipLoss(gather_with_grad)
    raise ValueError(f"unknown loss {kind!r}: clip or siglip")
