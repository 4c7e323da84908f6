"""Vision towers (open_clip, transformers, a small from-scratch ViT) and their image transforms.

Names load on first use: the configs need neither torch nor torchvision, the towers and transforms do."""

_EXPORTS = {
    "config": ["VisionConfig", "SmallViTConfig", "OpenClipVisionConfig", "HFVisionConfig"],
    "towers": ["VisionTower", "SmallViT", "OpenClipTower", "HFTower", "build_vision_tower"],
    "transforms": ["build_transform"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
