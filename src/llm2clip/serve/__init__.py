"""`llm2clip serve INDEX`: an HTTP search server and search page over an image index (FastAPI + uvicorn).

In Python: ``create_app(loaded_model, index_folder)`` (app.py) gives the ASGI app without starting a server.
"""

from __future__ import annotations

__all__ = ["add_commands", "create_app", "ServeSettings"]


def add_commands(sub) -> None:
    from .cli import add_commands as add

    add(sub)


def __getattr__(name):
    # Lazy, so registering the CLI command imports neither fastapi nor torch.
    if name in ("create_app", "ServeSettings"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'llm2clip.serve' has no attribute {name!r}")
