"""The `llm2clip` command."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import Llm2ClipError


def _add_eval_text(sub) -> None:
    p = sub.add_parser(
        "eval-text",
        help="score text encoders by caption retrieval accuracy (CRA)",
        description=(
            "Score one or more text encoders by CRA: every caption of the pool queries all others; a hit at K "
            "when one of the top K shares its group. Prints a table with R@K and the pool size."
        ),
        epilog=(
            "encoders: a preset (smollm2, minilm, random) with optional overrides, e.g. "
            "'smollm2:bidirectional=false,template=tokenizer,pooling=last_token', or a YAML file with an "
            "'encoder:' mapping. caption sets: cupl-heldout, cupl-train, or an image manifest (JSONL or CSV; the "
            "captions of one image form a group; older JSONL of {\"group\": ..., \"caption\": ...} still reads)."
        ),
    )
    p.add_argument("--encoder", "-e", action="append", required=True, help="encoder spec (repeatable)")
    p.add_argument("--captions", "-c", action="append", default=None,
                   help="caption set (repeatable; default cupl-heldout)")
    p.add_argument("--mask-class-names", action="store_true", help="CuPL: replace class names by 'X'")
    p.add_argument("--classes", type=at_least(2), default=200, help="CuPL: number of classes (default 200)")
    p.add_argument("--per-class", type=at_least(2), default=5, help="CuPL: descriptions per class (default 5)")
    p.add_argument("-k", type=at_least(1), nargs="+", default=[1, 5, 10], help="K values (default 1 5 10)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.set_defaults(func=_run_eval_text)


def at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` >= ``low`` (0 is a value to check, never a flag left out)."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            n = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is below the least value {low}")
        return n

    parse.__name__ = f"{what.split()[-1]} >= {low}"
    return parse


def _run_eval_text(args) -> int:
    from .data.captions import caption_set_from_name
    from .eval.text_eval import markdown_table, score_encoders
    from .text.specs import parse_encoder_spec

    encoders = [(spec, parse_encoder_spec(spec)) for spec in args.encoder]  # validate all before work
    sets = [caption_set_from_name(c, args.mask_class_names, args.classes, args.per_class)
            for c in (args.captions or ["cupl-heldout"])]
    rows = score_encoders(encoders, sets, args.k)
    print(markdown_table(rows, args.k))
    if args.out:
        _write_json(args.out, rows)
        print(f"wrote {args.out}")
    return 0


def _write_json(path: Path, obj) -> None:
    from .fileio import write_json_atomic

    write_json_atomic(path, obj)


# Subcommands in --help order: this module's own, and the modules whose add_commands(sub) registers theirs.
COMMANDS = ["pipeline.cli", "eval.cli", _add_eval_text, "finetune.cli", "features.cli", "data.cli", "train.cli",
            "search", "serve.cli", "convert.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2clip",
        description="LLM2CLIP: a decoder LLM fine-tuned into a caption encoder becomes CLIP's text teacher.",
    )
    parser.add_argument("--version", action="version", version=f"llm2clip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in COMMANDS:
        add = entry if callable(entry) else importlib.import_module(f"{__package__}.{entry}").add_commands
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[llm2clip] %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (Llm2ClipError, OSError, ValueError, ModuleNotFoundError) as err:
        # ValueError holds pydantic's ValidationError and json's JSONDecodeError; a missing module, an extra
        msg = error_line(err)
        if args.debug or msg is None:
            raise
        print(f"llm2clip: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("llm2clip: interrupted: run the same command again to resume", file=sys.stderr)
        return 130


def error_line(err: BaseException) -> str | None:
    """One line for an error the user can act on; None for a bug (its traceback is shown)."""
    from pydantic import ValidationError

    from .extras import missing_extra

    if isinstance(err, Llm2ClipError):
        return str(err)
    if isinstance(err, ModuleNotFoundError):
        extra = missing_extra(err.name or "")
        return None if extra is None else str(extra)
    if isinstance(err, OSError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        what = err.strerror or str(err)
        hint = " (free some space and rerun: finished parts are kept)" if err.errno in (errno.ENOSPC,
                                                                                        errno.EDQUOT) else ""
        return f"{where}: {what}{hint}" if where else f"{what}{hint}"
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        return f"{err.title}: {loc + ': ' if loc else ''}{first['msg']}{more}"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON: {err} (--debug shows which file)"
    return None


def set_from_flags(cfg, flags: dict[str, tuple[str, object]]):
    """Set config fields from command-line flags, validated as the same fields in a config file: ``flags``
    maps a flag to (dotted field, value); None is a flag not given, while 0 is a value."""
    from pydantic import ValidationError

    from .errors import ConfigError

    for flag, (field, value) in flags.items():
        if value is None:
            continue
        *parents, name = field.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        try:
            setattr(obj, name, value)
        except ValidationError as err:
            raise ConfigError(f"{flag} {value}: {err.errors()[0]['msg']} (as the config's {field})") from None
    return cfg


if __name__ == "__main__":
    sys.exit(main())
