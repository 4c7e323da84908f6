"""Image search: a folder of images embedded into a faiss index, queried by text or by image.

``llm2clip index IMAGES_DIR --model M --out INDEX`` and ``llm2clip search INDEX "query"``; in Python,
``build_index``, ``add_to_index``, ``ImageIndex`` and ``search_index`` (see index.py for the folder layout).
"""

from __future__ import annotations

__all__ = ["add_commands", "build_index", "add_to_index", "ImageIndex", "search_index", "find_images"]


def add_commands(sub) -> None:
    from .cli import add_commands as add

    add(sub)


def __getattr__(name):
    # Lazy, so registering the CLI commands imports neither faiss nor torch.
    if name in ("build_index", "add_to_index", "ImageIndex", "search_index", "find_images", "IndexInterrupted", "Hit"):
        from . import index

        return getattr(index, name)
    raise AttributeError(f"module 'llm2clip.search' has no attribute {name!r}")
