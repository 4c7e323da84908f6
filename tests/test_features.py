"""The caption-embedding store and the extraction job (issue 4): format, resume, distributed, errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import WORDS

from llm2clip.errors import ConfigError, InputError
from llm2clip.features import FeatureStore, IdentityMismatchError, StoreError, write_store
from llm2clip.features.cli import add_commands
from llm2clip.features.cli import main as features_main
from llm2clip.features.extract import EmbedConfig, load_embed_config, read_captions, run_embedding
from llm2clip.text import CaptionEncoder, LLMEncoderConfig, RandomEncoderConfig

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers
def make_captions(n: int, seed: int = 0, dup_every: int = 5) -> list[tuple[str, str]]:
    """(id, caption) pairs from the tiny vocabulary; every `dup_every`-th repeats an earlier caption."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if dup_every and i and i % dup_every == 0:
            text = out[rng.randrange(i)][1]
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))
        out.append((f"img{i}/c", text))
    return out


def write_jsonl(path: Path, pairs, id_key="id", cap_key="caption") -> Path:
    path.write_text("".join(json.dumps({id_key: i, cap_key: c}) + "\n" for i, c in pairs))
    return path


def write_config(path: Path, **fields) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


def subprocess_env(threads: int | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    # Same thread count in every compared run, so float reductions happen in the same order.
    env["OMP_NUM_THREADS"] = str(threads or torch.get_num_threads())
    return env


class CountingEncoder:
    """Wraps an encoder and records every caption it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.dim, self.config = inner.dim, getattr(inner, "config", None)

    def identity(self):
        return self.inner.identity()

    def encode(self, captions, batch_size=None, progress=None):
        self.seen.extend(captions)
        return self.inner.encode(captions, batch_size=batch_size, progress=progress)


@pytest.fixture(scope="module")
def tiny_cfg(tiny_llm_dir) -> LLMEncoderConfig:
    return LLMEncoderConfig(model=str(tiny_llm_dir), max_length=64, batch_size=8)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_cfg) -> CaptionEncoder:
    return CaptionEncoder.from_config(tiny_cfg)


@pytest.fixture()
def caps_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "caps.jsonl", make_captions(53))


def embed_cfg(tmp_path, caps_file, encoder, **kw) -> EmbedConfig:
    fields = dict(encoder=encoder.model_dump() if hasattr(encoder, "model_dump") else encoder,
                  captions=[str(caps_file)], out=str(tmp_path / "store"), shard_size=10, progress=False)
    fields.update(kw)
    return EmbedConfig.model_validate(fields)


# ------------------------------------------------------------------------------ values & format
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rows_equal_encoder_output_cast_to_store_dtype(tmp_path, caps_file, tiny_cfg, tiny_encoder, dtype):
    cfg = embed_cfg(tmp_path, caps_file, tiny_cfg, dtype=dtype)
    store = FeatureStore.open(run_embedding(cfg, encoder=tiny_encoder), identity=tiny_encoder.identity())
    pairs = make_captions(53)
    ids, texts = [i for i, _ in pairs], [c for _, c in pairs]
    # Independent reference: one encode call over all captions (other batches), cast by torch.
    ref = tiny_encoder.encode(texts).to(getattr(torch, dtype)).float().numpy()
    got = store.get_by_ids(ids)
    assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=tol, atol=tol)
    assert store.dtype == dtype and store.dim == tiny_encoder.dim == 32
    assert store.identity == json.loads(json.dumps(tiny_encoder.identity()))


def test_duplicate_captions_embedded_once(tmp_path, caps_file, tiny_encoder, tiny_cfg):
    pairs = make_captions(53)
    unique = list(dict.fromkeys(c for _, c in pairs))
    assert len(unique) < len(pairs)
    counting = CountingEncoder(tiny_encoder)
    store = FeatureStore.open(run_embedding(embed_cfg(tmp_path, caps_file, tiny_cfg), encoder=counting))
    assert sorted(counting.seen) == sorted(unique)  # each unique text exactly once
    assert len(store) == len(unique) and store.num_ids == len(pairs)
    first_id = {}
    for i, c in pairs:
        first_id.setdefault(c, i)
        assert store.row_of(i) == store.row_of(first_id[c])
    m = store.manifest["captions"]
    assert m["records"] == 53 and m["ids_sharing_a_row"] == len(pairs) - len(unique)


def test_files_readable_without_llm2clip(tmp_path):
    ids = [f"k{i:03d}" for i in range(23)]
    vecs = np.random.default_rng(0).standard_normal((23, 6)).astype(np.float32)
    for dtype in ("float16", "bfloat16", "float32"):
        out = tmp_path / dtype
        write_store(out, ids, vecs, identity={"base_model": "x", "dim": 6}, dtype=dtype, shard_size=10)
        m = json.loads((out / "manifest.json").read_text())
        assert [s["rows"] for s in m["shards"]] == [10, 10, 3]
        parts = [np.load(out / s["file"]) for s in m["shards"]]
        for s in m["shards"]:
            assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        arr = np.concatenate(parts)
        if dtype == "bfloat16":  # raw bits as uint16, viewable by torch
            arr = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float().numpy()
            expect = torch.from_numpy(vecs).bfloat16().float().numpy()
        else:
            expect = vecs.astype(dtype)
        np.testing.assert_array_equal(arr, expect)
        keys, rows = np.load(out / "ids.npy"), np.load(out / "id_rows.npy")
        assert list(keys) == sorted(k.encode() for k in ids) and rows.dtype == np.int64
        assert (out / "SHA256SUMS").read_text().count("\n") == 5


def test_bytes_per_caption_half_of_fp32(tmp_path):
    ids = [f"{i:07d}" for i in range(500)]
    vecs = np.random.default_rng(0).standard_normal((500, 576)).astype(np.float32)
    s16 = write_store(tmp_path / "a", ids, vecs, identity={}, dtype="float16", shard_size=128)
    s32 = write_store(tmp_path / "b", ids, vecs, identity={}, dtype="float32", shard_size=128)
    assert s16.disk_bytes() < 0.52 * s32.disk_bytes()


# ------------------------------------------------------------------------------------- reader
@pytest.fixture()
def rand_store(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"id-{i}-é" for i in range(101)]  # non-ASCII ids, not in sorted order of rows
    rng.shuffle(ids)
    vecs = rng.standard_normal((101, 5)).astype(np.float32)
    return write_store(tmp_path / "s", ids, vecs, identity={"base_model": "m", "dim": 5}, dtype="float32",
                       shard_size=7), ids, vecs


def test_random_access_by_row_and_id(rand_store):
    store, ids, vecs = rand_store
    rows = np.random.default_rng(2).integers(0, 101, 300)
    np.testing.assert_array_equal(store.get_rows(rows), vecs[rows])
    pick = [ids[r] for r in rows[:50]]
    np.testing.assert_array_equal(store.get_by_ids(pick), vecs[rows[:50]])
    assert store.row_of(ids[42]) == 42 and ids[42] in store and "nope" not in store
    assert store.get_rows([]).shape == (0, 5)
    assert len(store) == 101 and store.dim == 5


def test_missing_id_and_bad_row(rand_store):
    store, ids, _ = rand_store
    with pytest.raises(StoreError, match=r"2 caption id\(s\) not in the store: 'ghost', '" + "x" * 40):
        store.get_by_ids([ids[0], "ghost", "x" * 40])
    with pytest.raises(StoreError, match="row 101 out of range"):
        store.get_rows([0, 101])
    with pytest.raises(TypeError):
        store.get_by_ids("id-1-é")


def test_pickles_without_memory_maps_and_works_in_loader_workers(rand_store):
    store, ids, vecs = rand_store
    store.get_by_ids(ids[:3])  # opens memory maps in this process
    blob = pickle.dumps(store)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert clone._keys is None and all(s is None for s in clone._shards)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return torch.from_numpy(store.get_by_ids([ids[i]])[0])

    loader = torch.utils.data.DataLoader(DS(), batch_size=16, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, vecs)


def test_identity_and_dimension_checks(rand_store):
    store, _, _ = rand_store
    store.check_identity({"base_model": "m", "dim": 5})
    with pytest.raises(IdentityMismatchError) as err:
        FeatureStore.open(store.path, identity={"base_model": "other", "dim": 5, "pooling": "mean"})
    assert "base_model, pooling" in str(err.value) and "'other'" in str(err.value)
    with pytest.raises(StoreError, match="5-d, expected 7-d"):
        FeatureStore.open(store.path, dim=7)


def test_verify_detects_corruption_and_open_detects_truncation(rand_store):
    store, _, _ = rand_store
    assert store.verify()["rows"] == 101
    shard = store.path / "shard-00003.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00003.npy: checksum mismatch"):
        FeatureStore.open(store.path).verify()
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(StoreError, match="shard-00003.npy: .* bytes, the manifest says"):
        FeatureStore.open(store.path)
    shard.unlink()
    with pytest.raises(StoreError, match="shard-00003.npy: file missing"):
        FeatureStore.open(store.path)


def test_open_refuses_incomplete_and_foreign_dirs(tmp_path, rand_store):
    with pytest.raises(StoreError, match="not found"):
        FeatureStore.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path / "empty")
    store, _, _ = rand_store
    (store.path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="incomplete store"):
        FeatureStore.open(store.path)
    (store.path / "manifest.json").write_text('{"format": "llm2clip-feature-store", "version": 1')
    with pytest.raises(StoreError, match="manifest.json: unreadable manifest"):
        FeatureStore.open(store.path)
    (store.path / "manifest.json").write_text(json.dumps({
        "format": "llm2clip-feature-store", "version": 1, "identity": {}, "dim": 5, "dtype": "float32",
        "rows": 3, "ids": 3, "shard_size": 7, "shards": [{"rows": 3}], "keys": {}}))
    with pytest.raises(StoreError, match="manifest.json: malformed manifest"):
        FeatureStore.open(store.path)


def test_fp16_overflow_and_nan_are_refused(tmp_path):
    with pytest.raises(StoreError, match="overflow float16; use dtype bfloat16"):
        write_store(tmp_path / "a", ["x"], np.full((1, 4), 1e6, np.float32), identity={})
    with pytest.raises(StoreError, match="NaN"):
        write_store(tmp_path / "b", ["x"], np.full((1, 4), np.nan, np.float32), identity={}, dtype="float32")
    assert not (tmp_path / "a" / "manifest.json").exists()


# ------------------------------------------------------------------------------- caption input
def test_builtin_cupl_ids():
    from llm2clip.data.captions import cupl_caption_set
    from llm2clip.features.extract import BuiltinSource

    caps = read_captions([BuiltinSource(builtin="cupl-heldout", classes=3, per_class=4)])
    ref = cupl_caption_set("heldout", 3, 4)
    assert len(caps.ids) == 12
    assert caps.ids[:4] == [f"{ref.groups[0]}/{n}" for n in range(4)]
    assert [caps.texts[r] for r in caps.id_rows] == ref.captions


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "caption": "x"}\n{"id": "b", "caption": "  "}\n', r"caps.jsonl:2: empty caption"),
    ('{"id": "a", "caption": 5}\n', r"caps.jsonl:1: the caption must be a string, got int"),
    ('{"id": "a", "caption": "one"}\n\n{"id": "a", "caption": "two"}\n',
     r"caps.jsonl:3: id 'a' was given at .*caps.jsonl:1 with a different caption"),
    ('{"id": "a", "caption": "x"}\n{"id": "b", "capt\n', r"caps.jsonl:2: not valid JSON"),
    ('{"id": "a"}\n', r"caps.jsonl:1: field 'caption' missing"),
    ('["a", "x"]\n', r"caps.jsonl:1: expected a JSON object"),
    ('{"id": true, "caption": "x"}\n', r"caps.jsonl:1: the id must be a string or an integer"),
    ('{"id": "", "caption": "x"}\n', r"caps.jsonl:1: empty id"),
    ("", r"no captions in"),
])
def test_bad_jsonl_input_names_file_and_line(tmp_path, content, message):
    from llm2clip.features.extract import FileSource

    (tmp_path / "caps.jsonl").write_text(content)
    with pytest.raises(InputError, match=message):
        read_captions([FileSource(path=str(tmp_path / "caps.jsonl"))])


def test_bad_bytes_and_csv_input(tmp_path):
    from llm2clip.features.extract import FileSource

    (tmp_path / "bad.jsonl").write_bytes(b'{"id": "a", "caption": "x"}\n{"id": "b", "caption": "\xff"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not UTF-8"):
        read_captions([FileSource(path=str(tmp_path / "bad.jsonl"))])
    (tmp_path / "c.csv").write_text('key,text\n1,"a dog, running"\n2,"a\nlong cat"\n3,\n')
    with pytest.raises(InputError, match=r"c.csv:1: the header has no column 'id'"):
        read_captions([FileSource(path=str(tmp_path / "c.csv"))])
    with pytest.raises(InputError, match=r"c.csv:5: empty caption"):
        read_captions([FileSource(path=str(tmp_path / "c.csv"), id_field="key", caption_field="text")])
    (tmp_path / "d.tsv").write_text("id\tcaption\nx\ta cat\ny\ta dog\n")
    caps = read_captions([FileSource(path=str(tmp_path / "d.tsv"))])
    assert caps.ids == ["x", "y"] and caps.texts == ["a cat", "a dog"]
    with pytest.raises(InputError, match="missing.jsonl: caption file not found"):
        read_captions([FileSource(path=str(tmp_path / "missing.jsonl"))])
    (tmp_path / "e.txt").write_text("x")
    with pytest.raises(InputError, match="cannot tell the format"):
        read_captions([FileSource(path=str(tmp_path / "e.txt"))])


def test_config_errors_name_file_line_and_field(tmp_path):
    cfg = tmp_path / "embed.yaml"
    cfg.write_text("encoder: {kind: random, dim: 8}\ncaptions: [cupl-heldout]\nout: s\ndtype: float8\n"
                   "shard_sise: 10\n")
    with pytest.raises(ConfigError) as err:
        load_embed_config(cfg)
    msg = str(err.value)
    assert f"{cfg}:4: dtype" in msg and f"{cfg}:5: shard_sise" in msg
    cfg.write_text("encoder: {kind: random}\ncaptions: []\nout: s\n")
    with pytest.raises(ConfigError, match=r"embed.yaml:2: captions"):
        load_embed_config(cfg)


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "job"
    sub.mkdir()
    write_jsonl(sub / "caps.jsonl", make_captions(12))
    write_config(sub / "embed.yaml", encoder={"kind": "random", "dim": 4}, captions=["caps.jsonl"],
                 out="out/store", shard_size=5)
    monkeypatch.chdir(tmp_path)
    cfg = load_embed_config("job/embed.yaml")
    assert Path(cfg.out) == sub / "out" / "store" and Path(cfg.captions[0].path) == sub / "caps.jsonl"
    store = FeatureStore.open(run_embedding(cfg, progress=False))
    assert store.num_ids == 12


# ------------------------------------------------------------------------------- job lifecycle
def test_rerun_of_finished_store_is_a_noop_and_other_jobs_are_refused(tmp_path, caps_file):
    enc = RandomEncoderConfig(dim=4)
    cfg = embed_cfg(tmp_path, caps_file, enc)
    out = run_embedding(cfg)
    before = dir_bytes(out)
    counting = CountingEncoder(__import__("llm2clip.text", fromlist=["x"]).build_text_encoder(enc))
    run_embedding(cfg, encoder=counting)
    assert counting.seen == [] and dir_bytes(out) == before
    with pytest.raises(StoreError, match=r"dtype 'float16' -> 'float32'"):
        run_embedding(embed_cfg(tmp_path, caps_file, enc, dtype="float32"))
    with pytest.raises(IdentityMismatchError, match="differing fields: seed"):
        run_embedding(embed_cfg(tmp_path, caps_file, RandomEncoderConfig(dim=4, seed=1)))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and not a store"):
        run_embedding(embed_cfg(tmp_path, caps_file, enc, out=str(tmp_path / "other")))


def test_resume_refuses_changed_captions(tmp_path, caps_file):
    from llm2clip.text import build_text_encoder

    enc = RandomEncoderConfig(dim=4)
    cfg = embed_cfg(tmp_path, caps_file, enc)

    class Failing(CountingEncoder):
        def encode(self, captions, batch_size=None, progress=None):
            if self.seen:
                raise RuntimeError("boom")
            return super().encode(captions, batch_size, progress)

    with pytest.raises(RuntimeError, match="boom"):
        run_embedding(cfg, encoder=Failing(build_text_encoder(enc)))
    out = Path(cfg.out)
    assert (out / "shard-00000.npy").exists() and not (out / "manifest.json").exists()
    write_jsonl(caps_file, make_captions(53, seed=1))
    with pytest.raises(StoreError, match="other settings or captions .*captions_sha256"):
        run_embedding(cfg)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    mode, config = sys.argv[1], sys.argv[2]
    real_replace = os.replace
    calls = {"npy": 0, "sha256": 0}

    def replace(src, dst):
        kind = str(dst).rsplit(".", 1)[-1]
        if kind in calls:
            calls[kind] += 1
            # die with the third shard written but not renamed, or the second sidecar not renamed
            if (mode, kind, calls[kind]) in {("before-rename", "npy", 3), ("before-sidecar", "sha256", 2)}:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
    import llm2clip.features.extract as ex
    if mode == "external":  # slow enough that the test's kill lands mid-job, whatever the machine's load
        encode_shard, n = ex._encode_shard, [0]

        def slow(*a, **k):
            n[0] += 1
            time.sleep(0.2 if n[0] < 3 else 600)
            return encode_shard(*a, **k)

        ex._encode_shard = slow
    ex.run_embedding(ex.load_embed_config(config), progress=False)
""")


@pytest.mark.parametrize("mode", ["external", pytest.param("before-rename", marks=pytest.mark.slow),
                                  pytest.param("before-sidecar", marks=pytest.mark.slow)])
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, caps_file, tiny_cfg, tiny_encoder, mode):
    ref = run_embedding(embed_cfg(tmp_path, caps_file, tiny_cfg, out=str(tmp_path / "ref")), encoder=tiny_encoder)
    cfg_path = write_config(tmp_path / "embed.yaml", encoder=tiny_cfg.model_dump(), captions=[str(caps_file)],
                            out="killed", shard_size=10, progress=False)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), mode, str(cfg_path)], env=subprocess_env())
    out = tmp_path / "killed"
    try:
        if mode == "external":
            deadline = time.time() + 120
            while not (out / "shard-00000.npy").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists() and (out / "shard-00000.npy").exists()
    with pytest.raises(StoreError, match="incomplete store"):
        FeatureStore.open(out)
    if mode == "before-rename":
        assert any(".tmp-" in p.name for p in out.iterdir())
    run_embedding(load_embed_config(cfg_path), encoder=tiny_encoder)
    assert dir_bytes(out) == dir_bytes(ref)
    FeatureStore.open(out).verify()


@pytest.mark.slow
def test_two_processes_give_the_same_store_as_one(tmp_path, caps_file, tiny_cfg):
    unique = len({c for _, c in make_captions(53)})
    size = -(-unique // 5)  # 5 shards: 3 on rank 0, 2 on rank 1
    cfg_path = write_config(tmp_path / "embed.yaml", encoder=tiny_cfg.model_dump(), captions=[str(caps_file)],
                            out="one", shard_size=size, progress=False)
    env = subprocess_env(threads=1)
    cli = ["-m", "llm2clip.features.cli", "embed", str(cfg_path), "--no-progress"]
    one = subprocess.run([sys.executable, *cli], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cli,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "terminate called" not in two.stderr
    assert dir_bytes(tmp_path / "two") == dir_bytes(tmp_path / "one")
    assert len(FeatureStore.open(tmp_path / "two").manifest["shards"]) == 5


# ------------------------------------------------------------------------------------------ CLI
def test_cli_embed_info_verify(tmp_path, caps_file, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    for argv in (["embed", "-h"], ["features", "verify", "-h"], ["features", "info", "-h"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert "torchrun" in capsys.readouterr().out
    cfg = write_config(tmp_path / "e.yaml", encoder={"kind": "random", "dim": 8}, captions=[str(caps_file)],
                       out="st", shard_size=16)
    args = parser.parse_args(["embed", str(cfg), "--no-progress"])
    assert args.func(args) == 0
    store_dir = tmp_path / "st"
    assert features_main(["features", "info", str(store_dir)]) == 0
    assert "53 ids -> " in capsys.readouterr().out
    assert features_main(["features", "verify", str(store_dir)]) == 0
    ident = tmp_path / "ident.json"
    ident.write_text(json.dumps({"base_model": "random", "seed": 0, "dim": 9}))
    assert features_main(["features", "verify", str(store_dir), "--identity", str(ident)]) == 2
    assert "differing fields: dim" in capsys.readouterr().err
    with open(store_dir / "shard-00001.npy", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    assert features_main(["features", "verify", str(store_dir)]) == 2
    assert "shard-00001.npy: checksum mismatch" in capsys.readouterr().err
    assert features_main(["embed", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
