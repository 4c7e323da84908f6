"""`llm2clip run`: the whole method from one config, each stage resumable, and a report."""

from .config import PipelineConfig
from .plan import PRESETS, build_stages, load_pipeline_config, preset_path, run_pipeline

__all__ = ["PipelineConfig", "PRESETS", "build_stages", "load_pipeline_config", "preset_path", "run_pipeline"]
