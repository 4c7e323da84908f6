"""Stage-2 training: a run from a YAML config, exact resume, accumulation, bad data, DDP, retrieval."""

import argparse
import json

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image
from stage2_helpers import (
    CrashAt,
    SimulatedCrash,
    assert_same_tensors,
    bow_store,
    fit_worker,
    free_port,
    model_weights,
    run_cfg,
    tiny_run_config,
)

from llm2clip.config import load_config, parse_config
from llm2clip.errors import ConfigError, InputError
from llm2clip.model import LLM2CLIP
from llm2clip.train.cli import add_commands
from llm2clip.train.config import RunConfig
from llm2clip.train.loop import fit

_cfg, _weights, _same = run_cfg, model_weights, assert_same_tensors


def test_train_command_runs_from_yaml(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_run_config("out", train__checkpoint_every=2, train__eval_every=2)))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["train", str(cfg_file), "--no-progress"])
    assert args.func(args) == 0
    run = tmp_path / "out"  # relative to the config file
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4] and "dense/i2t_R@1" in evals[0]["eval"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    model = LLM2CLIP.load(run / "model")
    assert model.text_identity["base_model"] == "bag-of-words"
    with pytest.raises(ConfigError, match="does not match"):
        LLM2CLIP.load(run / "model", text_identity={"base_model": "bag-of-words", "seed": 5})


def test_help_and_config_errors_name_file_line_and_field(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "--resume" in capsys.readouterr().out
    bad = tiny_run_config("out")
    bad["train"]["batch_sise"] = 8
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: train\.batch_sise"):
        load_config(f, RunConfig)
    nofeat = tiny_run_config("out")
    del nofeat["data"]["features"]
    with pytest.raises(ConfigError, match="data.features is required"):
        parse_config(nofeat, RunConfig)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    over = dict(train__steps=6, train__checkpoint_every=3, train__eval_every=0)
    fit(_cfg(tmp_path / "a", **over), progress=False)
    with pytest.raises(SimulatedCrash):  # dies after step 5, its last checkpoint is step 3
        fit(_cfg(tmp_path / "b", **over), progress=False, callbacks=[CrashAt(5)])
    assert not (tmp_path / "b" / "model").exists()
    fit(_cfg(tmp_path / "b", **over), resume=True, progress=False)
    _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    sa = torch.load(tmp_path / "a/checkpoints/step_00000006/train_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b/checkpoints/step_00000006/train_state.pt", weights_only=True)
    assert sa["data"] == sb["data"] and sa["scheduler"] == sb["scheduler"]


def test_accumulation_keeps_the_contrastive_batch_global(tmp_path):
    over = dict(train__steps=2, optim__grad_clip=None)
    fit(_cfg(tmp_path / "one", **over), progress=False)
    fit(_cfg(tmp_path / "acc", train__accum_steps=2, **over), progress=False)
    _same(_weights(tmp_path / "one"), _weights(tmp_path / "acc"), atol=1e-5)


def test_bad_images_are_skipped_then_an_error(tmp_path):
    rows = []
    for i in range(10):
        p = tmp_path / f"im{i}.png"
        if i == 3:
            p.write_bytes(b"corrupt")
        elif i != 7:  # im7 is missing
            Image.new("RGB", (16, 16), (25 * i, 0, 0)).save(p)
        rows.append({"image": p.name, "captions": [{"id": f"c{i}", "kind": "short", "text": f"picture {i}"}]})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = {"kind": "manifest", "path": str(tmp_path / "m.jsonl")}
    over = dict(data__train=src, data__val=None, data__caption_kinds={"short": 1.0}, train__steps=3)
    last = fit(_cfg(tmp_path / "ok", data__max_bad_fraction=0.5, **over), progress=False)
    assert last["skipped_images"] > 0
    with pytest.raises(InputError, match="could not be read"):
        fit(_cfg(tmp_path / "strict", data__max_bad_fraction=0.0, **over), progress=False)


@pytest.mark.parametrize("over", [
    {"model__text": {"kind": "clip", "width": 16, "heads": 2, "layers": 1}, "data__features": None},
    {"model__loss": "siglip"},
    {"train__precision": "bf16", "train__grad_checkpointing": True},
], ids=["clip-text-baseline", "siglip", "bf16-ckpt"])
def test_variants_train(tmp_path, over):
    last = fit(_cfg(tmp_path, train__steps=2, **over), progress=False)
    assert last["step"] == 2 and last["loss"] == last["loss"]  # finite, not NaN
    assert "dense/t2i_R@1" in last["eval"]


def test_fashion_mnist_source(tmp_path):
    from test_scenes import write_fake_fashion_mnist

    root = tmp_path / "fm"
    root.mkdir()
    write_fake_fashion_mnist(root, n=20)
    src = {"kind": "fashion_mnist", "split": "train", "root": str(root), "per_class": 2}
    last = fit(_cfg(tmp_path / "run", data__train=src, data__val={**src, "split": "test"}, train__steps=2,
                    data__caption_kinds={"short": 1.0}), progress=False)
    assert last["eval"]["n"] == 20


def test_trains_from_a_feature_store_on_disk(tmp_path):
    cfg = _cfg(tmp_path / "run", train__steps=2)
    store = bow_store(cfg, tmp_path / "store")
    cfg = _cfg(tmp_path / "run", train__steps=2, data__features={"store": str(tmp_path / "store")})
    assert fit(cfg, progress=False)["step"] == 2
    assert LLM2CLIP.load(tmp_path / "run" / "model").text_identity == store.identity


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    over = dict(train__steps=2, train__eval_every=0, data__val=None)
    fit(_cfg(tmp_path / "one", **over), progress=False)
    cfg2 = tiny_run_config(tmp_path / "two", **over)
    mp.spawn(fit_worker, args=(2, free_port(), cfg2), nprocs=2, join=True)
    _same(_weights(tmp_path / "one"), _weights(tmp_path / "two"), atol=1e-5)


@pytest.mark.slow
def test_heldout_scene_retrieval_beats_chance(tmp_path):
    """A tiny run: dense-caption retrieval on 64 held-out scenes well above chance (R@1 1/64, R@5 5/64)."""
    cfg = _cfg(tmp_path, data__train={"kind": "scenes", "count": 1024, "render_size": 16},
               data__val={"kind": "scenes", "count": 64, "offset": 1000000, "render_size": 16},
               data__features={"encoder": {"kind": "bow", "dim": 128}},
               model__vision={"kind": "small_vit", "image_size": 16, "patch_size": 4, "width": 64, "layers": 3,
                              "heads": 4},
               model__embed_dim=64, optim__lr=2e-3, optim__warmup_steps=10, train__batch_size=32,
               train__steps=150, train__log_every=50)
    ev = fit(cfg, progress=False)["eval"]
    assert ev["dense/t2i_R@5"] > 4 * 5 / 64 and ev["dense/i2t_R@5"] > 4 * 5 / 64


def test_standardize_takes_statistics_of_the_training_captions(tmp_path):
    import numpy as np

    from llm2clip.train.loop import build_features, build_source

    cfg = parse_config(tiny_run_config(tmp_path / "run", model__text={"kind": "adapter", "depth": 1,
                                                                     "standardize": True}), RunConfig)
    fit(cfg, progress=False)
    model = LLM2CLIP.load(tmp_path / "run" / "model")
    records, _ = build_source(cfg.data.train)
    feats = build_features(cfg, [records])
    ids = sorted({c.id for r in records for caps in r.captions.values() for c in caps})
    x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(feats.get_by_ids(ids), np.float32)), dim=-1)
    assert torch.allclose(model.text.in_mean, x.mean(0), atol=1e-6)
    assert torch.allclose(model.text.in_std, x.std(0), atol=1e-6)


# ----------------------------------------------------------------------- retrieval rule
class _Constant(torch.nn.Module):
    """A collapsed model: every image and caption gets the same feature."""

    def encode_image(self, x):
        return torch.nn.functional.normalize(torch.ones(len(x), 4), dim=-1)

    def encode_text(self, t):
        return torch.nn.functional.normalize(torch.ones(len(t), 4), dim=-1)


def test_training_retrieval_counts_ties_against_the_query_as_eval_does():
    from llm2clip.eval.retrieval import retrieval_metrics
    from llm2clip.train.evaluate import evaluate_retrieval, recall_at_k

    n = 16
    ev = evaluate_retrieval(_Constant(), torch.zeros(n, 3, 2, 2), {"dense": torch.zeros(n, 4)}, torch.device("cpu"))
    for key in ("dense/i2t_R@1", "dense/t2i_R@1", "dense/i2t_R@5", "dense/t2i_R@10"):
        k = int(key.rsplit("@", 1)[1])
        assert ev[key] <= k / n  # at most chance, never the 100 % that ties in the query's favour gave
        assert ev[key] == 0.0
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    txt[3] = txt[5]  # a tie
    ref = retrieval_metrics(img, txt, torch.arange(n), ks=(1, 5, 10))
    assert recall_at_k(img, txt) == {k: v for k, v in ref.items() if "_R@" in k}


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_holding_pickled_objects_is_refused_unread(tmp_path):
    from stage2_helpers import write_pickle_bomb

    from llm2clip.train.checkpoint import load_train_state

    fit(_cfg(tmp_path / "run", train__steps=2, train__eval_every=0), progress=False)
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert load_train_state(ck)["step"] == 2  # tensors and plain data: weights_only reads it
    marker = tmp_path / "pwned"
    write_pickle_bomb(ck / "train_state.pt", marker)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_run_config(tmp_path / "other", train__steps=3)))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    for argv in (["--resume", str(ck)], ["--run-dir", str(tmp_path / "run")]):  # a given path; the default
        args = parser.parse_args(["train", str(cfg_file), "--no-progress", *argv])
        with pytest.raises(InputError, match=r"step_00000002/train_state\.pt: refused: .*pickled"):
            args.func(args)
        assert not marker.exists()


def test_train_resumes_by_default_and_no_resume_starts_over(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_run_config("out", train__eval_every=0, train__checkpoint_every=2)))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    assert parser.parse_args(["train", str(cfg_file)]).resume == "latest"
    assert parser.parse_args(["train", str(cfg_file), "--no-resume"]).resume is False
    assert parser.parse_args(["train", str(cfg_file), "--resume", "x"]).resume == "x"
    run = tmp_path / "out"

    def train(*argv):
        args = parser.parse_args(["train", str(cfg_file), "--no-progress", *argv])
        assert args.func(args) == 0
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return ([r["step"] for r in rows if "loss" in r],
                sorted(p.name for p in (run / "checkpoints").iterdir()))

    assert train("--steps", "2") == ([1, 2], ["step_00000002"])
    assert train("--steps", "4") == ([1, 2, 3, 4], ["step_00000002", "step_00000004"])  # continued at 3
    # starting over clears the old run's checkpoints: its step 4 would outrank the new step 2
    assert train("--steps", "2", "--no-resume") == ([1, 2], ["step_00000002"])


# ------------------------------------------------------------------ figures of multi-process runs
def test_global_figures_of_one_process_are_its_own():
    from llm2clip.train.loop import global_figures

    assert global_figures(1.25, 3, torch.device("cpu")) == (1.25, 3)


@pytest.mark.slow
def test_two_processes_log_the_runs_loss_and_bad_image_count(tmp_path):
    """Loss: the mean over ranks (the global batch's loss); bad images: summed over ranks. Both equal
    those of one process drawing the same global batches."""
    from stage2_helpers import write_scene_manifest

    manifest = write_scene_manifest(tmp_path / "data", 24, corrupt=(1, 4, 9, 14, 19, 22))
    over = dict(train__steps=3, train__eval_every=0, data__val=None,
                data__train={"kind": "manifest", "path": str(manifest)}, data__max_bad_fraction=0.5)
    fit(_cfg(tmp_path / "one", **over), progress=False)
    mp.spawn(fit_worker, args=(2, free_port(), tiny_run_config(tmp_path / "two", **over)), nprocs=2, join=True)
    rows = {n: [json.loads(ln) for ln in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["skipped_images"] == a["skipped_images"]
    assert rows["two"][-1]["skipped_images"] > 0


def test_truncated_captions_of_the_store_are_warned_about_and_recorded(tmp_path, caplog):
    cfg = _cfg(tmp_path / "run", train__steps=1)
    bow_store(cfg, tmp_path / "store")
    mf = tmp_path / "store" / "manifest.json"
    mf.write_text(json.dumps({**json.loads(mf.read_text()), "truncated_captions": 5}))  # as newer stores record
    # a second run on the store in the same process (a pipeline trains many) records it without a new warning
    for run in ("run", "run2"):
        cfg = _cfg(tmp_path / run, train__steps=1, data__features={"store": str(tmp_path / "store")})
        with caplog.at_level("WARNING", logger="llm2clip.train.loop"):
            fit(cfg, progress=False)
        assert sum("5 caption(s) truncated" in r.getMessage() for r in caplog.records) == 1
        rows = [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert rows[0] == {"step": 0, "truncated_captions": 5}
    assert json.loads((tmp_path / "run" / "model" / "llm2clip_model.json").read_text())["training"][
        "truncated_captions"] == 5


def test_a_resumed_run_logs_the_bad_image_count_of_the_whole_run(tmp_path):
    from stage2_helpers import write_scene_manifest

    manifest = write_scene_manifest(tmp_path / "data", 24, corrupt=(1, 4, 9, 14, 19, 22))
    over = dict(train__steps=4, train__checkpoint_every=1, data__val=None, data__max_bad_fraction=0.5,
                data__train={"kind": "manifest", "path": str(manifest)})
    full = fit(_cfg(tmp_path / "full", **over), progress=False)
    with pytest.raises(SimulatedCrash):
        fit(_cfg(tmp_path / "cut", **over), progress=False, callbacks=[CrashAt(2)])
    assert fit(_cfg(tmp_path / "cut", **over), progress=False)["skipped_images"] == full["skipped_images"] > 0


def test_a_quiet_run_prints_nothing_and_keeps_its_evaluations(tmp_path, capsys):
    """progress=False (the pipeline's stage-2 runs): no per-evaluation lines on the console (the quickstart
    printed 42 of them); the evaluations are in metrics.jsonl."""
    fit(_cfg(tmp_path / "run", train__steps=2, train__eval_every=1), progress=False)
    out = capsys.readouterr()
    assert "step 1:" not in out.out + out.err and "step 2:" not in out.out + out.err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [1, 2]
