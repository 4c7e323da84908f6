"""Package names that load on first use: building the command line must not import torch."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """A module ``__getattr__`` for ``package`` that imports ``{submodule: [names]}`` on first use, and
    the names in order (for ``__all__``)."""
    where = {name: mod for mod, names in exports.items() for name in names}

    def __getattr__(name: str):
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{mod}"), name)

    return __getattr__, list(where)
