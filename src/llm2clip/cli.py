"""The `llm2clip` command."""

from __future__ import annotations

import argparse
import importlib
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
            "'encoder:' mapping. caption sets: cupl-heldout, cupl-train, or a JSONL file of "
            '{"group": ..., "caption": ...} lines.'
        ),
    )
    p.add_argument("--encoder", "-e", action="append", required=True, help="encoder spec (repeatable)")
    p.add_argument("--captions", "-c", action="append", default=None,
                   help="caption set (repeatable; default cupl-heldout)")
    p.add_argument("--mask-class-names", action="store_true", help="CuPL: replace class names by 'X'")
    p.add_argument("--classes", type=int, default=200, help="CuPL: number of classes (default 200)")
    p.add_argument("--per-class", type=int, default=5, help="CuPL: descriptions per class (default 5)")
    p.add_argument("-k", type=int, nargs="+", default=[1, 5, 10], help="K values (default 1 5 10)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.set_defaults(func=_run_eval_text)


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
    except Llm2ClipError as err:
        print(f"llm2clip: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
