"""Named model configs, in the style of open_clip's factory: ``list_models()`` and
``create_model(name, pretrained=None)``.

The official layouts are the released LLM2CLIP checkpoints' architectures (docs/CHECKPOINTS.md, the
towers of ``convert.official.VISION_PRESETS``): the new head to 1280-d and the official TextProj
adapter (4 blocks, expansion 2) over the caption encoder's embeddings, 4096-d for Llama-3 8B and 2048-d
for Llama-3.2 1B. Created without ``pretrained`` they have random weights, at full size (the EVA02
L/14-336 + 8B layout is about 580M parameters, 2.3 GB in fp32; ``config_of`` gives the config without
building it). ``quickstart`` is the quickstart's stage-2 model (a small ViT and an adapter over
SmolLM2-135M's 576-d embeddings). Nothing here imports torch until a model is built.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

OFFICIAL_ADAPTER = {"kind": "adapter", "depth": 4, "expansion": 2, "l2_norm": True}
LLAMA3_8B_DIM, LLAMA32_1B_DIM = 4096, 2048

# name -> (vision preset of convert.official or a vision config, adapter input dim, extra model fields, caption
# encoder the adapter expects: what `llm2clip convert official-llm` or the quickstart makes)
_MODELS: dict[str, tuple[str | dict, int, dict, str]] = {
    "LLM2CLIP-EVA02-L-14-336": ("eva02-l-14-336", LLAMA3_8B_DIM, {},
                                "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"),
    "LLM2CLIP-Llama-3.2-1B-EVA02-L-14-336": ("eva02-l-14-336", LLAMA32_1B_DIM, {},
                                             "microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned"),
    "LLM2CLIP-Openai-L-14-336": ("openai-l-14-336", LLAMA3_8B_DIM, {},
                                 "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"),
    "LLM2CLIP-Openai-L-14-224": ("openai-l-14", LLAMA3_8B_DIM, {},
                                 "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"),
    "quickstart": ({"kind": "small_vit", "image_size": 32, "patch_size": 8, "width": 96, "layers": 4, "heads": 4},
                   576, {"embed_dim": 256, "text": {"depth": 4, "expansion": 2, "standardize": True}},
                   "SmolLM2-135M-Instruct after stage 1 (llm2clip quickstart)"),
}


def list_models() -> list[str]:
    """The names ``create_model`` takes."""
    return list(_MODELS)


def _entry(name: str):
    match = {k.lower(): k for k in _MODELS}.get(str(name).lower())
    if match is None:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(_MODELS)}")
    return match, _MODELS[match]


def caption_encoder_of(name: str) -> str:
    """The caption encoder whose embeddings the named model's adapter takes."""
    return _entry(name)[1][3]


def config_of(name: str):
    """The named model's ModelConfig (builds nothing)."""
    from .convert.official import VISION_PRESETS
    from .model import ModelConfig

    _, (vision, dim, extra, _enc) = _entry(name)
    vision = VISION_PRESETS[vision] if isinstance(vision, str) else vision
    extra = dict(extra)
    text = {**OFFICIAL_ADAPTER, **extra.pop("text", {}), "in_dim": dim}
    return ModelConfig.model_validate({"vision": vision, "text": text, **extra})


def create_model(name: str, pretrained: str | Path | None = None, device: str = "cpu", precision=None):
    """The named architecture: random weights, or ``pretrained`` (a saved model folder or Hub id, which
    must hold this architecture: the same config), on ``device`` in ``precision`` (None: fp32)."""
    from .api import resolve_dtype
    from .model import LLM2CLIP

    key, _ = _entry(name)
    cfg = config_of(key)
    if pretrained is None:
        model = LLM2CLIP(cfg, load_pretrained=False)
    else:
        model = LLM2CLIP.from_pretrained(pretrained)
        have, want = model.config.model_dump(mode="json"), cfg.model_dump(mode="json")
        diff = sorted(k for k in want if have.get(k) != want[k])
        if diff:
            raise ConfigError(f"{pretrained}: not a {key} model (it differs in {', '.join(diff)}); "
                              f"load it with llm2clip.load")
    dt = resolve_dtype(precision)
    model.to(device=device, **({"dtype": dt} if dt is not None else {}))
    return model.eval()
