"""A caption's embedding does not depend on its neighbours: not on the batch it is encoded in, not on the other
captions of its feature store. With the default exact-length batching nothing is padded, so the vector is the
one the caption has alone: the stated tolerance is 1e-5 (absolute, embeddings of norm about 1-10), which leaves
room for a matrix kernel that blocks differently at another batch size; the bf16 runs here are bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm2clip.features import FeatureStore
from llm2clip.features.extract import EmbedConfig, run_embedding
from llm2clip.text import CaptionEncoder, LLMEncoderConfig
from llm2clip.text.tiny import WORDS

TARGETS = ["a red dog on the left of a blue car", "two cat", "fish",
           "a small green circle above a large yellow square near the bottom of the photo"]


def _companions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 20)))) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_alone_short_batch_and_long_batch_give_the_same_vector(tiny_llm_dir, dtype):
    enc = CaptionEncoder.from_config(LLMEncoderConfig(model=str(tiny_llm_dir), dtype=dtype, batch_size=16))
    alone = torch.cat([enc.encode([t]) for t in TARGETS])
    short = enc.encode(TARGETS + _companions(3, 0))[: len(TARGETS)]
    crowd = _companions(60, 1)
    long = enc.encode(crowd[:30] + TARGETS + crowd[30:])[30 : 30 + len(TARGETS)]
    for got in (short, long):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    print(dtype, "max abs difference to alone:", (long - alone).abs().max().item())


def test_padded_batching_is_what_moved_bf16_embeddings(tiny_llm_dir):
    # the mechanism the default avoids: padding to a longer companion changes bf16 arithmetic
    enc = CaptionEncoder.from_config(LLMEncoderConfig(model=str(tiny_llm_dir), dtype="bfloat16", batching="padded"))
    alone = torch.cat([enc.encode([t]) for t in TARGETS])
    padded = enc.encode(TARGETS + ["a " * 40 + "dog"])[: len(TARGETS)]
    assert not torch.equal(padded, alone)
    torch.testing.assert_close(padded, alone, atol=0.05, rtol=0.05)


def test_two_stores_with_different_companions_give_identical_rows(tmp_path, tiny_llm_dir):
    enc = LLMEncoderConfig(model=str(tiny_llm_dir), dtype="bfloat16", batch_size=8)
    rows = {}
    for name, extra in (("a", _companions(5, 2)), ("b", _companions(40, 3))):
        caps = tmp_path / f"{name}.jsonl"
        pairs = [(f"t{i}", t) for i, t in enumerate(TARGETS)] + [(f"{name}{i}", c) for i, c in enumerate(extra)]
        caps.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in pairs))
        cfg = EmbedConfig.model_validate(dict(encoder=enc.model_dump(), captions=[str(caps)], dtype="float32",
                                              out=str(tmp_path / f"store-{name}"), shard_size=7, progress=False))
        store = FeatureStore.open(run_embedding(cfg))
        rows[name] = np.asarray(store.get_by_ids([f"t{i}" for i in range(len(TARGETS))]))
    assert np.array_equal(rows["a"], rows["b"])
