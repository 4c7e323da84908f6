"""The stage-1 study script (benchmarks/stage1_study.py) end to end in its --tiny mode."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("stage1_study", REPO / "benchmarks" / "stage1_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_override_only_what_they_name(tmp_path):
    S = _study()
    base, _ = S.row_config("bidir-top2", tmp_path, tiny=False)
    causal, none = S.row_config("causal-top8", tmp_path, tiny=False)
    assert none is None and base["encoder"]["bidirectional"] is True and causal["encoder"]["bidirectional"] is False
    assert (base["lora"]["top_layers"], causal["lora"]["top_layers"]) == (2, 8)
    diff = {k for k in base if base[k] != causal[k]}
    assert diff == {"encoder", "lora", "out"}
    cc, mntp = S.row_config("bidir-mntp-top8", tmp_path, tiny=False)
    assert mntp["objective"] == "mntp" and mntp["lora"]["top_layers"] is None
    assert cc["encoder"]["adapters"] == [str(tmp_path / "bidir-mntp-top8" / "mntp" / "adapter")]


def test_tiny_study_trains_rows_and_writes_the_report(tmp_path):
    S = _study()
    out, report = tmp_path / "runs", tmp_path / "STUDY.md"
    S.main(["--tiny", "--rows", "bidir-top2,bidir-mntp-top8", "--report", "--out-dir", str(out), "--out",
            str(report), "--precision", "bidir-top2", "--threads", "1"])
    text = report.read_text()
    assert "| bidir-top2 |" in text and "| bidir-mntp-top8 |" in text and "SmolLM2 raw, causal" in text
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["row"]: r for r in json.loads((out / "study.json").read_text())}
    assert rows["bidir-mntp-top8"]["mntp_s"] > 0 and rows["bidir-top2"]["mntp_s"] == 0  # the MNTP pass is counted
    assert (out / "bidir-mntp-top8" / "mntp" / "adapter").is_dir()
    for r in rows.values():
        assert 0 <= r["cupl_R@1"] <= 1 and 0 <= r["scene_R@1"] <= 1 and r["steps"] == 4
        assert [c[0] for c in r["curve"]] == sorted(c[0] for c in r["curve"])  # wall time only grows
    # the trainer's final CRA (frozen-trunk path) equals CRA of the exported encoder, recomputed (fp32)
    prec = json.loads((out / "precision-bidir-top2.json").read_text())
    assert prec["cupl_R@1_fp32"] == pytest.approx(rows["bidir-top2"]["cupl_R@1"])
    # a rerun skips finished rows
    S.main(["--tiny", "--rows", "bidir-top2", "--out-dir", str(out), "--out", str(report)])
    assert len(json.loads((out / "bidir-top2" / "cc" / "summary.json").read_text())) > 0
