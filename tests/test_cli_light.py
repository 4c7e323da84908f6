"""The command line starts without the heavy libraries: `llm2clip --help` and every subcommand's help
build the parser and print without importing torch, torchvision, transformers or numpy."""

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "transformers", "numpy", "open_clip", "faiss", "PIL")

# Run in a fresh interpreter: this test process has long imported torch for other tests.
SCRIPT = f"""
import contextlib, io, json, sys
import llm2clip.cli as cli

parser = cli.build_parser()
action = next(a for a in parser._actions if a.dest == "command")
codes = {{}}
for argv in [["--help"]] + [[name, "--help"] for name in action.choices]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main(argv)
        except SystemExit as e:
            codes[" ".join(argv)] = (e.code, len(out.getvalue().splitlines()))
print(json.dumps({{"codes": codes, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_help_imports_nothing_heavy():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got["codes"]) > 10  # the main help and every subcommand's
    for argv, (code, lines) in got["codes"].items():
        assert code == 0 and lines > 5, (argv, code, lines)
    assert got["loaded"] == [], f"--help imported {got['loaded']}"


def test_package_names_still_resolve():
    # The lazy package __init__s keep every public name reachable (and unknown names an AttributeError).
    import importlib

    for pkg in ("pipeline", "train", "vision", "convert", "text", "features", "eval", "search"):
        mod = importlib.import_module(f"llm2clip.{pkg}")
        for name in mod.__all__:
            if name != "add_commands":
                assert getattr(mod, name) is not None, (pkg, name)
        assert not hasattr(mod, "no_such_name")  # an AttributeError, as before
