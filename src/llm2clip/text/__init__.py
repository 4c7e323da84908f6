"""The LLM side: loading, bidirectional attention, pooling, templates, CaptionEncoder.

Names load on first use: the configs need no torch, the encoders do."""

from __future__ import annotations

from ..lazy import lazy_exports

__getattr__, _names = lazy_exports(__name__, {
    "config": ["LLMEncoderConfig", "SentenceEncoderConfig", "RandomEncoderConfig", "TextEncoderConfig"],
    "encoder": ["CaptionEncoder"],
})
__all__ = [*_names, "build_text_encoder"]


def build_text_encoder(config):
    """Any text encoder from its config: the LLM caption encoder or a baseline."""
    from .baselines import RandomEncoder, SentenceEncoder
    from .config import LLMEncoderConfig, RandomEncoderConfig, SentenceEncoderConfig
    from .encoder import CaptionEncoder

    if isinstance(config, LLMEncoderConfig):
        return CaptionEncoder.from_config(config)
    if isinstance(config, SentenceEncoderConfig):
        return SentenceEncoder(config)
    if isinstance(config, RandomEncoderConfig):
        return RandomEncoder(config)
    raise TypeError(f"not a text encoder config: {type(config).__name__}")
