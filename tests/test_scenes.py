"""Generated scenes, Fashion-MNIST records, manifests, the pair dataset and the step sampler."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip.data import fashion_mnist as fm
from llm2clip.data.images import (
    BagOfWordsConfig,
    BagOfWordsEncoder,
    Caption,
    InMemoryFeatures,
    PairDataset,
    Record,
    StepBatchSampler,
    collate,
    encode_captions,
    load_image_file,
    load_manifest,
)
from llm2clip.data.scenes import COLOURS, SceneSet, make_scene
from llm2clip.errors import InputError
from llm2clip.vision import build_transform


def test_scenes_are_deterministic_and_differ():
    a, b = SceneSet(50, seed=3), SceneSet(50, seed=3)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert np.array_equal(np.asarray(a.image(7)), np.asarray(b.image(7)))
    assert make_scene(3, 0) != make_scene(4, 0)
    assert len({a[i].dense_caption() for i in range(50)}) == 50


def test_captions_short_and_dense():
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    s = SceneSet(200)
    over77 = 0
    for i in range(200):
        sc = s[i]
        short, dense = sc.short_caption(), sc.dense_caption()
        assert "." not in short and len(short.split()) <= 10  # one clause
        assert 40 <= len(dense.split()) <= 150
        for o in sc.objects:  # every object, with its attributes and place
            assert f"{o.name}" in dense and f"In {o.place} there is a {o.name}." in dense
        over77 += len(tok.encode(dense)) + 2 > 77
    assert over77 / 200 > 0.5  # most dense captions do not fit a CLIP text encoder


def test_render_draws_the_objects():
    sc = SceneSet(1, render_size=48)
    im = np.asarray(sc.image(0)).reshape(-1, 3).astype(int)
    for o in sc[0].objects:
        d = np.abs(im - np.array(COLOURS[o.colour])).sum(1)
        assert (d < 60).sum() > 4, o  # some pixels carry the object's colour


def write_fake_fashion_mnist(root, n=12):
    """idx.gz files in the Debian package's layout, with random pixels."""
    rng = np.random.default_rng(0)
    for img_f, lab_f in fm.FILES.values():
        imgs = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        with gzip.open(root / img_f, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", n, 28, 28) + imgs.tobytes())
        with gzip.open(root / lab_f, "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", n) + (np.arange(n, dtype=np.uint8) % 10).tobytes())


def test_fashion_mnist_idx_reader_and_records(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    assert fm.available(tmp_path) and not fm.available(tmp_path / "none")
    x, y = fm.load("train", tmp_path)
    assert x.shape == (12, 28, 28) and list(y[:3]) == [0, 1, 2]
    ds = fm.FashionMnist("test", 5, tmp_path, per_class=3)
    assert len(ds.records) == 5 and ds.image(0).size == (28, 28)
    assert ds.records[0].captions["short"][0].text == "a photo of a T-shirt/top"
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))
    with pytest.raises(InputError, match="expected 5"):
        fm.read_idx(tmp_path / "bad.gz")


@pytest.mark.skipif(not fm.available(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = fm.FashionMnist("test", 100)
    assert len(ds.records) == 100 and "dense" in ds.records[0].captions


def _images(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (20, 20), (i * 20 % 255, 0, 0)).save(p)
        paths.append(p)
    return paths


def test_manifest_jsonl_and_csv(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "im0.png", "captions": [{"id": "a", "kind": "short", "text": "x"},
                                                      {"id": "b", "kind": "dense"}]}) + "\n"
        + json.dumps({"image": "im1.png", "captions": [{"id": "c", "kind": "short"}]}) + "\n")
    recs = load_manifest(tmp_path / "m.jsonl")
    assert len(recs) == 2 and recs[0].image == str(tmp_path / "im0.png")
    assert recs[0].captions["short"][0].text == "x" and recs[0].captions["dense"][0].id == "b"
    rows = ["image,caption_id,kind,text", "im0.png,a,short,x", "im0.png,b,dense,", "im1.png,c,short,y"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    recs2 = load_manifest(tmp_path / "m.csv")
    assert [len(r.captions) for r in recs2] == [2, 1] and recs2[1].captions["short"][0].text == "y"
    (tmp_path / "bad.jsonl").write_text('{"image": "im0.png", "captions": []}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("image,kind\nim0.png,short\n")
    with pytest.raises(InputError, match="caption_id"):
        load_manifest(tmp_path / "bad.csv")


def _dataset(recs, kinds, feats=None, loader=None, seed=0):
    tf = build_transform(16, (0.5,) * 3, (0.5,) * 3)
    return PairDataset(recs, loader or (lambda i: Image.new("RGB", (16, 16))), tf, kinds, seed, features=feats)


def test_caption_kind_probability_is_seeded():
    recs = [Record(i, {"short": [Caption(f"s{i}")], "dense": [Caption(f"d{i}")]}) for i in range(400)]
    feats = InMemoryFeatures({c.id: np.full(3, j, np.float32) for j, c in
                              enumerate(c for r in recs for v in r.captions.values() for c in v)})
    ds = _dataset(recs, {"short": 0.5, "dense": 0.5}, feats)
    kinds = [ds.choose_caption(i, 0).id[0] for i in range(400)]
    assert 0.4 < kinds.count("d") / 400 < 0.6
    assert kinds == [_dataset(recs, {"short": 0.5, "dense": 0.5}, feats).choose_caption(i, 0).id[0] for i in range(400)]
    assert kinds != [ds.choose_caption(i, 1).id[0] for i in range(400)]  # another epoch, other choices
    ds9 = _dataset(recs, {"short": 0.1, "dense": 0.9}, feats)
    assert [ds9.choose_caption(i, 0).id[0] for i in range(400)].count("d") > 320
    only = _dataset(recs, {"dense": 1.0}, feats)
    assert all(only.choose_caption(i, 0).id[0] == "d" for i in range(50))
    img, text, skipped = ds[(3, 0)]
    assert img.shape == (3, 16, 16) and text.shape == (3,) and skipped == 0
    with pytest.raises(InputError, match="caption kinds"):
        _dataset(recs, {"long": 1.0}, feats)


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    paths = _images(tmp_path, 4)
    paths[1].write_bytes(b"not a png")
    recs = [Record(str(p), {"short": [Caption(f"c{i}")]}) for i, p in enumerate(paths)]
    recs.append(Record(str(tmp_path / "missing.png"), {"short": [Caption("c4")]}))
    feats = InMemoryFeatures({f"c{i}": np.full(2, i, np.float32) for i in range(5)})
    ds = _dataset(recs, {"short": 1.0}, feats, load_image_file)
    img, text, skipped = ds[(1, 0)]
    assert skipped == 1 and text[0] == 2  # record 2 stands in
    assert ds[(4, 0)][2] == 1  # wraps to record 0
    batch = collate([ds[(i, 0)] for i in range(5)])
    assert batch[0].shape[0] == 5 and batch[2] == 2


def test_image_cache_gives_the_same_samples_and_decodes_once(tmp_path):
    paths = _images(tmp_path, 4)
    recs = [Record(str(p), {"short": [Caption(f"c{i}")]}) for i, p in enumerate(paths)]
    feats = InMemoryFeatures({f"c{i}": np.full(2, i, np.float32) for i in range(4)})
    opened = []

    def loader(p):
        opened.append(p)
        return load_image_file(p)

    tf = build_transform(16, (0.5,) * 3, (0.5,) * 3, train=True)
    plain = PairDataset(recs, load_image_file, tf, {"short": 1.0}, 0, features=feats)
    cached = PairDataset(recs, loader, tf, {"short": 1.0}, 0, features=feats, cache_images=True)
    for epoch in range(3):
        a, b = collate([plain[(i, epoch)] for i in range(4)]), collate([cached[(i, epoch)] for i in range(4)])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(opened) == 4  # each image decoded and transformed once


def test_in_memory_features_and_encoder():
    enc = BagOfWordsEncoder(BagOfWordsConfig(dim=16))
    feats = encode_captions({"a": "a red circle", "b": "a blue circle"}, enc)
    assert feats.dim == 16 and len(feats) == 2 and feats.identity["base_model"] == "bag-of-words"
    assert feats.get_by_ids(["b", "a"]).shape == (2, 16)
    with pytest.raises(InputError, match="'z'"):
        feats.get_by_ids(["z"])
    v = enc.encode(["red circle left of blue square", "blue circle left of red square"])
    assert not torch.allclose(v[0], v[1])  # word pairs bind attributes


def test_step_sampler_resume_and_ranks():
    full = list(StepBatchSampler(20, 8, seed=1, total_steps=6))
    assert len(full) == 6 and all(len(b) == 8 for b in full)
    assert list(StepBatchSampler(20, 8, seed=1, start_step=4, total_steps=6)) == full[4:]
    assert full[2][0][1] == 1  # 2 steps per epoch: step 2 is in epoch 1
    r0 = list(StepBatchSampler(20, 8, world=2, rank=0, seed=1, total_steps=6))
    r1 = list(StepBatchSampler(20, 8, world=2, rank=1, seed=1, total_steps=6))
    assert all(a + b == f for a, b, f in zip(r0, r1, full))
    acc = list(StepBatchSampler(20, 8, world=2, rank=1, accum=2, seed=1, total_steps=6))
    assert len(acc) == 12 and all(len(b) == 2 for b in acc)
    with pytest.raises(InputError, match="divisible"):
        StepBatchSampler(20, 6, world=4)
