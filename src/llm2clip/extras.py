"""Optional features and the pip extra that installs each: a missing one is a one-line message naming it.

``pip install llm2clip`` is the light core (load, encode, evaluate); the rest comes with extras (pyproject.toml):
train (webdataset shards, the report's plots), search (faiss), serve (the HTTP app), export (ONNX), logging
(TensorBoard). ``require`` is the one way to import an extra's package; the command line turns an import of a
missing one into the same message (llm2clip.cli), and tests/test_extras.py keeps the core from importing any
of them at module level.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import Llm2ClipError

# top-level module -> the extra that installs it
EXTRA_OF = {
    "webdataset": "train",
    "matplotlib": "train",
    "faiss": "search",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "starlette": "serve",
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "tensorboard": "logging",
    "aiohttp": "remote",
    "fsspec": "remote",
    "wandb": None,  # optional beside TensorBoard, in no extra: a large install few need
}


class MissingExtraError(Llm2ClipError, ImportError):
    """An optional package is not installed; the message says which extra installs it."""


def missing_extra(module: str, what: str | None = None) -> MissingExtraError | None:
    """The error for a missing ``module`` (top level used), or None when no extra provides it."""
    top = module.split(".")[0]
    if top not in EXTRA_OF:
        return None
    extra = EXTRA_OF[top]
    how = f"of the {extra!r} extra: pip install 'llm2clip[{extra}]'" if extra else f"pip install {top}"
    return MissingExtraError(f"{what or top} needs the optional package {top!r}, not installed ({how})", name=top)


def require(module: str, what: str | None = None) -> ModuleType:
    """``import module``, or a ``MissingExtraError`` naming the extra when its package is not installed
    (an import error inside an installed package is left as it is)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is None or err.name.split(".")[0] != top:
            raise
        raise missing_extra(module, what) or err from None
