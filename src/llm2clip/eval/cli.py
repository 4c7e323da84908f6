"""`llm2clip eval CHECKPOINT`: a model on retrieval, zero-shot and CRA benchmarks, with a report.

Registered by llm2clip.cli through ``add_commands``; the engine is
llm2clip.eval.checkpoint.evaluate_checkpoint (also importable from here).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

# The built-in sets run when no --benchmark is given (kept equal to checkpoint.DEFAULT_BENCHMARKS,
# which this light module does not import: parsers are built without torch).
DEFAULT_BENCHMARKS = ("scenes-short", "scenes-dense", "cupl-cra", "fashion-mnist")


def evaluate_checkpoint(*args, **kwargs) -> dict:
    """llm2clip.eval.checkpoint.evaluate_checkpoint (imported on first use)."""
    from .checkpoint import evaluate_checkpoint as run

    return run(*args, **kwargs)


def caption_encoder_for(model_dir, override_spec=None):
    """llm2clip.eval.checkpoint.caption_encoder_for (imported on first use)."""
    from .checkpoint import caption_encoder_for as build

    return build(model_dir, override_spec)

EPILOG = """\
examples:
  llm2clip eval runs/x/model                                   # the built-in sets (CPU, no files)
  llm2clip eval runs/x/model -b scenes-dense -b coco=/data/coco -b urban1k=/data/Urban1k --out runs/x/eval
  llm2clip eval runs/x/model --caption-encoder smollm2 -b cupl-cra
  llm2clip eval open_clip:ViT-B-32:/weights/vit_b_32.pt -b flickr30k=/data/flickr30k   # a baseline
  llm2clip eval --list                                         # benchmarks and the files each expects

CHECKPOINT: a saved LLM2CLIP model folder (run_dir/model), or open_clip:NAME[:PRETRAINED] for an
open_clip model scored through its own text tower (random weights, seed 0, without PRETRAINED).

Benchmarks: NAME for the built-in sets (scenes-short, scenes-dense: 500 held-out generated scenes;
fashion-mnist: zero-shot on the Debian package's test split, skipped when absent; cupl-cra: model CRA
on 200 held-out CuPL classes x 5, the captions through the model's text path, adapter included, unlike
the run report's encoder CRA of the stored caption embeddings), NAME=DIR for a local copy of flickr30k,
coco, sharegpt4v, urban1k, docci, flickr30k-cn, coco-cn or imagenet. Default: the built-in sets.

The caption encoder of an LLM2CLIP model (raw captions -> embeddings for the adapter) comes from
--caption-encoder, else the model's manifest, else the run config beside run_dir/model (its encoder,
or its feature store's), as llm2clip.load finds it; its identity must match the one the model was
trained with. Specs: smollm2[:key=value,...], minilm, a saved encoder folder, a YAML file with an
`encoder:` mapping, or bow[:dim=N,seed=S].

Writes results.json (model and data identity, annotation hashes), report.md (R@1 I2T / T2I per
benchmark, as the paper's tables), recall_curves.png and r1_bars.png to --out (default run_dir/eval),
and prints the table.
"""


def _option(text: str) -> tuple[str, str, object]:
    import yaml

    from ..errors import InputError

    target, eq, value = text.partition("=")
    bench, dot, key = target.partition(".")
    if not eq or not dot or not bench or not key:
        raise InputError(f"--option {text!r}: expected NAME.KEY=VALUE, e.g. coco.image_root=/data/coco/images")
    return bench.strip().lower(), key.strip(), yaml.safe_load(value)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: image-text retrieval, zero-shot, CRA; JSON, Markdown and plots",
        description=textwrap.fill(
            "Evaluate a saved LLM2CLIP model (or an open_clip baseline) on image-text retrieval (I2T and "
            "T2I R@K, any number of captions per image), zero-shot classification and caption retrieval "
            "accuracy, through the model's own text path. Prints the R@1 table and writes a report.", 100),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="run_dir/model or open_clip:NAME[:PRETRAINED]")
    p.add_argument("--benchmark", "-b", action="append", metavar="NAME[=DIR]",
                   help=f"repeatable (default: {' '.join(DEFAULT_BENCHMARKS)})")
    p.add_argument("--caption-encoder", metavar="SPEC", help="the caption encoder for raw captions (LLM2CLIP models)")
    p.add_argument("--out", type=Path, help="report folder (default: run_dir/eval, or runs/eval/<name>)")
    p.add_argument("--name", help="the model's row label in the table")
    p.add_argument("--scenes-count", type=int, metavar="N", help="scene sets: images (default 500)")
    p.add_argument("--render-size", type=int, metavar="PX",
                   help="scene sets: render size (default: the run's training scenes, else the tower's input size)")
    p.add_argument("--fashion-count", type=int, metavar="N",
                   help="fashion-mnist: the first N test images (default all)")
    p.add_argument("--zeroshot-prompts", choices=("both", "templates", "cupl"),
                   help="zero-shot class weights from CLIP templates, CuPL descriptions, or both "
                        "(default: both for fashion-mnist, templates for imagenet)")
    p.add_argument("--cra-classes", type=int, metavar="N", help="cupl-cra: held-out classes (default 200)")
    p.add_argument("--cra-per-class", type=int, metavar="N", help="cupl-cra: descriptions per class (default 5)")
    p.add_argument("--cra-mask-class-names", action="store_true", help="cupl-cra: replace class names by 'X'")
    p.add_argument("--option", "-o", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="any loader option, e.g. coco.image_root=/data/coco/images (repeatable)")
    p.add_argument("--on-missing", choices=("error", "skip"), default="error",
                   help="folder benchmarks: a missing or undecodable image is an error (default) or dropped "
                        "with its captions and listed in the results")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image decoding worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the benchmarks and the files each expects, then exit")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from ..errors import InputError
    from .checkpoint import default_out_dir
    from .registry import REGISTRY, describe_benchmarks
    from .report import markdown_table

    if args.list:
        print(describe_benchmarks())
        return 0
    if not args.checkpoint:
        raise InputError("eval: give a CHECKPOINT (run_dir/model or open_clip:NAME[:PRETRAINED]), or --list")
    options: dict[str, dict] = {}

    def put(bench: str, key: str, value) -> None:
        if value is not None:
            options.setdefault(bench, {})[key] = value

    for b in ("scenes-short", "scenes-dense"):
        put(b, "count", args.scenes_count)
        put(b, "render_size", args.render_size)
    put("fashion-mnist", "count", args.fashion_count)
    put("cupl-cra", "classes", args.cra_classes)
    put("cupl-cra", "per_class", args.cra_per_class)
    put("cupl-cra", "mask_class_names", True if args.cra_mask_class_names else None)
    benches = args.benchmark or list(DEFAULT_BENCHMARKS)
    if args.on_missing == "skip":
        for b in benches:
            name = b.partition("=")[0].strip().lower()
            if name in REGISTRY and not REGISTRY[name].builtin:
                put(name, "on_missing", "skip")
    for text in args.option:
        bench, key, value = _option(text)
        put(bench, key, value)
    out = args.out or default_out_dir(args.checkpoint)
    run = evaluate_checkpoint(args.checkpoint, benches, out, name=args.name, caption_encoder=args.caption_encoder,
                              options=options, zeroshot_prompts=args.zeroshot_prompts, batch_size=args.batch_size,
                              device=args.device, precision=args.precision, num_workers=args.workers,
                              on_bad_image=args.on_missing, progress=False if args.no_progress else None)
    print(markdown_table(run))
    for s in run["skipped"]:
        print(f"skipped {s['benchmark']}: {s['reason']}")
    print(f"\nreport: {run['outputs']['markdown']}\nresults: {run['outputs']['json']}")
    return 0
