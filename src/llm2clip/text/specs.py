"""Naming a text encoder on the command line: a preset with overrides, or a YAML config file.

    smollm2                                  the caption encoder on SmolLM2-135M-Instruct
    smollm2:bidirectional=false,template=tokenizer
    minilm | random | path/to/encoder.yaml
"""

from __future__ import annotations

from pathlib import Path

import yaml
from ..config import StrictModel, load_config, parse_config
from ..errors import ConfigError
from .config import TextEncoderConfig

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
    if name not in PRESETS:
        raise ConfigError(f"unknown encoder {name!r}: one of {', '.join(PRESETS)} or a .yaml file")
    data = dict(PRESETS[name])
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"encoder {spec!r}: expected key=value, got {item!r}")
        data[key.strip()] = yaml.safe_load(value)
    return parse_config({"encoder": data}, _EncoderFile, f"encoder {spec!r}").encoder
