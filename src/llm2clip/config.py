"""Typed, validated YAML configs.

A config is a pydantic model with ``extra="forbid"``: an unknown field, a wrong type or a
bad value is reported with the file, the line and the dotted field name before any work
starts.
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


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of its deepest existing parent."""
    line = None if node is None else node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        if nxt is None:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line


def format_validation_error(err: ValidationError, source: str, root: yaml.Node | None = None) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        lines.append(f"  {where}: {field}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_config(data: Any, cls: type[T], source: str = "<config>", root: yaml.Node | None = None) -> T:
    try:
        return cls.model_validate(data if data is not None else {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, root)) from None


def load_config(path: str | Path, cls: type[T]) -> T:
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
    _resolve_paths(cfg, path.parent)
    return cfg


def _resolve_paths(cfg: BaseModel, base: Path) -> None:
    """Relative paths in a config are relative to the config file, so configs travel."""
    hook = getattr(cfg, "resolve_paths", None)
    if callable(hook):
        hook(base)
