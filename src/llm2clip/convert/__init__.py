"""Import the released LLM2CLIP checkpoints; export ours to Hugging Face CLIP and ONNX.

Key maps: docs/CHECKPOINTS.md. Command line: ``llm2clip convert ...`` and ``llm2clip export ...``.
"""

from .export import export_hf_vision, export_onnx
from .official import VISION_PRESETS, convert_official_clip, convert_official_llm, load_state_dict, resolve_vision

__all__ = ["convert_official_clip", "convert_official_llm", "export_hf_vision", "export_onnx", "load_state_dict",
           "resolve_vision", "VISION_PRESETS"]
