"""The command line: help texts, eval-text end to end on small inputs, clear errors."""

import json

import pytest

from llm2clip.cli import build_parser, main


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def test_help_of_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in subcommands():
        assert name in out
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert len(capsys.readouterr().out.splitlines()) > 5


def test_every_stage_of_the_method_has_its_command():
    assert set(subcommands()) == {"run", "quickstart", "eval", "eval-text", "finetune-text", "embed", "features",
                                  "shards", "train", "index", "search", "convert", "export", "serve"}


def _captions(tmp_path):
    f = tmp_path / "caps.jsonl"
    rows = [{"group": g, "caption": f"{c} {g}"} for g in ("dog", "cat", "car") for c in ("a photo of a", "one")]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    return f


def test_eval_text_random_and_tiny_llm(tmp_path, tiny_llm_dir, capsys):
    enc_yaml = tmp_path / "enc.yaml"
    enc_yaml.write_text(f"encoder:\n  kind: llm\n  model: {tiny_llm_dir}\n  pooling: mean\n")
    out = tmp_path / "res.json"
    assert main(["eval-text", "-e", "random:dim=8", "-e", str(enc_yaml), "-c", str(_captions(tmp_path)),
                 "-k", "1", "3", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| random:dim=8 | caps |" in table and "R@3" in table
    rows = json.loads(out.read_text())
    assert [r["encoder"] for r in rows] == ["random:dim=8", str(enc_yaml)]
    assert all(r["pool_size"] == 6 and r["queries"] == 6 for r in rows)
    assert rows[1]["identity"]["bidirectional"] is True


def test_eval_text_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval-text", "-e", "smollm2:pooling=median", "-c", str(_captions(tmp_path))]) == 2
    assert "pooling" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"group": 1, "caption": "x"}\n{"group": 1}\n')
    assert main(["eval-text", "-e", "random", "-c", str(bad)]) == 2
    assert "bad.jsonl:2: missing field 'caption'" in capsys.readouterr().err
