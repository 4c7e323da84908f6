"""The inference API (llm2clip.load): text/image encoding equal to the stage-2 training path, caption-encoder
rebuilding from the model manifest, identity checks, dtypes and input errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stage2_helpers import tiny_run_config
from tiny import make_tiny_llm

import llm2clip
from llm2clip.config import parse_config
from llm2clip.data.images import PairDataset
from llm2clip.errors import ConfigError, InputError
from llm2clip.model import LLM2CLIP
from llm2clip.train.config import RunConfig
from llm2clip.train.loop import build_features, build_source, fit
from llm2clip.vision import build_transform

ROOT = Path(__file__).resolve().parents[1]


def _train(run_dir: Path, **over) -> RunConfig:
    cfg = parse_config(tiny_run_config(run_dir, train__steps=2, data__val=None, **over), RunConfig)
    fit(cfg, progress=False)
    return cfg


def _training_pairs(cfg: RunConfig, n: int = 12):
    """(image tensors, stored caption embeddings, caption texts) exactly as stage 2 feeds them."""
    records, load_image = build_source(cfg.data.train)
    features = build_features(cfg, [records])
    model = LLM2CLIP.load(Path(cfg.run_dir) / "model")
    v = model.visual
    tf = build_transform(v.image_size, v.mean, v.std, train=True, augment=cfg.data.augment)
    ds = PairDataset(records, load_image, tf, cfg.data.caption_kinds, cfg.seed, features)
    imgs, embs, texts = [], [], []
    for i in range(n):
        img, emb, skipped = ds[i]
        assert skipped == 0
        imgs.append(img)
        embs.append(emb)
        texts.append(ds.choose_caption(i, 0).text)
    return model, torch.stack(imgs), torch.stack(embs), texts, records, load_image


@pytest.fixture(scope="module")
def bow_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("bow") / "run"
    return _train(run)


def test_encode_text_and_image_equal_the_training_path_bow(bow_run):
    manifest = json.loads((Path(bow_run.run_dir) / "model" / "llm2clip_model.json").read_text())
    assert manifest["caption_encoder"] == {"kind": "bow", "dim": 24, "seed": 0, "bigrams": True}
    model, imgs, embs, texts, records, load_image = _training_pairs(bow_run)
    assert len({len(t.split()) for t in texts}) > 2  # short and dense (40-150 word) captions mixed
    m = llm2clip.load(bow_run.run_dir)  # a run folder: its model/ is used; encoder rebuilt from the manifest
    with torch.no_grad():
        want_t = model.encode_text(embs)
        want_i = model.encode_image(imgs)
    got_t = m.encode_text(texts, batch_size=5)
    assert got_t.dtype == torch.float32 and got_t.shape == (12, 32)
    assert torch.allclose(got_t, want_t, atol=1e-5)
    assert torch.allclose(m.encode_text(texts[3]), want_t[3:4], atol=1e-5)  # one string
    # images: a ready tensor batch, PIL images and file paths all give the training tower's output
    assert torch.allclose(m.encode_image(imgs, batch_size=5), want_i, atol=1e-5)
    pil = [load_image(r.image) for r in records[:12]]
    assert torch.allclose(m.encode_image(pil), want_i, atol=1e-5)
    sim = m.similarity(got_t[:4], got_t)
    assert torch.allclose(sim, want_t[:4] @ want_t.T, atol=1e-5)
    mb = llm2clip.load(bow_run.run_dir, precision="bf16")  # bf16 weights: float32 outputs close to fp32
    assert mb.model.head.weight.dtype == torch.bfloat16
    assert (mb.encode_image(imgs) * want_i).sum(-1).min() > 0.99
    assert (mb.encode_text(texts) * want_t).sum(-1).min() > 0.99


def test_paths_similarity_scaling_and_progress(bow_run, tmp_path, capsys):
    m = llm2clip.load(Path(bow_run.run_dir) / "model")
    records, load_image = build_source(bow_run.data.train)
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        load_image(records[i].image).save(p)
        paths.append(p)
    e_paths = m.encode_image([str(p) for p in paths])
    e_pil = m.encode_image([load_image(r.image) for r in records[:6]])
    assert torch.allclose(e_paths, e_pil, atol=1e-6)
    t = m.encode_text(["a red circle on a black background", "two blue squares"])
    cos = m.similarity(e_paths, t)
    assert torch.allclose(cos, e_paths @ t.T, atol=1e-6) and cos.abs().max() <= 1 + 1e-6
    logits = m.similarity(e_paths, t, scale=True)
    assert torch.allclose(logits, cos * m.model.logit_scale.exp(), atol=1e-5)
    raw = m.encode_text(["a red circle"], normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(1))
    m.encode_image([str(p) for p in paths] * 5, batch_size=2, progress=True)
    assert "encode images" in capsys.readouterr().err


def test_input_errors_name_the_item(bow_run, tmp_path):
    m = llm2clip.load(bow_run.run_dir)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(InputError, match="broken.png: cannot read"):
        m.encode_image([bad])
    with pytest.raises(InputError, match="missing.jpg: image file not found"):
        m.encode_image(tmp_path / "missing.jpg")
    with pytest.raises(InputError, match="tower takes 16x16"):
        m.encode_image(torch.zeros(2, 3, 20, 20))
    with pytest.raises(InputError, match="image 1: expected a PIL image"):
        m.encode_image([_pil(), 3])
    with pytest.raises(InputError, match="text 1: empty"):
        m.encode_text(["ok", "  "])
    with pytest.raises(InputError, match="text 0: expected a string"):
        m.encode_text([3])
    with pytest.raises(ConfigError, match="precision"):
        llm2clip.load(bow_run.run_dir, precision="int8")


def _pil():
    from PIL import Image

    return Image.new("RGB", (16, 16))


def test_explicit_encoder_overrides_and_mismatch_is_an_error(bow_run):
    from llm2clip.data.images import BagOfWordsConfig, BagOfWordsEncoder

    enc = BagOfWordsEncoder(BagOfWordsConfig(dim=24))
    m = llm2clip.load(bow_run.run_dir, caption_encoder=enc)
    assert m.caption_encoder is enc
    m2 = llm2clip.load(bow_run.run_dir, caption_encoder={"kind": "bow", "dim": 24})
    assert torch.equal(m.encode_text(["a red circle"]), m2.encode_text(["a red circle"]))
    with pytest.raises(ConfigError, match=r"llm2clip_model.json: caption encoder does not match.*seed"):
        llm2clip.load(bow_run.run_dir, caption_encoder={"kind": "bow", "dim": 24, "seed": 3})
    with pytest.raises(ConfigError, match="caption_encoder.*dim"):
        llm2clip.load(bow_run.run_dir, caption_encoder={"kind": "bow", "dim": "big"})


def test_model_without_an_encoder_record_asks_for_one(bow_run, tmp_path):
    src = Path(bow_run.run_dir) / "model"
    dst = shutil.copytree(src, tmp_path / "old")
    mf = dst / "llm2clip_model.json"
    manifest = json.loads(mf.read_text())
    del manifest["caption_encoder"]  # as saved before the record existed
    mf.write_text(json.dumps(manifest))
    m = llm2clip.load(dst)
    assert m.encode_image([_pil()]).shape == (1, 32)  # images need no caption encoder
    with pytest.raises(ConfigError, match="does not record its caption encoder.*caption_encoder="):
        m.encode_text(["a red circle"])
    m = llm2clip.load(dst, caption_encoder={"kind": "bow", "dim": 24})
    assert torch.allclose(m.encode_text(["a red circle"]),
                          llm2clip.load(src).encode_text(["a red circle"]), atol=1e-6)


def _strip_encoder_record(model_dir: Path) -> None:
    mf = model_dir / "llm2clip_model.json"
    manifest = json.loads(mf.read_text())
    del manifest["caption_encoder"]
    mf.write_text(json.dumps(manifest))


def test_encoder_found_only_by_the_run_config_loads_as_eval_loads_it(bow_run, tmp_path):
    """The caption encoder recorded only in the run config (or its feature store) beside run_dir/model:
    llm2clip.load finds it as `llm2clip eval` does, and both give the same text embeddings."""
    from llm2clip.eval.checkpoint import load_eval_model

    run = shutil.copytree(bow_run.run_dir, tmp_path / "run")
    _strip_encoder_record(run / "model")
    texts = ["a red circle on a black background", "two blue squares and a green triangle", "a dog"]
    want = llm2clip.load(bow_run.run_dir, device="cpu").encode_text(texts)

    m = llm2clip.load(run, device="cpu")  # data.features.encoder of run/config.json
    assert m.encoder_source.endswith("config.json: data.features.encoder")
    ev = load_eval_model(run / "model", device="cpu")
    assert ev.identity()["caption_encoder"]["source"] == m.encoder_source
    assert torch.allclose(m.encode_text(texts), want, atol=1e-6)
    assert torch.allclose(ev.encode_text(texts), m.encode_text(texts), atol=1e-6)
    imgs = torch.rand(3, 3, m.image_size, m.image_size)
    assert torch.allclose(ev.encode_image(imgs), m.encode_image(imgs), atol=1e-6)

    # a run trained from a feature store: the store's manifest names the encoder
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"encoder": {"kind": "bow", "dim": 24}}))
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["features"] = {"store": str(store)}
    (run / "config.json").write_text(json.dumps(cfg))
    m = llm2clip.load(run / "model", device="cpu")
    assert m.encoder_source == f"{store / 'manifest.json'}: encoder"
    assert torch.allclose(m.encode_text(texts), want, atol=1e-6)
    assert torch.allclose(load_eval_model(run, device="cpu").encode_text(texts), want, atol=1e-6)
    # an explicit encoder still comes first, and a wrong one found by the fallback is refused at load
    assert llm2clip.load(run, caption_encoder="bow:dim=24").encoder_source == "given: bow:dim=24"
    (store / "manifest.json").write_text(json.dumps({"encoder": {"kind": "bow", "dim": 24, "seed": 5}}))
    with pytest.raises(ConfigError, match=r"seed.*\[caption encoder from .*manifest.json: encoder\]"):
        llm2clip.load(run)


def test_device_default_and_the_deprecated_dtype_name(bow_run):
    from llm2clip.api import DEFAULT_DEVICE, resolve_device

    assert DEFAULT_DEVICE == "auto"
    m = llm2clip.load(bow_run.run_dir)
    assert m.device == resolve_device("auto")
    with pytest.warns(DeprecationWarning, match="use precision="):
        mb = llm2clip.load(bow_run.run_dir, device="cpu", dtype="bfloat16")
    assert mb.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="precision= only"):
        llm2clip.load(bow_run.run_dir, precision="fp32", dtype="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            llm2clip.load(bow_run.run_dir, device="cuda")


def test_tiny_llm_in_memory_encoder_matches_training(tmp_path, tiny_llm_dir):
    # max_length 256: dense captions (up to 150 words) are encoded whole, far past CLIP's 77 tokens
    enc = {"kind": "llm", "model": str(tiny_llm_dir), "max_length": 256, "batch_size": 8}
    cfg = _train(tmp_path / "run", data__features={"encoder": enc})
    model, _, embs, texts, _, _ = _training_pairs(cfg, n=8)
    with torch.no_grad():
        want = model.encode_text(embs)
    m = llm2clip.load(cfg.run_dir)
    assert type(m.caption_encoder).__name__ == "CaptionEncoder"
    assert torch.allclose(m.encode_text(texts, batch_size=3), want, atol=1e-5)
    assert max(len(t.split()) for t in texts) > 77
    assert not any(t.truncated for t in m.caption_encoder.tokenize(texts))
    # bf16 (model and LLM): close to fp32, same ranking of the captions for each caption
    mb = llm2clip.load(cfg.run_dir, precision="bfloat16")
    assert next(mb.caption_encoder.model.parameters()).dtype == torch.bfloat16
    got = mb.encode_text(texts)
    assert got.dtype == torch.float32
    assert (got * want).sum(-1).min() > 0.98


def test_tiny_llm_feature_store_record_and_identity_errors(tmp_path, tiny_llm_dir):
    from llm2clip.data.images import caption_texts
    from llm2clip.features.extract import EmbedConfig, run_embedding

    llm_dir = shutil.copytree(tiny_llm_dir, tmp_path / "llm")  # a private copy: replaced below
    base = parse_config(tiny_run_config(tmp_path / "run"), RunConfig)
    caps = caption_texts(build_source(base.data.train)[0])
    jl = tmp_path / "caps.jsonl"
    jl.write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in caps.items()))
    enc = {"kind": "llm", "model": str(llm_dir), "max_length": 64, "batch_size": 8}
    run_embedding(EmbedConfig.model_validate(dict(encoder=enc, captions=[str(jl)], out=str(tmp_path / "store"),
                                                  dtype="float32", progress=False)))
    cfg = _train(tmp_path / "run", data__features={"store": str(tmp_path / "store")})
    manifest = json.loads((tmp_path / "run" / "model" / "llm2clip_model.json").read_text())
    assert manifest["caption_encoder"]["model"] == str(llm_dir)  # taken from the store's manifest
    model, _, embs, texts, _, _ = _training_pairs(cfg, n=8)
    with torch.no_grad():
        want = model.encode_text(embs)
    m = llm2clip.load(tmp_path / "run" / "model")
    assert torch.allclose(m.encode_text(texts), want, atol=1e-5)
    # another pooling is another encoder: refused, naming the field
    other = {**enc, "pooling": "last_token"}
    with pytest.raises(ConfigError, match="does not match.*pooling"):
        llm2clip.load(tmp_path / "run", caption_encoder=other)
    # the recorded LLM folder now holds other weights: refused at load (lazily: at the first encode_text)
    shutil.rmtree(llm_dir)
    make_tiny_llm(llm_dir, seed=1)
    with pytest.raises(ConfigError, match="does not match.*weight_hash"):
        llm2clip.load(tmp_path / "run")
    lazy = llm2clip.load(tmp_path / "run", lazy_text=True)
    lazy.encode_image([_pil()])
    with pytest.raises(ConfigError, match="weight_hash"):
        lazy.encode_text(["a red circle"])
    shutil.rmtree(llm_dir)
    with pytest.raises(ConfigError, match="cannot rebuild the caption encoder"):
        llm2clip.load(tmp_path / "run")


def test_clip_text_tower_model_uses_its_tokenizer(tmp_path):
    text = {"kind": "clip", "width": 32, "heads": 2, "layers": 1}
    cfg = _train(tmp_path / "run", model__text=text, data__features=None)
    m = llm2clip.load(cfg.run_dir)
    assert m.caption_encoder is None
    caps = ["a red circle", "word " * 300]  # long text: cut at 77 tokens by the CLIP tokenizer
    with torch.no_grad():
        want = m.model.encode_text(m.model.text.tokenize(caps))
    assert torch.allclose(m.encode_text(caps), want, atol=1e-6)
    with pytest.raises(ConfigError, match="CLIP text tower"):
        llm2clip.load(cfg.run_dir, caption_encoder="random")


def test_import_llm2clip_does_not_import_torch():
    code = "import sys, llm2clip; assert 'torch' not in sys.modules; assert callable(llm2clip.load)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    with pytest.raises(AttributeError):
        llm2clip.nothing_here  # noqa: B018


def test_one_encoder_spec_parser(tmp_path):
    from llm2clip.data.images import BagOfWordsConfig
    from llm2clip.text.config import RandomEncoderConfig
    from llm2clip.text.specs import parse_caption_encoder_spec, parse_encoder_spec

    bow = parse_encoder_spec("bow:dim=24,seed=2", caption=True)
    assert isinstance(bow, BagOfWordsConfig) and (bow.dim, bow.seed) == (24, 2)
    assert parse_caption_encoder_spec({"kind": "bow", "dim": 24}) == BagOfWordsConfig(dim=24)
    assert parse_caption_encoder_spec(bow) is bow
    assert isinstance(parse_caption_encoder_spec("random:dim=8"), RandomEncoderConfig)
    yml = tmp_path / "enc.yaml"
    yml.write_text("encoder:\n  kind: bow\n  dim: 12\n")
    assert parse_caption_encoder_spec(str(yml)).dim == 12
    with pytest.raises(ConfigError, match="unknown encoder 'bow'"):
        parse_encoder_spec("bow")  # `llm2clip encode` builds text encoders only
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_caption_encoder_spec("bow:24")
    with pytest.raises(ConfigError, match="caption_encoder.*dim"):
        parse_caption_encoder_spec({"kind": "bow", "dim": "big"}, "caption_encoder")


def test_a_batch_fetched_at_once_equals_its_samples_fetched_alone(bow_run):
    """PairDataset.__getitems__ (one text lookup for the batch, as the DataLoader calls it) == ds[k] per key."""
    records, load_image = build_source(bow_run.data.train)
    features = build_features(bow_run, [records])
    tf = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, augment="crop")
    ds = PairDataset(records, load_image, tf, bow_run.data.caption_kinds, bow_run.seed, features)
    keys = [(i, e) for e in (0, 1) for i in (3, 0, 5, 7)]
    together = ds.__getitems__(keys)
    for k, (img, text, skipped) in zip(keys, together):
        img1, text1, skipped1 = ds[k]
        assert torch.equal(img, img1) and torch.equal(text, text1) and skipped == skipped1
    assert len({t.numpy().tobytes() for _, t, _ in together}) > 1
