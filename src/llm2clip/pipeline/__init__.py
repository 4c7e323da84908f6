"""`llm2clip run`: the whole method from one config, each stage resumable, and a report.

Names load on first use, so building the command line does not import torch for this package."""

_EXPORTS = {
    "config": ["PipelineConfig"],
    "plan": ["PRESETS", "build_stages", "load_pipeline_config", "preset_path", "run_pipeline"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
