"""Packaging (issue 16): the light core never imports an extra's package at module level, a missing extra is a
one-line message naming it, one version source, the license and py.typed shipped."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import llm2clip
from llm2clip.cli import main
from llm2clip.extras import EXTRA_OF, MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# What `pip install llm2clip` is for: load a model, encode captions and images, embed caption stores, evaluate,
# and the command line's parser. These and every module they import at module level form the core.
CORE_ROOTS = ["llm2clip", "llm2clip.api", "llm2clip.cli", "llm2clip.model", "llm2clip.text.encoder",
              "llm2clip.features.extract", "llm2clip.features.store", "llm2clip.eval.checkpoint",
              "llm2clip.eval.cli"]
# The only modules that may import an extra's package at module level: they are that extra.
EXTRA_MODULES = {"llm2clip.serve.app": "serve"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (SRC / "llm2clip").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


def _module_level_imports(name: str, path: Path) -> set[str]:
    """Absolute names imported when the module runs (function bodies excluded; class bodies run at import)."""
    is_pkg = path.name == "__init__.py"
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` may import a module
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for field in ("body", "orelse", "handlers", "finalbody"):
                visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _module_level_imports(m, p) for m, p in mods.items()}


def _closure(roots: list[str], graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a module's packages run first
        todo += [i for i in graph[m] if i.startswith("llm2clip")]
    return seen


def test_core_never_imports_an_extra_at_module_level():
    graph = _graph()
    core = _closure(CORE_ROOTS, graph)
    assert {"llm2clip.api", "llm2clip.fileio", "llm2clip.text.encoder"} <= core
    assert not core & set(EXTRA_MODULES), "the core imports an extra's module"
    bad = {m: sorted(i for i in imports if i.split(".")[0] in EXTRA_OF)
           for m, imports in graph.items() if m not in EXTRA_MODULES}
    assert {m: v for m, v in bad.items() if v} == {}, "import these inside the functions that need them"


def test_core_and_the_parser_load_with_every_extra_missing():
    script = (f"import sys\nfor m in {sorted(EXTRA_OF)!r}: sys.modules[m] = None\n"
              "import llm2clip.api, llm2clip.eval.checkpoint, llm2clip.features.extract\n"
              "import llm2clip.cli as cli\ncli.build_parser()\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_a_missing_extra_names_it(monkeypatch, capsys):
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, extra in EXTRA_OF.items():
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(MissingExtraError) as e:
            require(module, "this feature")
        msg = str(e.value)
        assert "\n" not in msg and f"'{module}'" in msg
        if extra:
            assert extra in extras and f"pip install 'llm2clip[{extra}]'" in msg
    assert require("json") is json

    from llm2clip import cli

    def add(sub):
        def run(args):
            import faiss  # noqa: F401

        sub.add_parser("needs-faiss").set_defaults(func=run)

    monkeypatch.setattr(cli, "COMMANDS", [add])
    assert main(["needs-faiss"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "pip install 'llm2clip[search]'" in err


def test_extras_all_and_dev_hold_every_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    named = {"train", "search", "serve", "export", "logging", "remote"}
    assert named | {"all", "dev"} == set(extras)
    assert extras["all"] == [f"llm2clip[{','.join(sorted(named, key=list(extras).index))}]"]
    assert "llm2clip[all]" in extras["dev"]
    core = " ".join(PYPROJECT["project"]["dependencies"])
    for dist in ("faiss", "fastapi", "onnx", "webdataset", "matplotlib", "tensorboard"):
        assert dist not in core, f"{dist} belongs in an extra"


def test_one_version_source(capsys):
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llm2clip.__version__"}
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"llm2clip {importlib.metadata.version('llm2clip')}"
    assert importlib.metadata.version("llm2clip") == llm2clip.__version__


def test_license_and_py_typed_are_shipped():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the llm2clip authors" in text
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    assert (SRC / "llm2clip" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["llm2clip"]
