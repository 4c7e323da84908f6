"""Configs of the vision towers (one per family), validated like every config of the project."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from ..config import StrictModel


def _fix_path(p: str | None, base: Path) -> str | None:
    """Relative local paths are relative to the config file; tags and hub ids stay as given."""
    if p is None:
        return None
    q = Path(p).expanduser()
    if not q.is_absolute() and (p.startswith(".") or (base / q).exists()):
        return str(base / q)
    return p


class SmallViTConfig(StrictModel):
    """A small ViT trained from scratch (pre-LN, CLS pooling): the CPU default."""

    kind: Literal["small_vit"] = "small_vit"
    image_size: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    width: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def resolve_paths(self, base: Path) -> None:
        pass


class OpenClipVisionConfig(StrictModel):
    """Any open_clip architecture name (ViT-B-16, ViT-L-14-336, EVA02-L-14-336 via timm, ViT-B-16-SigLIP, ...).

    pretrained: a local checkpoint file or directory, an open_clip tag ('openai', needs a hub), or null
    for random weights. The tower's own projection is dropped; the model adds a new head.
    """

    kind: Literal["open_clip"] = "open_clip"
    name: str
    pretrained: str | None = None
    quick_gelu: bool = Field(False, description="OpenAI weights were trained with QuickGELU: set true for them")
    image_size: int | None = Field(None, description="override the architecture's input size")

    def resolve_paths(self, base: Path) -> None:
        self.pretrained = _fix_path(self.pretrained, base)


class HFVisionConfig(StrictModel):
    """A transformers CLIPVisionModel (hf_clip) or SiglipVisionModel (hf_siglip).

    path: a local directory or hub id with pretrained weights; or null with `config` (kwargs of
    CLIPVisionConfig / SiglipVisionConfig) for random weights.
    """

    kind: Literal["hf_clip", "hf_siglip"] = "hf_clip"
    path: str | None = None
    config: dict[str, Any] | None = None

    def resolve_paths(self, base: Path) -> None:
        self.path = _fix_path(self.path, base)


VisionConfig = Annotated[SmallViTConfig | OpenClipVisionConfig | HFVisionConfig, Field(discriminator="kind")]
