"""Experiment logging: TensorBoard (read back with its own event reader) and wandb (offline, when
installed) receive the rows metrics.jsonl gets, in stage 1 and stage 2."""

import json
import sys

import pytest
from stage2_helpers import run_cfg

from llm2clip.errors import ConfigError
from llm2clip.tracking import INSTALL_HINT, LoggingConfig, Tracker, scalars
from llm2clip.train.loop import fit


def _events(folder) -> dict:
    """tag -> {step: value}, read with TensorBoard's own reader."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def _rows(path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_scalars_flatten_nested_rows_and_drop_what_is_not_a_number():
    row = {"step": 3, "loss": 1.5, "eval": {"dense/t2i_R@1": 0.25, "n": 16}, "final": True, "name": "x",
           "images_per_s": None, "tokens": 7}
    assert scalars(row) == {"loss": 1.5, "eval/dense/t2i_R@1": 0.25, "eval/n": 16.0, "tokens": 7.0}


def test_stage2_run_logs_the_metrics_rows_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = run_cfg(tmp_path / "run", train__steps=3, logging={"tensorboard": True})
    fit(cfg, progress=False)
    ev = _events(tmp_path / "run" / "tensorboard")
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        for key in ("loss", "lr", "logit_scale", "skipped_images"):
            assert ev[key][r["step"]] == pytest.approx(r[key], rel=1e-6)
    final_eval = next(r for r in rows if "eval" in r)["eval"]
    assert ev["eval/dense/t2i_R@1"][3] == pytest.approx(final_eval["dense/t2i_R@1"], rel=1e-6)


def test_stage2_without_logging_writes_no_event_files(tmp_path):
    fit(run_cfg(tmp_path / "run", train__steps=1), progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_stage1_run_logs_the_metrics_rows_to_tensorboard(tiny_llm_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from llm2clip.finetune.config import FinetuneConfig
    from llm2clip.finetune.trainer import Stage1Trainer

    groups = tmp_path / "groups.jsonl"
    groups.write_text("".join(json.dumps({"group": f"{c}-{o}", "captions": [f"a {c} {o}", f"the {o} is {c}"]}) + "\n"
                              for c in ("red", "green", "blue") for o in ("dog", "cat", "bus")))
    cfg = FinetuneConfig(encoder={"model": str(tiny_llm_dir)}, out=str(tmp_path / "s1"),
                         data={"cupl_train": False, "groups": [str(groups)]}, contrastive={"batch_size": 4},
                         optim={"steps": 3, "precision": "fp32", "warmup_steps": 1}, eval={"cupl_classes": 4,
                                                                                            "per_class": 2},
                         save_every=10, logging={"tensorboard": True})
    Stage1Trainer(cfg, progress=False).run()
    ev = _events(tmp_path / "s1" / "tensorboard")
    rows = [r for r in _rows(tmp_path / "s1" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert ev["loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert ev["lr"][r["step"]] == pytest.approx(r["lr"], rel=1e-6)
    assert "cra_R@1" in ev  # the final evaluation row
    card = (tmp_path / "s1" / "encoder" / "README.md").read_text()
    assert "## Identity" in card and "contrastive" in card


def test_wandb_offline_receives_the_rows(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (optional: pip install 'llm2clip[logging]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = run_cfg(tmp_path / "run", train__steps=2, logging={"wandb": {"project": "llm2clip-test", "mode": "offline"}})
    fit(cfg, progress=False)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("missing,cfg", [("torch.utils.tensorboard", {"tensorboard": True}),
                                         ("wandb", {"wandb": {"project": "p"}})])
def test_a_missing_package_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch, missing, cfg):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as err:
        Tracker(LoggingConfig(**cfg), tmp_path)
    assert INSTALL_HINT in str(err.value) and "\n" not in str(err.value)


def test_logging_is_part_of_both_configs():
    from llm2clip.finetune.config import FinetuneConfig
    from llm2clip.train.config import RunConfig

    assert "logging" in RunConfig.model_fields and "logging" in FinetuneConfig.model_fields
    with pytest.raises(ValueError):
        LoggingConfig(tensorbord=True)  # a typo is an error, as everywhere in the configs
