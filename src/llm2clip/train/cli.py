"""`llm2clip train CONFIG`: the stage-2 subcommand, registered by llm2clip.cli."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from pathlib import Path

EPILOG = """\
examples:
  llm2clip train configs/stage2-scenes.yaml    # continues from run_dir's newest checkpoint, if any
  llm2clip train run.yaml --no-resume           # start over (run_dir's checkpoints and metrics are cleared)
  llm2clip train run.yaml --resume runs/x/checkpoints/step_00000400
  torchrun --nproc_per_node=2 -m llm2clip train run.yaml     # DDP (gloo on CPU, nccl on GPU)
  llm2clip shards data/manifest.jsonl --out data/shards      # a manifest into webdataset tar shards

Data sources (data.train / data.val): scenes, manifest, fashion_mnist, and webdataset
({kind: webdataset, shards: data/shards}, a pattern like data/shards/train-{000000..000009}.tar, or URLs:
s3://, gs://, https://, file://, pipe:CMD through fsspec), streamed in a seeded order, each rank reading
its own shards; a resumed run continues at each rank's saved position (with the same number of
processes). train.strategy: fsdp shards parameters, gradients and optimizer state over the ranks
(FSDP2) for towers too large to replicate; its checkpoints are sharded (each rank writes its part into
dcp/) and resume on any number of processes.

The config is YAML with sections run_dir, seed, model (vision, text, embed_dim, loss), data (train,
val, features, caption_kinds), optim (lr, weight_decay, layer_decay, warmup_steps, grad_clip) and
train (batch_size, steps, accum_steps, precision, strategy, grad_checkpointing, checkpoint_every,
eval_every).
The run folder gets config.json, metrics.jsonl, checkpoints/ and the final model/ (safetensors +
llm2clip_model.json, which pins the caption encoder's identity). A rerun resumes from the newest
complete checkpoint in run_dir; --no-resume starts over.
"""


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train",
        help="stage 2: train a vision tower against stored caption embeddings",
        description=textwrap.fill(
            "Stage 2 of LLM2CLIP: the vision tower (small ViT, any open_clip model, or a transformers "
            "CLIP/SigLIP vision model) and a new head learn against the frozen LLM's stored caption "
            "embeddings through the MLP text adapter; the LLM never runs. With model.text.kind: clip the "
            "same data trains a plain CLIP text transformer instead (the vanilla-CLIP baseline).", 100),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG", help="YAML run config")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", nargs="?", const="latest", default="latest", metavar="CHECKPOINT",
                        help="resume from the given checkpoint folder (default, or with no value: the newest "
                             "checkpoint of run_dir, if any)")
    resume.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start over from step 0; run_dir's checkpoints and metrics.jsonl are cleared")
    p.add_argument("--run-dir", type=Path, help="override run_dir")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    import json

    from ..cli import set_from_flags
    from ..config import load_config
    from ..fileio import lock_folder
    from .config import RunConfig
    from .distributed import finish_and_exit, init_distributed
    from .loop import fit

    cfg = load_config(args.config, RunConfig)
    set_from_flags(cfg, {"--run-dir": ("run_dir", None if args.run_dir is None else str(args.run_dir)),
                         "--steps": ("train.steps", args.steps), "--device": ("train.device", args.device)})
    if os.environ.get("RANK", "0") == "0":  # one writer of run_dir; torchrun's other ranks write beside rank 0
        lock_folder(cfg.run_dir, "llm2clip train")
    di = init_distributed(cfg.train.device)
    try:
        last = fit(cfg, resume=args.resume, progress=False if args.no_progress else None, dist_info=di)
    except BaseException:
        if di.world > 1:
            # Say why on every rank, then leave at once: a barrier here would wait for ranks still training
            # until the process-group timeout; torchrun stops the others when one exits non-zero.
            print(f"[rank {di.rank}] stage 2 failed:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    if di.main:
        print(json.dumps(last, indent=2))
        print(f"model: {Path(cfg.run_dir) / 'model'}")
    if di.world > 1:  # docs/ASSETS.md: barrier + destroy + os._exit, or gloo may abort at exit
        finish_and_exit(0)
    return 0
