"""The embed job's planner in bounded memory (issue 18, point 2): the same rows, ids, fingerprint and id files as
the in-memory reader, whatever the chunk and bucket sizes; crash-safe; one plan for several ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from test_features import dir_bytes, make_captions, subprocess_env, write_config, write_jsonl

from llm2clip.errors import InputError
from llm2clip.features import FeatureStore, MissingIdError, StoreError
from llm2clip.features import plan as plan_mod
from llm2clip.features.extract import (
    BuiltinSource,
    EmbedConfig,
    FileSource,
    plan_sources,
    read_captions,
    run_embedding,
)
from llm2clip.features.store import _sorted_keys, npy_bytes
from llm2clip.text import RandomEncoderConfig

TINY = {"chunk": 3, "part": 4, "hash_buckets": 2, "sample": 2}
KNOBS = [{}, TINY, {"chunk": 1, "part": 1, "hash_buckets": 1, "sample": 1}]


@pytest.fixture()
def sources(tmp_path) -> list:
    """Several files and formats; equal texts within and across files; ids repeated with the same caption."""
    pairs = make_captions(80, seed=3, dup_every=3)
    a = write_jsonl(tmp_path / "a.jsonl", pairs[:50] + pairs[5:9])  # ids repeated with their caption
    b = tmp_path / "b.csv"
    b.write_text("id,caption\n" + "".join(f'x{i},"{c}"\n' for i, (_, c) in enumerate(pairs[40:]))
                 + "".join(f'{i},"{c}"\n' for i, c in pairs[60:62]))
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"image": f"p{i}.jpg", "captions": [
        {"id": f"p{i}-s", "kind": "short", "text": pairs[i][1]},
        {"id": f"p{i}-d", "kind": "dense", "text": f"a long {pairs[i][1]}"}]}) + "\n" for i in range(12)))
    return [FileSource(path=str(a)), FileSource(path=str(b), format="csv"), FileSource(path=str(m)),
            BuiltinSource(builtin="cupl-heldout", classes=2, per_class=3)]


def check_equal(plan, ref) -> None:
    assert (plan.rows, plan.ids, plan.records, plan.repeated_ids) == (len(ref.texts), len(ref.ids), ref.records,
                                                                     ref.repeated_ids)
    assert plan.fingerprint == ref.fingerprint
    assert plan.texts(0, plan.rows) == ref.texts
    keys, rows = _sorted_keys(ref.ids, ref.id_rows)
    assert (plan.folder / "ids.npy").read_bytes() == npy_bytes(keys)
    assert (plan.folder / "id_rows.npy").read_bytes() == npy_bytes(rows)


@pytest.mark.parametrize("knobs", KNOBS, ids=["default", "tiny", "one"])
def test_plan_equals_the_in_memory_reader(tmp_path, sources, knobs):
    ref = read_captions(sources)
    assert ref.repeated_ids == 4 and len(ref.texts) < len(ref.ids)
    plan = plan_sources(sources, tmp_path / "plan", **knobs)
    check_equal(plan, ref)
    assert plan.texts(7, 19) == ref.texts[7:19] and plan.texts(5, 5) == []
    left = sorted(p.name for p in (tmp_path / "plan").iterdir())
    assert left == ["id_rows.npy", "ids.npy", "plan.json", "rows.bin", "rows.end"]  # scratch of the stages gone


def test_equal_hashes_are_confirmed_on_the_bytes(tmp_path, sources, monkeypatch):
    real = plan_mod._hashes
    monkeypatch.setattr(plan_mod, "_hashes", lambda items: real(items) & np.uint64(3))  # 4 values: collisions
    check_equal(plan_sources(sources, tmp_path / "plan", **TINY), read_captions(sources))


@pytest.mark.parametrize("knobs", KNOBS[:2], ids=["default", "tiny"])
def test_an_id_with_two_captions_is_the_same_error(tmp_path, knobs):
    pairs = make_captions(30, seed=1)
    a = write_jsonl(tmp_path / "a.jsonl", pairs)
    b = write_jsonl(tmp_path / "b.jsonl", [("img20/c", "another caption"), ("img3/c", pairs[3][1]),
                                           ("img7/c", "and one more")])
    sources = [FileSource(path=str(a)), FileSource(path=str(b))]
    with pytest.raises(InputError) as want:
        read_captions(sources)
    with pytest.raises(InputError) as got:
        plan_sources(sources, tmp_path / "plan", **knobs)
    assert str(got.value) == str(want.value)
    assert "b.jsonl:1: id 'img20/c' was given at " in str(got.value) and "a.jsonl:21" in str(got.value)
    assert not (tmp_path / "plan").exists()  # an input error leaves no scratch behind


def test_a_caption_that_is_not_utf8_names_its_line(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"id": "a", "caption": "fine"}\n{"id": "b", "caption": "bad \\ud800 half"}\n')
    with pytest.raises(InputError, match=r"s.jsonl:2: not encodable as UTF-8"):
        plan_sources([FileSource(path=str(f), format="jsonl")], tmp_path / "plan")
    assert not (tmp_path / "plan").exists()


def test_no_captions(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(InputError, match=r"no captions in .*e.jsonl"):
        plan_sources([FileSource(path=str(tmp_path / "e.jsonl"), format="jsonl")], tmp_path / "plan")


def test_memory_is_bounded_by_the_chunk_not_the_captions(tmp_path):
    """Python-side peak (tracemalloc, numpy included) of planning 3,000 and 24,000 captions with the same knobs:
    about flat, where the in-memory reader grows with the captions."""
    knobs = {"chunk": 256, "part": 1024, "hash_buckets": 64, "sample": 64}
    warm = [FileSource(path=str(write_jsonl(tmp_path / "warm.jsonl", make_captions(50))))]
    plan_sources(warm, tmp_path / "warm", **knobs)  # first-use imports and caches out of the measure
    read_captions(warm)
    peaks = {}
    for n in (3000, 24000):
        src = [FileSource(path=str(write_jsonl(tmp_path / f"{n}.jsonl", make_captions(n, seed=n))))]
        for name, fn in (("plan", lambda s=src, n=n: plan_sources(s, tmp_path / f"p{n}", **knobs)),
                         ("read", lambda s=src: read_captions(s))):
            tracemalloc.start()
            fn()
            peaks[name, n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peaks["read", 24000] > 5 * peaks["read", 3000]
    assert peaks["plan", 24000] < 1.5 * peaks["plan", 3000]
    assert peaks["plan", 24000] < peaks["read", 24000] / 4


def embed_config(tmp_path, sources, out="store", **kw) -> EmbedConfig:
    return EmbedConfig(encoder=RandomEncoderConfig(dim=4), captions=sources, out=str(tmp_path / out),
                       shard_size=9, progress=False, **kw)


def test_a_crash_mid_plan_then_a_rerun_equals_one_run(tmp_path, sources, monkeypatch):
    ref = run_embedding(embed_config(tmp_path, sources, "ref"))
    cfg = embed_config(tmp_path, sources)
    real = plan_mod._write_keys

    def boom(*a, **k):
        raise RuntimeError("killed mid-plan")

    monkeypatch.setattr(plan_mod, "_write_keys", boom)
    with pytest.raises(RuntimeError, match="killed mid-plan"):  # a new job: only the plan folder exists
        run_embedding(cfg)
    assert not list(Path(cfg.out).iterdir())  # an error mid-plan leaves no scratch behind
    monkeypatch.setattr(plan_mod, "_write_keys", real)

    import llm2clip.features.extract as ex

    encode, calls = ex._encode_shard, []

    def dies_on_the_third_shard(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-job")
        return encode(*a, **k)

    monkeypatch.setattr(ex, "_encode_shard", dies_on_the_third_shard)
    with pytest.raises(RuntimeError, match="killed mid-job"):
        run_embedding(cfg)
    monkeypatch.setattr(ex, "_encode_shard", encode)
    monkeypatch.setattr(plan_mod, "_write_keys", boom)
    with pytest.raises(RuntimeError, match="killed mid-plan"):  # a resumed job this time
        run_embedding(cfg)
    monkeypatch.setattr(plan_mod, "_write_keys", real)
    run_embedding(cfg)
    assert dir_bytes(cfg.out) == dir_bytes(ref)
    assert not (Path(cfg.out) / "plan").exists()
    run_embedding(cfg)  # finished: a no-op that leaves no plan behind
    assert sorted(p.name for p in Path(cfg.out).iterdir()) == sorted(dir_bytes(ref))


def test_a_finished_store_is_checked_against_a_plan_made_outside_it(tmp_path, sources, monkeypatch):
    """A rerun on a finished store plans (to check the captions) in a temporary folder, not in the store."""
    import llm2clip.features.extract as ex

    cfg = embed_config(tmp_path, sources)
    run_embedding(cfg)
    before = dir_bytes(cfg.out)
    seen, real = [], ex.plan_sources

    def spy(srcs, folder, **kw):
        seen.append(Path(folder))
        return real(srcs, folder, **kw)

    monkeypatch.setattr(ex, "plan_sources", spy)
    run_embedding(cfg)
    assert len(seen) == 1 and Path(cfg.out) not in seen[0].parents
    assert not seen[0].exists() and not seen[0].parent.exists()  # removed afterwards
    assert dir_bytes(cfg.out) == before
    # the check still compares: other captions for the finished store are refused
    other = embed_config(tmp_path, sources[:1])
    other = other.model_copy(update={"out": cfg.out})
    with pytest.raises(InputError, match="other settings or captions"):
        run_embedding(other)
    assert dir_bytes(cfg.out) == before


def test_a_foreign_folder_is_refused_before_any_plan(tmp_path, sources):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and not a store"):
        run_embedding(embed_config(tmp_path, sources))
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["notes.txt"]


def test_lookups_read_memory_maps_and_a_missing_id_is_a_key_error(tmp_path, sources):
    store = FeatureStore.open(run_embedding(embed_config(tmp_path, sources)))
    ref = read_captions(sources)
    assert store.rows_of(ref.ids).tolist() == ref.id_rows.tolist()
    keys, rows = store._load_keys()
    assert isinstance(keys, np.memmap) and isinstance(rows, np.memmap)  # searched on disk, never loaded whole
    with pytest.raises(KeyError, match="'ghost'") as err:
        store.get_by_ids([ref.ids[0], "ghost"])
    assert isinstance(err.value, MissingIdError) and isinstance(err.value, StoreError)
    assert err.value.missing == ["ghost"] and str(err.value).endswith("1 caption id(s) not in the store: 'ghost'")


@pytest.mark.slow
def test_two_processes_share_rank0s_plan(tmp_path, sources):
    ref = run_embedding(embed_config(tmp_path, sources, "one"))
    cfg = write_config(tmp_path / "embed.yaml", encoder={"kind": "random", "dim": 4}, out="two", shard_size=9,
                       progress=False, captions=[s.model_dump(mode="json") for s in sources])
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llm2clip.features.cli", "embed"]
    two = subprocess.run([*run, str(cfg)], env=subprocess_env(threads=1), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert dir_bytes(tmp_path / "two") == dir_bytes(ref)
    # an input error found by rank 0's plan stops both ranks with its message, not a hang
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "caption": "x"}\n{"id": "a", "caption": "y"}\n')
    write_config(cfg, encoder={"kind": "random", "dim": 4}, out="bad", captions=[str(tmp_path / "bad.jsonl")])
    bad = subprocess.run([*run, str(cfg)], env=subprocess_env(threads=1), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.count("bad.jsonl:2: id 'a' was given at") >= 2, bad.stderr[-3000:]
