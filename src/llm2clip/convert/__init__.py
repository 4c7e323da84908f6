"""Import the released LLM2CLIP checkpoints; export ours to Hugging Face CLIP and ONNX.

Key maps: docs/CHECKPOINTS.md. Command line: ``llm2clip convert ...`` and ``llm2clip export ...``.
Names load on first use, so building the command line does not import torch for this package.
"""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "export": ["export_hf_vision", "export_onnx"],
    "official": ["VISION_PRESETS", "convert_official_clip", "convert_official_llm", "load_state_dict",
                 "resolve_vision"],
})
