"""The LLM side: loading, bidirectional attention, pooling, templates, CaptionEncoder.

Names load on first use: the configs need no torch, the encoders do."""

from __future__ import annotations

_EXPORTS = {
    "config": ["LLMEncoderConfig", "SentenceEncoderConfig", "RandomEncoderConfig", "TextEncoderConfig"],
    "encoder": ["CaptionEncoder"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = [*_WHERE, "build_text_encoder"]


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


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
