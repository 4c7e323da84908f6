"""The tiny random LLMs of the tests live in the package (the smoke preset uses them too)."""

from llm2clip.text.tiny import CHAT_TEMPLATE, SPECIALS, WORDS, make_tiny_llm, tiny_config, tiny_tokenizer  # noqa: F401


def make_encoder(path, **kw):
    """A caption encoder over the tiny LLM at ``path`` (settings as LLMEncoderConfig fields)."""
    from llm2clip.text import CaptionEncoder, LLMEncoderConfig

    return CaptionEncoder.from_config(LLMEncoderConfig(model=str(path), **kw))
