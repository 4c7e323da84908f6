"""Stage 2 at scale: webdataset shards (writer, stream, resume, bad samples) and FSDP."""

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from stage2_helpers import (
    CrashAt,
    SimulatedCrash,
    assert_same_tensors,
    fit_worker_resumable,
    free_port,
    model_weights,
    run_cfg,
    tiny_run_config,
    write_scene_manifest,
)

from llm2clip.data.images import InMemoryFeatures, load_image_file, load_manifest
from llm2clip.data.shards import ShardStream, expand_shards, index_shard, write_shards
from llm2clip.errors import ConfigError, InputError
from llm2clip.train.loop import fit

_cfg, _weights, _same = run_cfg, model_weights, assert_same_tensors


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _scene_shards(tmp_path, count, per_shard):
    manifest = write_scene_manifest(tmp_path / "images", count)
    write_shards(load_manifest(manifest), tmp_path / "shards", per_shard=per_shard, progress=False)
    return manifest, tmp_path / "shards"


def test_write_shards_atomic_resumable_deterministic_and_webdataset_readable(tmp_path):
    import webdataset as wds

    records = load_manifest(write_scene_manifest(tmp_path / "images", 10))
    out = write_shards(records, tmp_path / "a", per_shard=4, progress=False)
    assert [s["nsamples"] for s in out["shards"]] == [4, 4, 2] and out["samples"] == 10 and out["left_out"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "images"]  # no partial folder left
    # The webdataset package reads them, with the manifest's captions in the json.
    samples = list(wds.WebDataset(str(tmp_path / "a" / "train-{000000..000002}.tar"), shardshuffle=False))
    assert len(samples) == 10 and all(set(s) >= {"png", "json"} for s in samples)
    first = json.loads(samples[0]["json"])
    assert {c["id"] for c in first["captions"]} == {c.id for cs in records[0].captions.values() for c in cs}
    assert expand_shards(str(tmp_path / "a")) == expand_shards(str(tmp_path / "a/train-{000000..000002}.tar"))

    with pytest.raises(InputError, match="exists"):
        write_shards(records, tmp_path / "a", per_shard=4, progress=False)

    # Killed after the first shard: a rerun keeps it and ends with the same bytes as one clean run.
    def dies_at_6(path):
        if path.endswith("scene0006.png"):
            raise KeyboardInterrupt
        return load_image_file(path)

    with pytest.raises(KeyboardInterrupt):
        write_shards(records, tmp_path / "b", per_shard=4, load_image=dies_at_6, progress=False)
    assert not (tmp_path / "b").exists() and (tmp_path / ".b.partial" / "train-000000.tar").is_file()
    write_shards(records, tmp_path / "b", per_shard=4, load_image=load_image_file, progress=False)
    write_shards(records, tmp_path / "c", per_shard=4, load_image=load_image_file, progress=False)
    assert _digests(tmp_path / "b") == _digests(tmp_path / "c")

    # The CLI writes the same shards as the function (files copied byte for byte).
    from llm2clip.data.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["shards", str(tmp_path / "images" / "manifest.jsonl"), "--out", str(tmp_path / "d"),
                              "--per-shard", "4", "--no-progress"])
    assert args.func(args) == 0
    assert _digests(tmp_path / "d") == _digests(tmp_path / "a")


def _index_features(records):
    """Caption id -> [record index, 0]: a batch's texts name the records it holds."""
    vecs = {}
    for i, r in enumerate(records):
        for cs in r.captions.values():
            for c in cs:
                vecs[c.id] = np.array([i, 0], np.float32)
    return InMemoryFeatures(vecs)


def _record_ids(batches):
    return [[int(v) for v in b[1][:, 0]] for b in batches]


def test_stream_splits_ranks_and_workers_deterministically(tmp_path):
    manifest, shards = _scene_shards(tmp_path, 16, per_shard=4)
    feats = _index_features(load_manifest(manifest))
    paths = expand_shards(str(shards))

    def batches(rank, world, workers=0, start=None, n=4):
        s = ShardStream(paths, 4, world, rank, 0, None, {"dense": 1.0}, feats, None, shuffle_shards=2, start=start,
                        num_batches=n)
        s.transform = lambda im: torch.zeros(1)
        return list(torch.utils.data.DataLoader(s, batch_size=None, num_workers=workers))

    r0, r1 = batches(0, 2), batches(1, 2)
    epoch0 = sum(_record_ids(r0[:2]) + _record_ids(r1[:2]), [])  # each rank holds 8 samples per epoch
    assert sorted(epoch0) == list(range(16))
    assert [b[3] for b in r0] == [{"epoch": 0, "group": 0, "offset": 4}, {"epoch": 0, "group": 0, "offset": 8},
                                  {"epoch": 1, "group": 0, "offset": 4}, {"epoch": 1, "group": 0, "offset": 8}]
    assert _record_ids(r0[2:]) != _record_ids(r0[:2])  # a new order each epoch
    assert _record_ids(batches(0, 2, workers=2)) == _record_ids(r0)
    assert _record_ids(batches(0, 2, start=r0[1][3], n=2)) == _record_ids(r0[2:])
    with pytest.raises(ConfigError, match="at least one shard"):
        ShardStream(paths[:1], 4, 2, 0, features=feats)


def test_webdataset_run_equals_manifest_run(tmp_path):
    """One batch = the whole set, so both sources contrast the same samples each step, in other orders."""
    manifest, shards = _scene_shards(tmp_path, 16, per_shard=4)
    common = dict(train__batch_size=16, train__steps=3, data__caption_kinds={"dense": 1.0}, optim__grad_clip=None)
    man = {"kind": "manifest", "path": str(manifest)}
    wds = {"kind": "webdataset", "shards": str(shards / "train-{000000..000003}.tar")}
    a = fit(_cfg(tmp_path / "man", data__train=man, data__val=man, **common), progress=False)
    b = fit(_cfg(tmp_path / "wds", data__train=wds, data__val=wds, **common), progress=False)
    la, lb = _losses(tmp_path / "man"), _losses(tmp_path / "wds")
    assert la.keys() == lb.keys() == {1, 2, 3}
    assert all(abs(la[s] - lb[s]) < 1e-5 for s in la)
    _same(_weights(tmp_path / "man"), _weights(tmp_path / "wds"), atol=1e-5)
    assert a["eval"] == pytest.approx(b["eval"], abs=1e-6) and b["eval"]["n"] == 16


def test_corrupt_image_in_a_shard_is_skipped_and_counted(tmp_path):
    _, shards = _scene_shards(tmp_path, 10, per_shard=5)
    # `shards` packs only images that decode: damage one inside a written shard instead
    tar = expand_shards(str(shards))[0]
    off, size = dict(index_shard(tar))["000000003"]["png"]
    with open(tar, "r+b") as f:
        f.seek(off)
        f.write(b"\0" * size)
    src = {"kind": "webdataset", "shards": str(shards)}
    over = dict(data__train=src, data__val=None, data__caption_kinds={"short": 1.0}, train__steps=3)
    last = fit(_cfg(tmp_path / "ok", data__max_bad_fraction=0.5, **over), progress=False)
    assert last["skipped_images"] >= 2  # 24 samples drawn: epochs 0 and 1 each hold the bad one
    with pytest.raises(InputError, match="could not be read"):
        fit(_cfg(tmp_path / "strict", data__max_bad_fraction=0.0, **over), progress=False)


def test_webdataset_resume_equals_uninterrupted(tmp_path):
    _, shards = _scene_shards(tmp_path, 24, per_shard=8)
    src = {"kind": "webdataset", "shards": str(shards), "shuffle_shards": 2}
    over = dict(data__train=src, data__val=None, data__augment="crop", train__steps=6, train__checkpoint_every=3)
    fit(_cfg(tmp_path / "a", **over), progress=False)
    with pytest.raises(SimulatedCrash):
        fit(_cfg(tmp_path / "b", **over), progress=False, callbacks=[CrashAt(5)])
    fit(_cfg(tmp_path / "b", data__workers=2, **over), resume=True, progress=False)  # workers: the same batches
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    sa = torch.load(tmp_path / "a/checkpoints/step_00000006/train_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "b/checkpoints/step_00000006/train_state.pt", weights_only=False)
    # 48 samples drawn = 2 epochs of 24 (groups of 2 shards: 16 + 8 samples)
    assert sa["data"] == sb["data"] and sa["data"]["positions"] == [{"epoch": 1, "group": 1, "offset": 8}]
    sa["data"]["positions"] *= 2  # as if saved by two processes
    torch.save(sa, tmp_path / "a/checkpoints/step_00000006/train_state.pt")
    with pytest.raises(ConfigError, match="resume a webdataset run with that many"):
        fit(_cfg(tmp_path / "a", **{**over, "train__steps": 7}), resume=True, progress=False)


def test_fsdp_config_rules():
    with pytest.raises(ConfigError, match="fsdp runs with precision fp32 or bf16"):
        _cfg("x", train__strategy="fsdp", train__precision="fp16")
    assert _cfg("x", train__strategy="fsdp").train.strategy == "fsdp"


@pytest.mark.slow
def test_fsdp_two_processes_on_shards_match_one_and_resume(tmp_path):
    """2 gloo ranks with FSDP, each streaming its own 2 of 4 shards, against 1 process on all 4: a step's
    global batch (2 accumulated micro-batches per rank) is the whole set either way; clipping is active.
    The FSDP run is killed after step 3 and resumed from its step-2 checkpoint; that checkpoint also
    resumes in a single process like the single process's own."""
    _, shards = _scene_shards(tmp_path, 16, per_shard=4)
    src = {"kind": "webdataset", "shards": str(shards)}
    over = dict(data__train=src, data__val=src, data__caption_kinds={"dense": 1.0}, train__batch_size=16,
                train__steps=4, train__accum_steps=2, train__checkpoint_every=2, train__eval_every=2,
                optim__grad_clip=0.5)
    fit(_cfg(tmp_path / "one", **over), progress=False)
    cfg2 = tiny_run_config(tmp_path / "fsdp", train__strategy="fsdp", **over)
    mp.spawn(fit_worker_resumable, args=(2, free_port(), cfg2, None, 3), nprocs=2, join=True)
    assert [p.name for p in (tmp_path / "fsdp/checkpoints").iterdir()] == ["step_00000002"]
    mp.spawn(fit_worker_resumable, args=(2, free_port(), cfg2, True), nprocs=2, join=True)
    _same(_weights(tmp_path / "one"), _weights(tmp_path / "fsdp"), atol=1e-5)
    # (metrics.jsonl of a multi-process run logs rank 0's local loss, so losses are not compared; evals are)
    ea = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    eb = [json.loads(x) for x in (tmp_path / "fsdp/metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [r["step"] for r in eb] == [2, 4] and eb[-1]["eval"] == pytest.approx(ea[-1]["eval"], abs=1e-6)
    # The FSDP checkpoint is sharded (each rank's shard in dcp/); its weights are the single process's.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "fsdp/checkpoints/step_00000004/dcp", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    from safetensors.torch import load_file

    _same(load_file(str(tmp_path / "one/checkpoints/step_00000004/model.safetensors")), full["model"], atol=1e-5)
    oa = torch.load(tmp_path / "one/checkpoints/step_00000004/train_state.pt", weights_only=True)["optimizer"]
    assert len(oa["state"]) == len(full["optim"]["state"])
    # A single process resumes it as it resumes its own. (A shard stream cannot change its number of
    # ranks, which the resume says, so these resumes train on scenes.)
    with pytest.raises(ConfigError, match=r"saved by 2 process\(es\) and this run has 1"):
        fit(_cfg(tmp_path / "fsdp", **{**over, "train__steps": 5}), resume=True, progress=False)
    scenes = {**over, "data__train": {"kind": "scenes", "count": 16, "render_size": 16}, "data__val": None,
              "train__steps": 3}
    for run in ("one", "fsdp"):
        fit(_cfg(tmp_path / f"from-{run}", **scenes), resume=str(tmp_path / run / "checkpoints/step_00000002"),
            progress=False)
    _same(_weights(tmp_path / "from-one"), _weights(tmp_path / "from-fsdp"), atol=1e-5)
