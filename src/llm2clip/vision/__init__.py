"""Vision towers (open_clip, transformers, a small from-scratch ViT) and their image transforms."""

from .config import HFVisionConfig, OpenClipVisionConfig, SmallViTConfig, VisionConfig
from .towers import HFTower, OpenClipTower, SmallViT, VisionTower, build_vision_tower
from .transforms import build_transform

__all__ = ["VisionConfig", "SmallViTConfig", "OpenClipVisionConfig", "HFVisionConfig", "VisionTower", "SmallViT",
           "OpenClipTower", "HFTower", "build_vision_tower", "build_transform"]
