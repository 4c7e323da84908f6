"""Config validation (file, line, field), encoder specs, caption sets."""

import json
import re

import pytest

from llm2clip.config import load_config
from llm2clip.data.captions import cupl_caption_set, cupl_split, load_caption_jsonl, mask_class_name
from llm2clip.errors import ConfigError, InputError
from llm2clip.text.config import LLMEncoderConfig, RandomEncoderConfig, SentenceEncoderConfig
from llm2clip.text.specs import _EncoderFile, parse_encoder_spec


def test_bad_field_is_reported_with_file_line_and_name(tmp_path):
    f = tmp_path / "enc.yaml"
    f.write_text("encoder:\n  kind: llm\n  model: smollm2-135m-instruct\n  pooling: median\n  batch_size: -3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, _EncoderFile)
    msg = str(e.value)
    assert f"{f}:4: encoder.pooling" in msg and "median" in msg
    assert f"{f}:5: encoder.batch_size" in msg


def test_unknown_field_and_bad_yaml(tmp_path):
    f = tmp_path / "enc.yaml"
    f.write_text("encoder:\n  kind: llm\n  model: m\n  poolin: mean\n")
    with pytest.raises(ConfigError, match=r"enc.yaml:4: encoder.poolin: Extra inputs"):
        load_config(f, _EncoderFile)
    f.write_text("encoder: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, _EncoderFile)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", _EncoderFile)


def test_relative_model_paths_resolve_against_the_config(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    f = tmp_path / "enc.yaml"
    f.write_text("encoder:\n  kind: llm\n  model: models/m\n  adapters: [./lora]\n")
    cfg = load_config(f, _EncoderFile).encoder
    assert cfg.model == str(tmp_path / "models" / "m")
    assert cfg.adapters == [str(tmp_path / "lora")]


def test_encoder_specs():
    cfg = parse_encoder_spec("smollm2:bidirectional=false,template=tokenizer,max_length=64")
    assert isinstance(cfg, LLMEncoderConfig)
    assert (cfg.bidirectional, cfg.template, cfg.max_length, cfg.model) == (False, "tokenizer", 64,
                                                                           "smollm2-135m-instruct")
    assert isinstance(parse_encoder_spec("minilm"), SentenceEncoderConfig)
    assert parse_encoder_spec("random:dim=8").dim == 8
    assert isinstance(parse_encoder_spec("random"), RandomEncoderConfig)
    with pytest.raises(ConfigError, match="unknown encoder 'gpt'"):
        parse_encoder_spec("gpt")
    with pytest.raises(ConfigError, match="template"):
        parse_encoder_spec("smollm2:template=llama2")
    with pytest.raises(ConfigError, match="key=value"):
        parse_encoder_spec("smollm2:bidirectional")


def test_cupl_split_is_fixed_and_disjoint():
    train, held = cupl_split()
    assert len(held) == 200 and len(train) == 798 and not set(train) & set(held)
    assert cupl_split() == (train, held)
    cs = cupl_caption_set("heldout", 200, 5)
    assert len(cs) == 1000 and len(set(cs.groups)) == 200 and set(cs.groups) <= set(held)
    assert cupl_caption_set("heldout", 200, 5).captions == cs.captions  # seeded
    tr = cupl_caption_set("train", None, 2)
    assert set(tr.groups) == set(train)


def test_class_name_masking():
    assert mask_class_name("A goldfish is a small fish. Goldfishes swim.", "goldfish") == \
        "A X is a small fish. X swim."
    assert mask_class_name("The great white shark hunts; sharks are fast.", "great white shark") == \
        "The X hunts; X are fast."
    masked = cupl_caption_set("heldout", 20, 5, mask_class_names=True)
    plain = cupl_caption_set("heldout", 20, 5)
    for m, g in zip(masked.captions, plain.groups):  # whole words only: 'chain' stays in 'chainmail'
        assert not re.search(rf"\b{re.escape(g)}s?\b", m, flags=re.IGNORECASE)
    assert masked.captions != plain.captions


def test_caption_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "caps.jsonl"
    lines = [json.dumps({"group": 1, "caption": "a dog"}), "", json.dumps({"group": 1, "caption": "a cat"})]
    f.write_text("\n".join(lines) + "\n")
    cs = load_caption_jsonl(f)
    assert cs.captions == ["a dog", "a cat"] and cs.groups == ["1", "1"]
    for body, msg in [('{"group": 1}\n', ":1: missing field 'caption'"),
                      ('{"group": 1, "caption": ""}\n', ":1: field 'caption'"),
                      ('{"group": 1, "caption": "x"}\n{oops\n', ":2: not valid JSON"),
                      ("[1]\n", ":1: expected a JSON object"),
                      ("", "no captions")]:
        f.write_text(body)
        with pytest.raises(InputError, match=msg):
            load_caption_jsonl(f)
