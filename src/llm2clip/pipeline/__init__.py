"""`llm2clip run`: the whole method from one config, each stage resumable, and a report.

Names load on first use, so building the command line does not import torch for this package."""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ["PipelineConfig"],
    "plan": ["PRESETS", "build_stages", "load_pipeline_config", "preset_path", "run_pipeline"],
})
