"""`llm2clip finetune-text CONFIG`: stage 1 from a YAML config."""

from __future__ import annotations

from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser(
        "finetune-text",
        help="stage 1: MNTP or caption-contrastive LoRA fine-tuning of the LLM",
        description=(
            "Fine-tune the caption encoder's LLM with LoRA: objective 'contrastive' (supervised SimCSE over caption "
            "groups: a query, a positive of its group, a random hard negative of another group; captions of the same "
            "group are never negatives) or 'mntp' (masked next-token prediction on plain text). Writes checkpoints, "
            "metrics.jsonl, adapter/ and encoder/ (merged weights + manifest, loadable by path) into `out`. A rerun "
            "resumes from the newest complete checkpoint (--no-resume starts over), and skips a finished run. "
            "Multi-process: "
            "torchrun --nproc_per_node=N -m llm2clip finetune-text CONFIG."
        ),
    )
    p.add_argument("config", type=Path, help="YAML config (see configs/stage1_cupl.yaml)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over from step 0: out's checkpoints and metrics.jsonl are cleared (a finished "
                        "run, one with encoder/, is still skipped)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from ..config import load_config
    from ..distributed import finish, init_from_env
    from ..fileio import lock_folder
    from .config import FinetuneConfig
    from .trainer import Stage1Trainer

    cfg = load_config(args.config, FinetuneConfig)
    if os.environ.get("RANK", "0") == "0":  # one writer of out; torchrun's other ranks write beside rank 0
        lock_folder(cfg.out, "llm2clip finetune-text")
    init_from_env(cfg.encoder.device)
    summary = Stage1Trainer(cfg).run(resume=not args.no_resume)
    from .contrastive import world

    if world()[0] == 0:
        print({k: v for k, v in summary.items()})
        print(f"caption encoder: {Path(cfg.out) / 'encoder'}")
    finish(0)
    return 0
