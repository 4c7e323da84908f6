import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Converted models (the SmolLM2 GGUF) are cached inside the checkout between runs.
os.environ.setdefault("LLM2CLIP_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "llm2clip"))
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_llm


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a word-level tokenizer (BOS added, chat template set)."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory) -> dict:
    return {f: make_tiny_llm(tmp_path_factory.mktemp(f"tiny-{f}"), f) for f in ("llama", "qwen2", "mistral", "gemma2")}
