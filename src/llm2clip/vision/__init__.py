"""Vision towers (open_clip, transformers, a small from-scratch ViT) and their image transforms.

Names load on first use: the configs need neither torch nor torchvision, the towers and transforms do."""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ["VisionConfig", "SmallViTConfig", "OpenClipVisionConfig", "HFVisionConfig"],
    "towers": ["VisionTower", "SmallViT", "OpenClipTower", "HFTower", "build_vision_tower"],
    "transforms": ["build_transform"],
})
