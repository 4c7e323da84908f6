"""The `llm2clip` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import Llm2ClipError

# Settings of the text-encoder comparison that `quickstart` runs until the full pipeline lands.
QUICKSTART_ENCODERS = [
    "random",
    "minilm",
    "smollm2:bidirectional=false",
    "smollm2:bidirectional=false,template=tokenizer",
    "smollm2",
    "smollm2:template=tokenizer",
    "smollm2:bidirectional=false,pooling=last_token",
]


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


def _add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="run the embedded default job",
        description=(
            "The main job on the embedded default. For now: the caption-encoder comparison (CRA of random "
            "vectors, all-MiniLM-L6-v2 and SmolLM2-135M-Instruct in causal/bidirectional, template, and "
            "pooling settings) on 200 held-out CuPL classes x 5 descriptions, with and without class-name "
            "masking. Writes a Markdown report and JSON to --out."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder (default runs/quickstart)")
    p.set_defaults(func=_run_quickstart)


def _run_quickstart(args) -> int:
    from .data.captions import cupl_caption_set
    from .eval.text_eval import markdown_table, score_encoders
    from .text.specs import parse_encoder_spec

    encoders = [(s, parse_encoder_spec(s)) for s in QUICKSTART_ENCODERS]
    sets = [cupl_caption_set("heldout", 200, 5, False), cupl_caption_set("heldout", 200, 5, True)]
    rows = score_encoders(encoders, sets)
    table = markdown_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_json(args.out / "cra.json", rows)
    (args.out / "report.md").write_text(
        "# llm2clip quickstart: caption encoders by CRA\n\n"
        "Pool: 200 held-out CuPL classes x 5 descriptions; each caption queries the other 999.\n\n" + table + "\n"
    )
    print(table)
    print(f"\nreport: {args.out / 'report.md'}")
    return 0


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _add_finetune(sub) -> None:
    from .finetune.cli import add_commands

    add_commands(sub)


def _add_features(sub) -> None:
    from .features.cli import add_commands

    add_commands(sub)


def _add_train(sub) -> None:
    from .train.cli import add_commands

    add_commands(sub)


# Each entry adds one subcommand; later stages register theirs here.
COMMANDS = [_add_quickstart, _add_eval_text, _add_finetune, _add_features, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2clip",
        description="LLM2CLIP: a decoder LLM fine-tuned into a caption encoder becomes CLIP's text teacher.",
    )
    parser.add_argument("--version", action="version", version=f"llm2clip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
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
