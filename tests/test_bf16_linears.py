"""bf16_linears: an fp32 caption encoder with some linear layers in bf16 (text/precision.py). It stays close to
fp32, its identity names it, and it is refused where it cannot hold (another dtype, saving rounded weights)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from tiny import make_encoder as make

from llm2clip.errors import ConfigError
from llm2clip.identity import NUMERICS, numerics_diff, numerics_note
from llm2clip.model import check_identity
from llm2clip.text import CaptionEncoder, LLMEncoderConfig
from llm2clip.text.precision import BF16Linear
from llm2clip.text.specs import parse_encoder_spec

CAPTIONS = [
    "a red dog on the left of a blue car .",
    "two cat",
    "a small green circle above a large yellow square , near the bottom",
    "fish",
    "the bird is near the house",
]




@pytest.mark.parametrize("which", ["mlp", "all"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_close_to_fp32_on_a_tiny_llama(tiny_llm_dir, which, bidirectional):
    ref = make(tiny_llm_dir, bidirectional=bidirectional).encode(CAPTIONS)
    got = make(tiny_llm_dir, bidirectional=bidirectional, bf16_linears=which).encode(CAPTIONS)
    assert got.dtype == torch.float32
    assert not torch.equal(got, ref)  # the bf16 matmuls ran
    # stated tolerance: within 1% of the largest value, cosine > 0.9999 (measured here: 0.4% and 0.999995; bf16
    # keeps 8 bits of mantissa, and this model has 2 layers)
    torch.testing.assert_close(got, ref, rtol=0.0, atol=0.01 * ref.abs().max().item())
    assert F.cosine_similarity(got, ref).min() > 0.9999


def test_mlp_casts_only_the_mlp_projections(tiny_llm_dir):
    model = make(tiny_llm_dir, bf16_linears="mlp").model
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            in_mlp = ".mlp." in f".{name}"
            assert isinstance(m, BF16Linear) == in_mlp, name
            assert m.weight.dtype == (torch.bfloat16 if in_mlp else torch.float32), name
    assert model.embed_tokens.weight.dtype == model.norm.weight.dtype == torch.float32


def test_every_family_has_mlp_linears_to_cast(tiny_family_dirs):
    for family, path in tiny_family_dirs.items():
        enc = make(path, bf16_linears="mlp")
        n = sum(isinstance(m, BF16Linear) for m in enc.model.modules())
        assert n == 3 * enc.model.config.num_hidden_layers, family  # gate, up and down per layer
        assert torch.isfinite(enc.encode(CAPTIONS[:2])).all(), family


def test_the_identity_names_it_and_keeps_the_fp32_weight_hash(tiny_llm_dir):
    fp32, mixed = make(tiny_llm_dir).identity(), make(tiny_llm_dir, bf16_linears="mlp").identity()
    assert fp32[NUMERICS] == {"dtype": "float32", "batching": "exact"}  # as before the option existed
    assert mixed[NUMERICS] == {"dtype": "float32", "batching": "exact", "bf16_linears": "mlp"}
    assert mixed["weight_hash"] == fp32["weight_hash"]
    assert numerics_diff(fp32, mixed) == ["bf16_linears"]
    assert "bf16_linears: store 'none', expected 'mlp'" in numerics_note(fp32, mixed, "store", "expected")
    assert numerics_diff(mixed, make(tiny_llm_dir, bf16_linears="all").identity()) == ["bf16_linears"]


def test_other_bf16_linears_are_a_warning_not_an_error(tiny_llm_dir, caplog):
    fp32, mixed = make(tiny_llm_dir).identity(), make(tiny_llm_dir, bf16_linears="mlp").identity()
    with caplog.at_level(logging.WARNING):
        check_identity(fp32, mixed)
    assert "bf16_linears" in caplog.text


def test_config_validation(tiny_llm_dir):
    with pytest.raises(ValidationError, match="needs dtype float32"):
        LLMEncoderConfig(model="m", dtype="bfloat16", bf16_linears="mlp")
    with pytest.raises(ValidationError):
        LLMEncoderConfig(model="m", bf16_linears="attention")
    assert LLMEncoderConfig(model="m").bf16_linears == "none"
    assert parse_encoder_spec("smollm2:bf16_linears=mlp").bf16_linears == "mlp"
    with pytest.raises(ConfigError, match="needs dtype float32"):  # a copy that skipped validation
        cfg = LLMEncoderConfig(model=str(tiny_llm_dir), bf16_linears="mlp").model_copy(update={"dtype": "bfloat16"})
        CaptionEncoder.from_config(cfg)


def test_saving_rounded_weights_is_refused(tiny_llm_dir, tmp_path):
    with pytest.raises(ConfigError, match="bf16-rounded"):
        make(tiny_llm_dir, bf16_linears="mlp").save(tmp_path / "enc")
    assert not (tmp_path / "enc").exists()
