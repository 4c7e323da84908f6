"""Image transforms: PIL -> normalised float tensor at the tower's input size."""

from __future__ import annotations

from typing import Literal

from torchvision import transforms as T

Augment = Literal["none", "crop"]


def build_transform(image_size: int, mean, std, train: bool = False, augment: Augment = "none"):
    """Eval: bicubic resize of the short side, centre crop (the OpenAI recipe). Train with
    augment='crop': RandomResizedCrop(scale 0.9-1.0), as the official stage-2 training. No flips:
    captions name left and right."""
    to_rgb = T.Lambda(lambda im: im.convert("RGB"))
    if train and augment == "crop":
        geo = [T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        geo = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose([to_rgb, *geo, T.ToTensor(), T.Normalize(mean, std)])
