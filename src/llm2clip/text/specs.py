"""Naming a text encoder on the command line: a preset with overrides, or a YAML config file.

    smollm2                                  the caption encoder on SmolLM2-135M-Instruct
    smollm2:bidirectional=false,template=tokenizer
    minilm | random | path/to/encoder.yaml
    runs/stage1/encoder                      a saved caption encoder (its manifest holds the settings)
"""

from __future__ import annotations

import json
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


class _EncoderFile(StrictModel):
    encoder: TextEncoderConfig


def parse_encoder_spec(spec: str):
    """A validated text-encoder config from 'preset[:key=value,...]' or a YAML file."""
    if spec.endswith((".yaml", ".yml")):
        if not Path(spec).is_file():
            raise ConfigError(f"{spec}: encoder config file not found")
        return load_config(spec, _EncoderFile).encoder
    name, _, rest = spec.partition(":")
    manifest = Path(name) / ENCODER_MANIFEST
    if manifest.is_file():
        data = {**json.loads(manifest.read_text())["encoder"], "kind": "llm", "model": name}
        return _with_overrides(spec, data, rest)
    if name not in PRESETS:
        raise ConfigError(f"unknown encoder {name!r}: one of {', '.join(PRESETS)}, a saved encoder directory, or a .yaml file")
    return _with_overrides(spec, dict(PRESETS[name]), rest)


def parse_overrides(spec: str, rest: str, what: str = "encoder") -> dict:
    """'key=value,key=value' (values read as YAML scalars) of a spec like 'preset:key=value,...'."""
    out = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{what} {spec!r}: expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _with_overrides(spec: str, data: dict, rest: str):
    data.update(parse_overrides(spec, rest))
    return parse_config({"encoder": data}, _EncoderFile, f"encoder {spec!r}").encoder
