"""Feature stores under hostile edits (issue 17): every read checks what it reads.

Two stores hold the same caption ids, embedded by two encoders (bag of words, seeds 0 and 1). Store A
is then damaged in the ways a user can damage one: a flipped byte, one shard or all shards copied in
from B, B's manifest over A's files. Reading A by id and training from A must refuse, naming the shard
(and both encoder identities when the shard came from the other encoder); before, both returned B's or
garbage vectors under A's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from stage2_helpers import run_cfg

from llm2clip.data.images import BagOfWordsConfig, BagOfWordsEncoder, caption_texts
from llm2clip.features import FeatureStore, IdentityMismatchError, StoreError, write_store
from llm2clip.features import store as store_mod
from llm2clip.features.extract import EmbedConfig, run_embedding
from llm2clip.text import CaptionEncoder, LLMEncoderConfig


def _captions(tmp_path) -> dict[str, str]:
    from llm2clip.train.loop import build_source

    cfg = run_cfg(tmp_path / "probe")
    caps = {}
    for src in (cfg.data.train, cfg.data.val):
        caps.update(caption_texts(build_source(src)[0]))
    return caps


@pytest.fixture()
def two_stores(tmp_path):
    """Stores A and B over the same ids (so their id files are equal), from two encoders."""
    caps = _captions(tmp_path)
    out = []
    for name, seed in (("A", 0), ("B", 1)):
        enc = BagOfWordsEncoder(BagOfWordsConfig(dim=24, seed=seed))
        write_store(tmp_path / name, list(caps), enc.encode(list(caps.values())).numpy(), identity=enc.identity(),
                    dtype="float32", shard_size=40)
        out.append(tmp_path / name)
    store_mod._VERIFIED.clear()  # as in a fresh process
    return (*out, list(caps))


def _flip_byte(a, b):
    p = a / "shard-00001.npy"
    data = bytearray(p.read_bytes())
    data[200] ^= 0x01  # inside the array data
    p.write_bytes(bytes(data))


def _one_shard_from_b(a, b):
    shutil.copy(b / "shard-00001.npy", a / "shard-00001.npy")


def _b_manifest_over_a(a, b):
    shutil.copy(b / "manifest.json", a / "manifest.json")


def _all_shards_from_b(a, b):
    for p in b.glob("shard-*.npy"):
        shutil.copy(p, a / p.name)


CASES = {
    "flipped_byte": (_flip_byte, StoreError, r"shard-00001.npy: checksum mismatch"),
    "one_shard_from_another_encoder": (_one_shard_from_b, IdentityMismatchError,
                                       r"shard-00001.npy: this shard was written under another encoder"),
    "another_stores_manifest": (_b_manifest_over_a, IdentityMismatchError,
                                r"shard-0000\d.npy: this shard was written under another encoder"),
    "all_shards_from_another_encoder": (_all_shards_from_b, IdentityMismatchError,
                                        r"shard-0000\d.npy: this shard was written under another encoder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_get_by_ids_refuses_a_damaged_or_mixed_store(two_stores, case):
    a, b, ids = two_stores
    damage, error, message = CASES[case]
    damage(a, b)
    store = FeatureStore.open(a)
    with pytest.raises(error, match=message) as err:
        store.get_by_ids(ids)
    if error is IdentityMismatchError:  # both identities named: the seeds differ
        assert "seed: shard written under 1, store manifest has 0" in str(err.value) or \
               "seed: shard written under 0, store manifest has 1" in str(err.value)
    with pytest.raises(StoreError):
        store.verify()


@pytest.mark.parametrize("case", list(CASES))
def test_training_refuses_a_damaged_or_mixed_store(two_stores, tmp_path, case):
    from llm2clip.train.loop import fit

    a, b, _ = two_stores
    damage, error, message = CASES[case]
    damage(a, b)
    cfg = run_cfg(tmp_path / "run", train__steps=2, data__features={"store": str(a)})
    with pytest.raises(error, match=message):
        fit(cfg, progress=False)


def test_each_file_is_hashed_once_per_process(two_stores, monkeypatch):
    a, _, ids = two_stores
    calls = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: calls.append(p.name) or real(p))
    store = FeatureStore.open(a)
    first = store.get_by_ids(ids)
    n_files = len(store.manifest["shards"]) + 2
    assert sorted(calls) == sorted({*calls}) and len(calls) == n_files  # every shard and both id files, once
    again = FeatureStore.open(a)  # another reader in the same process does not hash again
    np.testing.assert_array_equal(again.get_by_ids(ids), first)
    assert len(calls) == n_files
    store.verify()  # the explicit check always rereads
    assert len(calls) == 2 * n_files


def test_training_with_workers_checks_the_store_once_before_they_fork(two_stores, tmp_path, monkeypatch):
    """With DataLoader workers, every file is checked in the main process first: workers forked after it
    inherit the checked files instead of each hashing the whole store again."""
    from llm2clip.train.loop import fit

    a, _, _ = two_stores
    calls = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: calls.append(p.name) or real(p))
    cfg = run_cfg(tmp_path / "run", train__steps=2, data__features={"store": str(a)}, data__workers=1)
    fit(cfg, progress=False)
    n_files = len(FeatureStore.open(a).manifest["shards"]) + 2
    assert sorted(calls) == sorted({*calls}) and len(calls) == n_files  # all of them, in this process, once


def _strip_records(store_dir, names) -> dict:
    """Shards as an older llm2clip wrote them (no record after the array); the manifest updated to match."""
    m = json.loads((store_dir / "manifest.json").read_text())
    for entry in m["shards"]:
        if entry["file"] in names:
            p = store_dir / entry["file"]
            data = p.read_bytes()
            data = data[: data.index(store_mod.RECORD_MARK)]
            p.write_bytes(data)
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (store_dir / "manifest.json").write_text(json.dumps(m))
    return m


def test_a_store_from_before_shard_records_is_checked_by_its_digests(two_stores):
    a, _, ids = two_stores
    expect = FeatureStore.open(a).get_by_ids(ids)
    m = _strip_records(a, {f"shard-{k:05d}.npy" for k in range(99)})
    del m[store_mod.RECORD_FIELD]
    (a / "manifest.json").write_text(json.dumps(m))
    store_mod._VERIFIED.clear()
    np.testing.assert_array_equal(FeatureStore.open(a).get_by_ids(ids), expect)
    _flip_byte(a, None)
    store_mod._VERIFIED.clear()
    with pytest.raises(StoreError, match="shard-00001.npy: checksum mismatch"):
        FeatureStore.open(a).get_by_ids(ids)


def test_a_shard_without_a_record_in_a_new_store_is_refused(two_stores):
    a, _, ids = two_stores
    _strip_records(a, {"shard-00002.npy"})  # even with a manifest digest that matches it
    with pytest.raises(StoreError, match="shard-00002.npy: the shard records no encoder identity"):
        FeatureStore.open(a).get_by_ids(ids)


# ------------------------------------------------------------------------------------ truncation
def test_embedding_counts_truncated_captions_and_warns_once(tmp_path, tiny_llm_dir, caplog, capsys):
    from llm2clip.features.cli import main as features_main

    cfg = LLMEncoderConfig(model=str(tiny_llm_dir), max_length=16, batch_size=2)
    encoder = CaptionEncoder.from_config(cfg)
    words = "red cube left of blue ball small green cone".split()
    texts = [" ".join(words[: 2 + i % 9] * (1 + i % 4)) + f" {i}" for i in range(40)]
    expect = sum(t.truncated for t in encoder.tokenize(texts))
    assert 0 < expect < len(texts)
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": f"c{i}", "caption": t}) + "\n" for i, t in enumerate(texts)))
    run = EmbedConfig(encoder=cfg.model_dump(), captions=[str(caps)], out=str(tmp_path / "store"), shard_size=7,
                      progress=False)
    with caplog.at_level(logging.WARNING):
        run_embedding(run, encoder=encoder)
    m = FeatureStore.open(tmp_path / "store").manifest
    assert m["truncated_captions"] == expect and m["max_length"] == 16
    warned = [r for r in caplog.records if "truncated" in r.getMessage() or "were cut" in r.getMessage()]
    assert len(warned) == 1 and f"{expect} of 40" in warned[0].getMessage()
    capsys.readouterr()
    assert features_main(["features", "info", str(tmp_path / "store")]) == 0
    assert f"truncated:  {expect} of 40 unique captions cut at max_length 16" in capsys.readouterr().out


def test_no_truncation_records_zero(tmp_path):
    from llm2clip.text import RandomEncoderConfig

    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": f"c{i}", "caption": f"caption {i}"}) + "\n" for i in range(5)))
    run = EmbedConfig(encoder=RandomEncoderConfig(dim=8).model_dump(), captions=[str(caps)],
                      out=str(tmp_path / "store"), shard_size=2, progress=False)
    run_embedding(run)
    m = FeatureStore.open(tmp_path / "store").manifest
    assert m["truncated_captions"] == 0 and m["max_length"] is None


class _TokenizerEncoder:
    """A stand-in for a tokenizer-based encoder that does not count truncation itself (the sentence encoder)."""

    dim = 4

    config = SimpleNamespace(max_length=3)

    @staticmethod
    def tokenizer(texts):
        return {"input_ids": [t.split() for t in texts]}

    def identity(self):
        return {"base_model": "words", "max_length": 3, "dim": 4}

    def encode(self, captions, batch_size=None, progress=None):
        import torch

        return torch.ones(len(captions), 4)


def test_truncation_of_an_encoder_without_its_own_count_is_asked_of_its_tokenizer(tmp_path):
    from llm2clip.text import RandomEncoderConfig

    texts = ["one two", "one two three", "one two three four", "a b c d e f"]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": f"c{i}", "caption": t}) + "\n" for i, t in enumerate(texts)))
    run = EmbedConfig(encoder=RandomEncoderConfig(dim=4).model_dump(), captions=[str(caps)],
                      out=str(tmp_path / "store"), shard_size=3, progress=False)
    run_embedding(run, encoder=_TokenizerEncoder())
    m = FeatureStore.open(tmp_path / "store").manifest
    assert m["truncated_captions"] == 2 and m["max_length"] == 3
