"""Import the released LLM2CLIP checkpoints; export ours to Hugging Face CLIP and ONNX.

Key maps: docs/CHECKPOINTS.md. Command line: ``llm2clip convert ...`` and ``llm2clip export ...``.
Names load on first use, so building the command line does not import torch for this package.
"""

_EXPORTS = {
    "export": ["export_hf_vision", "export_onnx"],
    "official": ["VISION_PRESETS", "convert_official_clip", "convert_official_llm", "load_state_dict",
                 "resolve_vision"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
