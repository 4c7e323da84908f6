"""`llm2clip run CONFIG` and `llm2clip quickstart`: the subcommands of the whole pipeline."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

STAGES_HELP = """\
stages (each writes into its own folder of the run folder; manifest.json says what was made from what):
  data        scene captions to embed, and scene caption pairs for stage 1
  stage1/T    caption-contrastive LoRA fine-tuning of the LLM for fine-tuned teacher T (CuPL classes + scene pairs)
  embed/T     every caption embedded once by text teacher T (a feature store)
  train/V     stage 2 of variant V: the vision tower against teacher V's embeddings (or a CLIP text tower)
  eval        CRA of every teacher; short / dense retrieval of every variant on held-out scenes
then report/report.md (table, the paper's claims checked, PNG plots, timings, versions, config).

A rerun skips finished stages whose inputs are unchanged and resumes an interrupted one from its
checkpoints or shards; a stage whose inputs changed is redone, and so is everything after it.
presets: quickstart (SmolLM2-135M-Instruct, all-MiniLM-L6-v2, 15 to 20 minutes on 2 cores),
smoke (tiny random models, well under a minute).
"""


def add_commands(sub) -> None:
    p = sub.add_parser(
        "run", help="the whole method from one config: stage 1, embeddings, stage 2 variants, eval, report",
        description=textwrap.fill(
            "Run LLM2CLIP end to end and compare text teachers as the paper's ablations do: each variant trains "
            "the same vision tower on the same data and steps with a different text side (a CLIP text "
            "transformer, the raw LLM, the CC-fine-tuned LLM, a sentence encoder) and dense-caption share.", 100),
        epilog=STAGES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML pipeline config (its relative paths: to its folder), or a preset name "
                                  "(quickstart, smoke; its run_dir: to the working directory)")
    _common(p)
    p.set_defaults(func=_run)

    q = sub.add_parser(
        "quickstart", help="the main job: the shipped default pipeline (llm2clip run quickstart)",
        description=textwrap.fill(
            "The embedded default: SmolLM2-135M-Instruct fine-tuned by caption contrast (stage 1), every "
            "caption embedded once, a small ViT trained from scratch on generated scenes against each text "
            "side (seven variants), evaluated on held-out scenes, and a report comparing them (15 to 20 minutes on "
            "2 cores).", 100),
        epilog=STAGES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--preset", default="quickstart", help="quickstart (default) or smoke (tiny random models)")
    _common(q)
    q.set_defaults(func=_quickstart)


def _common(p) -> None:
    p.add_argument("--run-dir", type=Path, help="override run_dir (relative to the working directory; default: "
                                                 "the config's)")
    p.add_argument("--parallel", type=int, help="stages at once (one process and one thread each)")
    p.add_argument("--threads", type=int, help="torch CPU threads of single-process stages")


def _apply(cfg, args):
    from ..cli import set_from_flags

    return set_from_flags(cfg, {"--run-dir": ("run_dir", None if args.run_dir is None else str(args.run_dir)),
                                "--parallel": ("parallel", args.parallel), "--threads": ("threads", args.threads)})


def _run(args) -> int:
    from . import load_pipeline_config, run_pipeline

    cfg = _apply(load_pipeline_config(args.config), args)
    run_pipeline(cfg, str(args.config))
    return 0


def _quickstart(args) -> int:
    from . import load_pipeline_config, run_pipeline

    cfg = _apply(load_pipeline_config(args.preset), args)
    run_pipeline(cfg, f"preset {args.preset}")
    return 0
