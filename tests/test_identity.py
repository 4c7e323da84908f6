"""The caption encoder's identity records its numerics (compute dtype, batching): a store holds one dtype's
vectors (resuming or rerunning it with another is an error), while a model or store used with other numerics
than it was made with is a warning (the embeddings differ slightly, not in kind)."""

from __future__ import annotations

import json
import logging

import pytest

from llm2clip.errors import ConfigError
from llm2clip.features import FeatureStore, IdentityMismatchError
from llm2clip.features.extract import EmbedConfig, run_embedding
from llm2clip.identity import NUMERICS
from llm2clip.model import check_identity
from llm2clip.text import CaptionEncoder, LLMEncoderConfig

CAPS = ["a red circle", "two blue squares on a grey background", "a green triangle", "one small yellow star"]


def _identity(tiny_llm_dir, **over):
    return CaptionEncoder.from_config(LLMEncoderConfig(model=str(tiny_llm_dir), **over)).identity()


def _embed(tmp_path, tiny_llm_dir, out, dtype):
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": f"c{i}", "caption": c}) + "\n" for i, c in enumerate(CAPS)))
    cfg = EmbedConfig(encoder={"kind": "llm", "model": str(tiny_llm_dir), "dtype": dtype},
                      captions=[{"path": str(caps), "format": "jsonl"}], out=str(out), progress=False)
    return run_embedding(cfg)


def test_the_identity_records_dtype_and_batching(tiny_llm_dir):
    ident = _identity(tiny_llm_dir, dtype="bfloat16", batching="padded")
    assert ident[NUMERICS] == {"dtype": "bfloat16", "batching": "padded"}
    assert _identity(tiny_llm_dir)["weight_hash"] == ident["weight_hash"]  # the weights are the same either way


def test_other_numerics_are_a_warning_and_another_encoder_an_error(tiny_llm_dir, caplog):
    fp32, bf16 = _identity(tiny_llm_dir), _identity(tiny_llm_dir, dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        check_identity(fp32, bf16)
    assert "dtype: model trained on 'float32', now 'bfloat16'" in caplog.text
    caplog.clear()
    old = {k: v for k, v in fp32.items() if k != NUMERICS}  # recorded before numerics were
    with caplog.at_level(logging.WARNING):
        check_identity(old, bf16)
    assert "numerics" not in caplog.text
    with pytest.raises(ConfigError, match="pooling"):
        check_identity(fp32, _identity(tiny_llm_dir, pooling="last_token"))


def test_a_store_warns_about_other_numerics_and_refuses_to_mix_them(tmp_path, tiny_llm_dir, caplog):
    out = _embed(tmp_path, tiny_llm_dir, tmp_path / "store", "float32")
    store = FeatureStore.open(out)
    with caplog.at_level(logging.WARNING):
        store.check_identity(_identity(tiny_llm_dir, dtype="bfloat16"))
    assert "computed with other numerics (dtype: store 'float32', expected 'bfloat16')" in caplog.text
    with pytest.raises(IdentityMismatchError, match="pooling"):
        store.check_identity(_identity(tiny_llm_dir, pooling="last_token"))
    # the same store rerun (or resumed) with bf16: one store holds one dtype's vectors
    with pytest.raises(IdentityMismatchError, match=NUMERICS):
        _embed(tmp_path, tiny_llm_dir, tmp_path / "store", "bfloat16")
    assert _embed(tmp_path, tiny_llm_dir, tmp_path / "store", "float32") == out  # finished: nothing to do


def test_a_store_from_before_numerics_still_opens_and_reruns(tmp_path, tiny_llm_dir):
    out = _embed(tmp_path, tiny_llm_dir, tmp_path / "store", "float32")
    mf = out / "manifest.json"
    m = json.loads(mf.read_text())
    m["identity"].pop(NUMERICS)
    mf.write_text(json.dumps(m))  # (its shards still record numerics: absent on one side agrees with any)
    from llm2clip.features import store as store_mod

    store_mod._VERIFIED.clear()
    FeatureStore.open(out).check_identity(_identity(tiny_llm_dir))
    assert len(FeatureStore.open(out).get_by_ids(["c0", "c3"])) == 2
