"""The tiny random LLMs of the tests live in the package (the smoke preset uses them too)."""

from llm2clip.text.tiny import CHAT_TEMPLATE, SPECIALS, WORDS, make_tiny_llm, tiny_config, tiny_tokenizer  # noqa: F401
