"""llm2clip: LLM2CLIP (arXiv 2411.04997), a decoder LLM made into CLIP's text teacher."""

__version__ = "0.1.0"

__all__ = ["load", "LoadedModel", "list_models", "create_model", "__version__"]


def __getattr__(name):
    # Lazy: `import llm2clip` (and the CLI's startup) must not pay for torch.
    if name in ("load", "LoadedModel"):
        from . import api

        return getattr(api, name)
    if name in ("list_models", "create_model"):
        from . import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'llm2clip' has no attribute {name!r}")
