"""`llm2clip eval`: a tiny trained model and a tiny random open_clip baseline on the built-in sets, with
every reported value recomputed by hand from the models' own features; bad input."""

import argparse
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from stage2_helpers import tiny_run_config

from llm2clip.config import parse_config
from llm2clip.data import fashion_mnist as fm
from llm2clip.data.captions import cupl_caption_set
from llm2clip.data.images import BagOfWordsConfig, BagOfWordsEncoder
from llm2clip.data.scenes import SceneSet
from llm2clip.errors import ConfigError, InputError
from llm2clip.eval import evaluate_checkpoint, load_benchmark
from llm2clip.eval.cli import add_commands, caption_encoder_for
from llm2clip.eval.prompts import FASHION_TEMPLATES
from llm2clip.model import LLM2CLIP
from llm2clip.train.config import RunConfig
from llm2clip.train.loop import fit
from llm2clip.vision import build_transform

OC_NAME = "test-eval-tiny-ViT"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step tiny stage-2 run (bag-of-words caption encoder, 16 px scenes): its model folder."""
    run = tmp_path_factory.mktemp("evalrun") / "run"
    fit(parse_config(tiny_run_config(run), RunConfig), progress=False)
    return run / "model"


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip architecture registered from a config (random weights, nothing downloaded)."""
    import open_clip

    d = tmp_path_factory.mktemp("oc-eval")
    (d / f"{OC_NAME}.json").write_text(json.dumps(
        {"embed_dim": 24, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(d)
    return OC_NAME


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_DIR", tmp_path / "no-fashion-mnist")


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _result(run, name):
    return next(r for r in run["results"] if r["benchmark"] == name)


# ---------------------------------------------------------------------------- hand computations
def _recalls_1to1(img, txt, ks=(1, 5)):
    """Caption i belongs to image i: R@K in both directions from cosine similarities."""
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # [images, captions]
    own = sim.diagonal()
    i2t_rank = (sim > own[:, None]).sum(1)
    t2i_rank = (sim > own[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = (i2t_rank < k).double().mean().item()
        out[f"t2i_R@{k}"] = (t2i_rank < k).double().mean().item()
    return out


def _cra_top1(emb, groups):
    e = F.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    g = np.asarray(groups)
    return float(np.mean(g[sim.argmax(1).numpy()] == g))


def _llm2clip_features(model_dir, scenes, kind):
    model = LLM2CLIP.load(model_dir)
    enc = BagOfWordsEncoder(BagOfWordsConfig(dim=24))
    v = model.visual
    tf = build_transform(v.image_size, v.mean, v.std)
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(scenes.image(i)) for i in range(len(scenes))]))
        txt = model.encode_text(enc.encode([scenes[i].captions()[kind] for i in range(len(scenes))]))
    return model, enc, img, txt


# ---------------------------------------------------------------------------------------- tests
def test_eval_command_writes_report_equal_to_a_direct_computation(trained, tmp_path, capsys, no_fashion_mnist):
    out = tmp_path / "report"
    code = _cli([str(trained), "-b", "scenes-dense", "-b", "scenes-short", "-b", "cupl-cra", "-b", "fashion-mnist",
                 "--scenes-count", "40", "--cra-classes", "20", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    head = "| Model | Scenes short (I2T / T2I R@1) | Scenes dense (I2T / T2I R@1) | model CRA: CuPL (R@1, pool) |"
    assert head in printed
    assert "\n| run | " in printed and "(100) |" in printed
    assert "skipped fashion-mnist:" in printed and "apt-get install dataset-fashion-mnist" in printed
    for png in ("recall_curves.png", "r1_bars.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    md = (out / "report.md").read_text()
    assert "| run |" in md and "fashion-mnist" in md.split("## Data")[0]  # the skip is in the report

    [run] = json.loads((out / "results.json").read_text())
    ident = run["model"]
    assert ident["kind"] == "llm2clip" and ident["name"] == "run"
    assert ident["weights_sha256"] == _sha(trained / "model.safetensors")
    assert ident["text_identity"]["base_model"] == "bag-of-words"
    assert ident["caption_encoder"]["identity"] == ident["text_identity"]
    assert [s["benchmark"] for s in run["skipped"]] == ["fashion-mnist"]

    # Retrieval: recomputed from the model's own features (scenes at the held-out offset, 16 px).
    scenes = SceneSet(40, seed=0, offset=1_000_000, render_size=16)
    for kind in ("dense", "short"):
        res = _result(run, f"scenes-{kind}")
        _, _, img, txt = _llm2clip_features(trained, scenes, kind)
        for key, value in _recalls_1to1(img, txt).items():
            assert res["metrics"][key] == pytest.approx(value, abs=1e-12), (kind, key)
        assert res["metrics"]["images"] == res["metrics"]["captions"] == 40
        caps = [scenes[i].captions()[kind] for i in range(40)]
        assert res["data"]["files"]["generated captions"] == hashlib.sha256(
            "".join(c + "\n" for c in caps).encode()).hexdigest()
        assert res["data"]["offset"] == 1_000_000 and res["data"]["render_size"] == 16

    # CRA through the caption encoder + adapter, and of the raw caption embeddings.
    cs = cupl_caption_set("heldout", 20, 5)
    model, enc = LLM2CLIP.load(trained), BagOfWordsEncoder(BagOfWordsConfig(dim=24))
    raw = enc.encode(cs.captions)
    with torch.no_grad():
        adapted = model.encode_text(raw)
    m = _result(run, "cupl-cra")["metrics"]
    assert m["pool_size"] == 100 and m["queries"] == 100
    assert m["R@1"] == pytest.approx(_cra_top1(adapted, cs.groups), abs=1e-12)
    assert m["caption_encoder_R@1"] == pytest.approx(_cra_top1(raw, cs.groups), abs=1e-12)


def test_evaluate_checkpoint_returns_the_run_without_writing(trained, no_fashion_mnist):
    run = evaluate_checkpoint(trained.parent, ["scenes-short"], options={"scenes-short": {"count": 12}},
                              progress=False)  # the run folder works too
    assert "outputs" not in run and run["skipped"] == []
    res = run["results"][0]
    assert res["task"] == "retrieval" and res["metrics"]["images"] == 12 and "curves" in res
    assert run["settings"]["benchmarks"] == ["scenes-short"]
    # An in-memory model (as the pipeline holds one) with a built encoder scores the same.
    mem = evaluate_checkpoint(LLM2CLIP.load(trained), ["scenes-short"], options={"scenes-short": {"count": 12}},
                              caption_encoder=BagOfWordsEncoder(BagOfWordsConfig(dim=24)), progress=False)
    assert mem["results"][0]["metrics"] == res["metrics"]


def test_imagenet_folder_with_templates_and_cupl(trained, tmp_path):
    from test_eval_loaders import make_imagenet_folders

    make_imagenet_folders(tmp_path / "val")
    names = ["goldfish", "school bus", "no such class"]
    run = evaluate_checkpoint(trained, [f"imagenet={tmp_path / 'val'}"], zeroshot_prompts="both",
                              options={"imagenet": {"classnames": names}}, progress=False)
    res = run["results"][0]
    assert res["metrics"]["images"] == 6 and {"top1", "cupl_top1"} <= set(res["metrics"])
    assert set(res["data"]["prompt_sets"]) == {"templates", "cupl"}
    assert res["data"]["files"]["listing"]  # a digest of the image listing


def test_fashion_mnist_zero_shot_from_a_folder(trained, tmp_path):
    from test_scenes import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, n=20)
    run = evaluate_checkpoint(trained, [f"fashion-mnist={tmp_path}"], options={"fashion-mnist": {"cupl_per_class": 3}},
                              progress=False)
    res = run["results"][0]
    m = res["metrics"]
    assert m["images"] == 20 and m["classes"] == 10
    assert {"top1", "top5", "cupl_top1", "cupl_top5"} <= set(m)
    assert res["data"]["files"]["t10k-images-idx3-ubyte.gz"] == _sha(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert res["data"]["prompt_sets_info"]["cupl"]["template_fallback"] == ["shirt"]

    # Top-1 with the template classifier, by hand.
    model = LLM2CLIP.load(trained)
    model.attach_caption_encoder(BagOfWordsEncoder(BagOfWordsConfig(dim=24)))
    imgs = fm.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    labels = fm.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    v = model.visual
    tf = build_transform(v.image_size, v.mean, v.std)
    with torch.no_grad():
        feats = model.encode_image(torch.stack([tf(Image.fromarray(x)) for x in imgs]))
        per_class = [F.normalize(model.encode_text([t.replace("{c}", c) for t in FASHION_TEMPLATES]), dim=-1)
                     for c in fm.CLASSES]
        weights = torch.stack([F.normalize(e.mean(0), dim=0) for e in per_class])
    pred = (feats @ weights.T).argmax(1).numpy()
    assert m["top1"] == pytest.approx(float(np.mean(pred == labels)), abs=1e-12)

    with pytest.raises(InputError, match="t10k-images-idx3-ubyte.gz not found"):
        evaluate_checkpoint(trained, [f"fashion-mnist={tmp_path / 'empty'}"], progress=False)


def test_open_clip_baseline_equals_a_direct_computation(tiny_open_clip, tmp_path, capsys):
    import open_clip

    spec = f"open_clip:{tiny_open_clip}"
    out = tmp_path / "oc"
    assert _cli([spec, "-b", "scenes-dense", "-b", "cupl-cra", "--scenes-count", "30", "--cra-classes", "10",
                 "--out", str(out), "--no-progress"]) == 0
    assert f"| {spec} | " in capsys.readouterr().out
    [run] = json.loads((out / "results.json").read_text())
    assert run["model"]["kind"] == "open_clip" and run["model"]["init"].startswith("random")

    torch.manual_seed(0)  # the harness builds random-weight baselines with seed 0
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_open_clip)
    tok = open_clip.get_tokenizer(tiny_open_clip)
    model.eval()
    scenes = SceneSet(30, seed=0, offset=1_000_000, render_size=16)  # the tower's 16 px input size
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(scenes.image(i)) for i in range(30)]))
        txt = model.encode_text(tok([scenes[i].captions()["dense"] for i in range(30)]))
        cs = cupl_caption_set("heldout", 10, 5)
        cra_emb = model.encode_text(tok(cs.captions))
    res = _result(run, "scenes-dense")["metrics"]
    for key, value in _recalls_1to1(img, txt).items():
        assert res[key] == pytest.approx(value, abs=1e-12), key
    cra = _result(run, "cupl-cra")["metrics"]
    assert cra["pool_size"] == 50 and "caption_encoder_R@1" not in cra  # one text tower, one stage
    assert cra["R@1"] == pytest.approx(_cra_top1(cra_emb, cs.groups), abs=1e-12)


def _strip_manifest_encoder(model_dir):
    mf = model_dir / "llm2clip_model.json"
    manifest = json.loads(mf.read_text())
    manifest.pop("caption_encoder", None)
    mf.write_text(json.dumps(manifest))
    return manifest


def test_caption_encoder_sources_and_identity_mismatch(trained, tmp_path, no_fashion_mnist):
    # The run config beside run_dir/model, when the manifest records no encoder.
    run = tmp_path / "run"
    shutil.copytree(trained.parent, run)
    _strip_manifest_encoder(run / "model")
    res = evaluate_checkpoint(run / "model", ["scenes-short"], options={"scenes-short": {"count": 8}}, progress=False)
    assert res["model"]["caption_encoder"]["source"].endswith("config.json: data.features.encoder")

    alone = tmp_path / "alone" / "weights"  # a model folder with nothing beside it
    shutil.copytree(trained, alone)
    manifest = _strip_manifest_encoder(alone)
    with pytest.raises(ConfigError, match="pass --caption-encoder SPEC"):
        caption_encoder_for(alone)
    assert caption_encoder_for(alone, "bow:dim=24").identity()["base_model"] == "bag-of-words"

    manifest["caption_encoder"] = {"kind": "bow", "dim": 24}
    (alone / "llm2clip_model.json").write_text(json.dumps(manifest))
    res = evaluate_checkpoint(alone, ["scenes-short"], options={"scenes-short": {"count": 8}}, progress=False)
    assert res["model"]["caption_encoder"]["source"].endswith("manifest caption_encoder")

    manifest["caption_encoder"] = {"kind": "bow", "dim": 24, "seed": 3}
    (alone / "llm2clip_model.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="seed: model has 0, got 3"):
        evaluate_checkpoint(alone, ["scenes-short"], progress=False)
    with pytest.raises(ConfigError, match="does not match.*seed: model has 0, got 1"):
        _cli([str(trained), "-b", "scenes-short", "--caption-encoder", "bow:dim=24,seed=1", "--out",
              str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="expected key=value"):
        _cli([str(trained), "-b", "scenes-short", "--caption-encoder", "bow:24"])


def test_eval_loads_through_llm2clip_load(trained, monkeypatch):
    """eval's model is the one llm2clip.load gives (one loader); the spec parser is text.specs's."""
    import llm2clip.api
    from llm2clip.eval import checkpoint
    from llm2clip.text.specs import parse_caption_encoder_spec

    assert checkpoint.parse_caption_encoder_spec is parse_caption_encoder_spec  # the old import still works
    calls = []
    real = llm2clip.api.load
    monkeypatch.setattr(llm2clip.api, "load", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    ev = checkpoint.load_eval_model(trained, device="cpu", precision="bfloat16")
    assert len(calls) == 1 and ev.precision == "bf16"
    lm = real(trained, device="cpu")
    texts = ["a red circle", "three shapes on a navy background"]
    with torch.no_grad():
        want = lm.model.encode_text(lm.caption_encoder.encode(texts))
    assert torch.allclose(checkpoint.load_eval_model(trained, device="cpu").encode_text(texts), want, atol=1e-6)


def test_bad_input_is_a_clear_error(trained, tiny_open_clip, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no llm2clip_model.json; not a saved LLM2CLIP model"):
        _cli([str(tmp_path / "empty"), "-b", "scenes-short"])
    with pytest.raises(ConfigError, match="folder not found"):
        _cli([str(tmp_path / "nowhere"), "-b", "scenes-short"])
    # Benchmark errors come first, before any model is loaded (the checkpoint here does not exist).
    with pytest.raises(InputError, match="unknown benchmark 'flickr8k'"):
        _cli([str(tmp_path / "nowhere"), "-b", "flickr8k"])
    with pytest.raises(InputError, match="coco_karpathy_test.json not found"):
        _cli([str(tmp_path / "nowhere"), "-b", f"coco={tmp_path / 'empty'}"])
    with pytest.raises(InputError, match="benchmark coco needs its local copy: coco=DIR"):
        _cli([str(trained), "-b", "coco"])
    with pytest.raises(InputError, match="given more than once"):
        _cli([str(trained), "-b", "scenes-short", "-b", "scenes-short"])
    with pytest.raises(InputError, match="built in and takes no folder"):
        load_benchmark("scenes-dense", tmp_path)
    with pytest.raises(InputError, match="NAME.KEY=VALUE"):
        _cli([str(trained), "-o", "count=3"])
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        _cli(["open_clip:no-such-net", "-b", "scenes-short"])
    with pytest.raises(ConfigError, match="weights file .* not found"):
        _cli([f"open_clip:{OC_NAME}:{tmp_path / 'w.pt'}", "-b", "scenes-short"])
    with pytest.raises(InputError, match="give a CHECKPOINT"):
        _cli(["-b", "scenes-short"])
    assert _cli(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "| scenes-dense | retrieval |" in listed and "| cupl-cra | cra |" in listed
