"""The LLM side: loading, bidirectional attention, pooling, templates, CaptionEncoder."""

from __future__ import annotations

from .config import LLMEncoderConfig, RandomEncoderConfig, SentenceEncoderConfig, TextEncoderConfig
from .encoder import CaptionEncoder

__all__ = ["CaptionEncoder", "LLMEncoderConfig", "SentenceEncoderConfig", "RandomEncoderConfig",
           "TextEncoderConfig", "build_text_encoder"]


def build_text_encoder(config):
    """Any text encoder from its config: the LLM caption encoder or a baseline."""
    from .baselines import RandomEncoder, SentenceEncoder

    if isinstance(config, LLMEncoderConfig):
        return CaptionEncoder.from_config(config)
    if isinstance(config, SentenceEncoderConfig):
        return SentenceEncoder(config)
    if isinstance(config, RandomEncoderConfig):
        return RandomEncoder(config)
    raise TypeError(f"not a text encoder config: {type(config).__name__}")
