"""Naming an encoder: a preset with overrides, a saved encoder, a YAML config file, or a config.

    smollm2                                  the caption encoder on SmolLM2-135M-Instruct
    smollm2:bidirectional=false,template=tokenizer
    minilm | random | path/to/encoder.yaml
    runs/stage1/encoder                      a saved caption encoder (its manifest holds the settings)
    bow[:dim=N,seed=S]                       the bag-of-words stand-in (caption encoders only)

The one parser of the package: ``parse_encoder_spec(spec)`` gives a text-encoder config (what
``llm2clip encode`` and CRA scoring build); ``parse_encoder_spec(spec, caption=True)`` (alias
``parse_caption_encoder_spec``) also takes the bag-of-words stand-in, a dict or a config object, and
validates against every kind stage 2 accepts (what a model's caption encoder can be).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import yaml

from ..config import StrictModel, load_config, parse_config
from ..errors import ConfigError
from .config import TextEncoderConfig
from .encoder import ENCODER_MANIFEST

PRESETS: dict[str, dict] = {
    "smollm2": {"kind": "llm", "model": "smollm2-135m-instruct"},
    "minilm": {"kind": "sentence", "model": "all-minilm-l6-v2"},
    "random": {"kind": "random", "dim": 576},
}
CAPTION_ONLY = {"bow": {"kind": "bow"}}  # stage 2 accepts it as a caption encoder; `encode` does not


class _EncoderFile(StrictModel):
    encoder: TextEncoderConfig


@lru_cache(maxsize=1)
def _caption_file_model():
    # The caption-encoder union lives with the stage-2 config (it adds the bag-of-words stand-in).
    from ..train.config import CaptionEncoderConfig

    class _CaptionEncoderFile(StrictModel):
        encoder: CaptionEncoderConfig

    return _CaptionEncoderFile


def parse_encoder_spec(spec, *, caption: bool = False, where: str | None = None):
    """A validated encoder config from 'preset[:key=value,...]', a saved encoder folder or a YAML file
    with an ``encoder:`` mapping. ``caption=True``: a caption-encoder config, also from 'bow[:...]', a
    dict or an already-built config (returned as it is). ``where`` names the source in errors."""
    from pydantic import BaseModel

    File = _caption_file_model() if caption else _EncoderFile
    if caption and isinstance(spec, BaseModel):
        return spec
    if caption and isinstance(spec, dict):
        return parse_config({"encoder": spec}, File, where or "caption encoder").encoder
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str):
        what = "a spec string, a dict or a config" if caption else "a spec string"
        raise ConfigError(f"{where or 'encoder'}: expected {what}, not {type(spec).__name__}")
    if spec.endswith((".yaml", ".yml")):
        if not Path(spec).is_file():
            raise ConfigError(f"{spec}: encoder config file not found")
        return load_config(spec, File).encoder
    name, _, rest = spec.partition(":")
    manifest = Path(name) / ENCODER_MANIFEST
    if manifest.is_file():
        data = {**json.loads(manifest.read_text())["encoder"], "kind": "llm", "model": name}
    elif name in PRESETS or (caption and name in CAPTION_ONLY):
        data = dict(PRESETS.get(name) or CAPTION_ONLY[name])
    else:
        known = ", ".join([*PRESETS, *(CAPTION_ONLY if caption else ())])
        raise ConfigError(f"unknown encoder {name!r}: one of {known}, a saved encoder directory, or a .yaml file")
    what = "caption encoder" if caption else "encoder"
    data.update(parse_overrides(spec, rest, what))
    return parse_config({"encoder": data}, File, where or f"{what} {spec!r}").encoder


def parse_caption_encoder_spec(spec, where: str | None = None):
    """``parse_encoder_spec(spec, caption=True)``: what a model's caption encoder can be."""
    return parse_encoder_spec(spec, caption=True, where=where)


def parse_overrides(spec: str, rest: str, what: str = "encoder") -> dict:
    """'key=value,key=value' (values read as YAML scalars) of a spec like 'preset:key=value,...'."""
    out = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{what} {spec!r}: expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out
