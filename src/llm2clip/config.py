"""Typed, validated YAML configs.

A config is a pydantic model with ``extra="forbid"``: an unknown field, a wrong type or a
bad value is reported with the file, the line and the dotted field name before any work
starts.

Paths: a relative path in a config file is relative to the folder of that file, whatever the working
directory (so a config travels with its data). A config built in code, and a value set after loading
(a command-line override such as ``--run-dir``), is used as given: relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _child(node: yaml.Node | None, key) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        return next((v for k, v in node.value if getattr(k, "value", None) == str(key)), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return node.value[key]
    return None


def _locate(root: yaml.Node | None, loc: tuple) -> tuple[int | None, str]:
    """(line, dotted field name) of an error location in the YAML tree.

    Pydantic puts the tag of a discriminated union into ``loc`` (``encoder.llm.pooling``); a
    part that is no key at its level while the next part is, is such a tag and is dropped.
    """
    node, line, shown = root, (root.start_mark.line + 1 if root is not None else None), []
    for i, key in enumerate(loc):
        nxt = _child(node, key)
        if nxt is None and i + 1 < len(loc) and _child(node, loc[i + 1]) is not None:
            continue
        shown.append(str(key))
        if nxt is not None:
            node, line = nxt, nxt.start_mark.line + 1
        else:
            node = None
    return line, ".".join(shown)


def format_validation_error(err: ValidationError, source: str, root: yaml.Node | None = None) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        line, field = _locate(root, tuple(e["loc"]))
        where = f"{source}:{line}" if line else source
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        lines.append(f"  {where}: {field or '(top level)'}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_config(data: Any, cls: type[T], source: str = "<config>", root: yaml.Node | None = None) -> T:
    try:
        return cls.model_validate(data if data is not None else {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, root)) from None


def load_config(path: str | Path, cls: type[T], base: str | Path | None = None) -> T:
    """The config in ``path``, its relative paths resolved against ``base`` (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of fields, got {type(data).__name__}")
    cfg = parse_config(data, cls, str(path), root)
    resolve_config_paths(cfg, path.parent if base is None else Path(base))
    return cfg


def resolve_path(p: str | None, base: Path) -> str | None:
    """``p`` relative to ``base`` unless absolute (``~`` expanded); None stays None."""
    if p is None:
        return None
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else Path(base) / q)


def resolve_config_paths(cfg: BaseModel, base: Path) -> None:
    """Resolve the relative paths of a loaded config against ``base``, each exactly once.

    A config with a ``resolve_paths(base)`` method fixes its own path fields and those of the configs
    inside it (resolving one twice would put the folder in front twice); one without is walked into,
    through lists and dict values too.
    """
    hook = getattr(cfg, "resolve_paths", None)
    if callable(hook):
        hook(base)
        return
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                resolve_config_paths(item, base)

