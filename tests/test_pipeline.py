"""`llm2clip run` / `quickstart`: the smoke preset end to end, skipping, resuming, redoing, reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip.cli import main
from llm2clip.errors import ConfigError
from llm2clip.eval.paired import format_interval
from llm2clip.pipeline import build_stages, load_pipeline_config, preset_path, run_pipeline
from llm2clip.pipeline import stages as S
from llm2clip.pipeline.config import variant_run
from llm2clip.pipeline.runner import PIPELINE_MANIFEST


def smoke(run_dir: Path, **over):
    cfg = load_pipeline_config("smoke")
    cfg.run_dir = str(run_dir)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "smoke"
    code = main(["quickstart", "--preset", "smoke", "--run-dir", str(run_dir)])
    assert code == 0
    return run_dir


def test_smoke_preset_writes_every_stage_and_the_report(smoke_run, capsys):
    m = json.loads((smoke_run / PIPELINE_MANIFEST).read_text())
    cfg = smoke(smoke_run)
    names = [s.name for s in build_stages(cfg)]
    assert list(m["stages"]) == names
    assert all(m["stages"][n]["status"] == "done" for n in names)
    for t in ("llm-cc", "llm-cc-bidir"):  # each fine-tuned teacher has its own stage 1
        assert (smoke_run / "stage1" / t / "encoder" / "llm2clip_encoder.json").is_file()
    enc = lambda t: json.loads((smoke_run / "stage1" / t / "encoder" / "llm2clip_encoder.json").read_text())
    assert [enc(t)["encoder"]["bidirectional"] for t in ("llm-cc", "llm-cc-bidir")] == [False, True]
    for t in ("llm-raw", "llm-cc", "llm-cc-bidir", "random"):
        assert (smoke_run / "embed" / t / "manifest.json").is_file()
    rep = smoke_run / "report"
    md = (rep / "report.md").read_text()
    res = json.loads((rep / "results.json").read_text())
    assert len(res["rows"]) == len(cfg.variants) == 7 and all(r["seeds"] == 2 for r in res["rows"])
    assert "Departure from the paper" in md and "kept as its own row, tiny LLM (CC, bidirectional)" in md
    for p in res["plots"]:
        assert (rep / p).read_bytes()[:4] == b"\x89PNG"
    assert "teachers.png" in res["plots"] and "dense_ratio_llm-cc.png" in res["plots"]
    # the table rows are the means of the training runs' own final held-out evaluations, one run per seed
    for row in res["rows"]:
        lasts = []
        for k in range(2):
            lines = (smoke_run / "train" / variant_run(row["variant"], k) / "metrics.jsonl").read_text().splitlines()
            lasts.append([json.loads(x) for x in lines if '"eval"' in x][-1]["eval"])
        assert row["per_seed"]["dense_i2t"] == [e["dense/i2t_R@1"] for e in lasts]
        assert row["dense_i2t"] == pytest.approx(sum(e["dense/i2t_R@1"] for e in lasts) / 2)
        assert f"| {row['variant']} |" in md
    # every claim carries its paired comparisons, each with an interval around its difference and a verdict
    for c in res["claims"]:
        assert c["verdict"] in ("holds", "reversed", "not resolved") and c["comparisons"]
        for x in c["comparisons"]:
            assert x["low"] <= x["diff"] <= x["high"] and x["seeds"] == [2, 2] and x["images"] == cfg.scenes.val
        assert f"**{c['verdict']}**: {c['claim']}" in md
    assert torch.__version__.startswith(res["versions"]["torch"])
    assert "## Timings per stage" in md and "## Config" in md and "## The paper's claims, checked" in md
    assert {c["claim"][:20] for c in res["claims"]} >= {"the raw LLM is the w", "CC fine-tuning lifts"}
    # the CC teacher really is another encoder than the raw one
    raw = json.loads((smoke_run / "embed" / "llm-raw" / "manifest.json").read_text())
    cc = json.loads((smoke_run / "embed" / "llm-cc" / "manifest.json").read_text())
    assert raw["identity"]["weight_hash"] != cc["identity"]["weight_hash"]


def test_rerun_skips_finished_stages(smoke_run, capsys):
    before = {p: _lines(p) for p in smoke_run.glob("train/*/*/metrics.jsonl")}
    assert len(before) == 14
    st1 = _lines(smoke_run / "stage1" / "llm-cc" / "metrics.jsonl")
    run_pipeline(smoke(smoke_run))
    out = capsys.readouterr().out
    assert "finished before, skipped: data, stage1/llm-cc, stage1/llm-cc-bidir, embed/llm-raw" in out
    assert "[run 1/" not in out
    claims = json.loads((smoke_run / "report" / "results.json").read_text())["claims"]
    for c in claims:  # the console shows each verdict with the numbers behind it
        assert f"  {c['verdict']}: {c['claim']}" in out
        for x in c["comparisons"]:
            assert f"{x['a']} − {x['b']}, {x['kind']} R@1: {format_interval(x)} ({x['verdict']})" in out
    assert {p: _lines(p) for p in before} == before and _lines(smoke_run / "stage1" / "llm-cc" / "metrics.jsonl") == st1


def test_changed_stage2_setting_redoes_only_stage2_and_eval(tmp_path, smoke_run, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run, run_dir)
    cfg = smoke(run_dir)
    cfg.stage2.train.steps = 4
    run_pipeline(cfg)
    out = capsys.readouterr().out
    skipped = "skipped: data, stage1/llm-cc, stage1/llm-cc-bidir, embed/llm-raw, embed/llm-cc, embed/llm-cc-bidir"
    assert skipped + ", embed/random" in out
    m = json.loads((run_dir / PIPELINE_MANIFEST).read_text())
    for v in cfg.variants:
        assert m["stages"][f"train/{variant_run(v.name, 1)}"]["result"]["steps"] == 4
        # the folder was cleared: a fresh metrics file, not the old one extended
        metrics = run_dir / "train" / variant_run(v.name, 0) / "metrics.jsonl"
        steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
        assert steps == sorted(steps)


def test_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "killed"
    real = S.run_train
    calls = []

    def crash_on_second(rc):
        calls.append(rc["run_dir"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C in the middle of stage 2
        return real(rc)

    monkeypatch.setattr(S, "run_train", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(smoke(run_dir))
    m = json.loads((run_dir / PIPELINE_MANIFEST).read_text())
    first, second = (f"train/{Path(p).relative_to(run_dir / 'train').as_posix()}" for p in calls)
    assert m["stages"][first]["status"] == "done" and m["stages"][second]["status"] == "running"
    monkeypatch.setattr(S, "run_train", real)
    capsys.readouterr()
    run_pipeline(smoke(run_dir))
    out = capsys.readouterr().out
    skipped = "skipped: data, stage1/llm-cc, stage1/llm-cc-bidir, embed/llm-raw, embed/llm-cc, embed/llm-cc-bidir"
    assert f"{skipped}, embed/random, {first}" in out
    m = json.loads((run_dir / PIPELINE_MANIFEST).read_text())
    assert all(s["status"] == "done" for s in m["stages"].values())


@pytest.mark.slow
def test_parallel_workers_give_the_same_results(tmp_path, smoke_run):
    """Stage-2 variants in 2 spawned processes give exactly what one process gives."""
    run_dir = tmp_path / "par"
    res = run_pipeline(smoke(run_dir, parallel=2))
    one = json.loads((smoke_run / "report" / "results.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]
    assert strip(res["rows"]) == strip(one["rows"])


def test_no_model_loading_bars_under_the_run_line(capfd):
    """transformers draws a "Loading weights" bar per model; a run turns them off under its own progress line."""
    from transformers.utils import logging as hf_logging

    from llm2clip.pipeline.plan import no_loading_bars
    from llm2clip.text import build_text_encoder
    from llm2clip.text.config import LLMEncoderConfig

    cfg = LLMEncoderConfig(model="tiny-random-llama")
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a plain shell (HF_HUB_DISABLE_PROGRESS_BARS unset)
    with no_loading_bars():
        build_text_encoder(cfg)
    assert "Loading weights" not in capfd.readouterr().err
    build_text_encoder(cfg)  # and back on after the run
    err = capfd.readouterr().err
    if not was:
        hf_logging.disable_progress_bar()
    assert "Loading weights" in err


def test_dense_to_short_against_a_loop():
    g = torch.Generator().manual_seed(0)
    n = 12
    shorts = ["s0", "s1", "s2", "s1", "s0", "s3", "s2", "s2", "s4", "s0", "s1", "s3"]  # shared short captions
    ids, texts = [], []
    for i in range(n):
        ids += [f"k{i}-short", f"k{i}-dense"]
        texts += [shorts[i], f"dense {i}"]
    emb = torch.randn(2 * n, 8, generator=g)
    for i in range(n):  # identical texts share one embedding, as in a store
        j = shorts.index(shorts[i])
        emb[2 * i] = emb[2 * j]
    got = S.dense_to_short(emb, ids, texts, [1, 2])
    uniq = sorted(set(shorts))
    cand = {t: torch.nn.functional.normalize(emb[2 * shorts.index(t)], dim=0) for t in uniq}
    hits1 = hits2 = 0
    for i in range(n):
        q = torch.nn.functional.normalize(emb[2 * i + 1], dim=0)
        order = sorted(uniq, key=lambda t: -float(q @ cand[t]))
        hits1 += order[0] == shorts[i]
        hits2 += shorts[i] in order[:2]
    assert got["pool_size"] == len(uniq) == 5 and got["queries"] == n
    assert got["R@1"] == pytest.approx(hits1 / n) and got["R@2"] == pytest.approx(hits2 / n)


def test_config_errors_name_the_field(tmp_path):
    good = preset_path("smoke").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.replace("- {teacher: random, dense: 0.5}", "- {teacher: minilm, dense: 0.5}"))
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: variants: .*item 4: unknown teacher 'minilm'"):
        load_pipeline_config(bad)
    bad.write_text(good.replace("- {teacher: llm-cc, dense: 0.0}", "- {teacher: llm-cc, dense: 1.5}"))
    with pytest.raises(ConfigError, match=r"variants\.5\.dense"):
        load_pipeline_config(bad)
    bad.write_text(good.replace("- {teacher: llm-cc, dense: 0.0}", "- {teacher: llm-cc, dense: 0.5}"))
    with pytest.raises(ConfigError, match="listed twice"):
        load_pipeline_config(bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_pipeline_config("fast")
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_eta_is_rescaled_by_finished_stages(tmp_path):
    from llm2clip.pipeline.runner import Runner, Stage

    st = [Stage("a", {}, dict, estimate_s=100), Stage("b", {}, dict, estimate_s=100)]
    r = Runner(tmp_path, st)
    assert r._left(st) == pytest.approx(200)
    r.spent_est, r.spent_real = 100, 300  # this machine ran 3x slower than the priors
    assert r._left(st[1:]) == pytest.approx(100 * 360 / 160)


def test_runner_owns_only_an_empty_folder_or_its_own_run(tmp_path):
    from llm2clip.pipeline.runner import PIPELINE_MANIFEST, Runner, Stage

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(ConfigError, match="not an llm2clip run folder"):
        Runner(mine, [Stage("a", {}, dict)])
    assert (mine / "thesis.tex").read_text() == "x"
    run = tmp_path / "run"
    Runner(run, [Stage("a", {}, dict)]).run()
    assert (run / PIPELINE_MANIFEST).is_file()
    (run / f".{PIPELINE_MANIFEST}.tmp-123").write_text("{")  # a killed manifest write
    Runner(run, [Stage("a", {}, dict)])
    assert not list(run.glob(".*tmp-*"))


def test_quickstart_preset_is_valid_and_plans_the_paper_ablation():
    cfg = load_pipeline_config("quickstart")
    names = [s.name for s in build_stages(cfg)]
    assert names[:3] == ["data", "stage1/smollm2-cc", "stage1/smollm2-cc-bidir"] and names[-1] == "eval"
    assert {"stage1/smollm2-cc-bidir", "embed/smollm2-raw", "embed/smollm2-cc", "embed/minilm"} <= set(names)
    assert {v.name for v in cfg.variants} == {"clip-dense50", "smollm2-raw-dense50", "smollm2-cc-dense50",
                                             "smollm2-cc-bidir-dense50", "minilm-dense50", "smollm2-cc-dense0",
                                             "smollm2-cc-dense100"}
    # the run's CC teacher is causal (the study's winner); the paper's bidirectional setting is its own row
    assert not cfg.teacher_llm("smollm2-cc").bidirectional and cfg.teacher_llm("smollm2-cc-bidir").bidirectional
    assert np.isclose(cfg.variants[0].dense, 0.5)


def test_building_the_tiny_llm_leaves_the_global_rng_alone(tmp_path):
    """The smoke LLM is built lazily, inside stage 1, on a fresh cache: that must not change the run."""
    from llm2clip.text.tiny import make_tiny_llm

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_llm(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_fashion_mnist_variants_and_zero_shot_column(tmp_path):
    """With Fashion-MNIST files present, each teacher also trains on them and gets a zero-shot score."""
    from test_scenes import write_fake_fashion_mnist

    from llm2clip.eval.checkpoint import evaluate_checkpoint

    (tmp_path / "fm").mkdir()
    write_fake_fashion_mnist(tmp_path / "fm", n=30)
    cfg = smoke(tmp_path / "run")
    cfg.variants = cfg.variants[:3]  # clip, raw, cc at 50 %
    cfg.fashion_mnist = cfg.fashion_mnist.model_copy(update={
        "enabled": "on", "root": str(tmp_path / "fm"), "train": 24, "test": 20, "per_class": 3, "steps": 2,
        "teachers": ["clip", "llm-cc"]})
    res = run_pipeline(cfg)
    m = json.loads((tmp_path / "run" / PIPELINE_MANIFEST).read_text())
    assert {"train/fmnist-clip", "train/fmnist-llm-cc", "zeroshot"} <= set(m["stages"])
    zs = res["zeroshot"]
    assert set(zs) == {"clip", "llm-cc"}
    direct = evaluate_checkpoint(str(tmp_path / "run" / "train" / "fmnist-llm-cc" / "model"),
                                 [f"fashion-mnist={tmp_path / 'fm'}"], options={"fashion-mnist": {"count": 20}},
                                 progress=False)
    assert zs["llm-cc"]["top1"] == direct["results"][0]["metrics"]["top1"]
    by = {r["variant"]: r["zeroshot_top1"] for r in res["rows"]}
    assert by["llm-cc-dense50"] == zs["llm-cc"]["top1"] and by["llm-raw-dense50"] is None
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "Fashion-MNIST test photos" in md
    # the Fashion-MNIST captions went through the same teacher store as the scenes'
    from llm2clip.features import FeatureStore

    store = FeatureStore.open(tmp_path / "run" / "embed" / "llm-cc")
    assert store.get_by_ids(["fmnist-sneaker-short"]).shape == (1, store.dim)
    cfg.fashion_mnist = cfg.fashion_mnist.model_copy(update={"root": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match="no Fashion-MNIST files"):
        build_stages(cfg)


def test_pool_starts_each_stage_after_its_dependencies(tmp_path):
    """Pooled stages run `parallel` at a time, each only once every stage it reads from has finished."""
    import subprocess

    from llm2clip.pipeline.runner import Runner, Stage

    log = tmp_path / "log"

    def stage(name, deps, seconds):
        cmd = ["sh", "-c", f"echo start {name} >> {log}; sleep {seconds}; echo end {name} >> {log}"]
        return Stage(name, {"n": name}, subprocess.check_call, (cmd,), deps=deps, pooled=True)

    # "b" reads from "a" (slow); "c" and "d" are free: they run beside "a" instead of waiting for it
    stages = [Stage("z", {}, dict), stage("a", ["z"], 1.5), stage("b", ["a"], 0), stage("c", [], 0),
              stage("d", [], 0)]
    m = Runner(tmp_path / "run", stages, parallel=2).run()
    events = log.read_text().split("\n")
    assert events.index("end a") < events.index("start b")
    assert events.index("end c") < events.index("end a") and events.index("end d") < events.index("end a")
    assert all(m["stages"][s]["status"] == "done" for s in "abcdz")
