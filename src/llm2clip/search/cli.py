"""`llm2clip index` and `llm2clip search`: registered by llm2clip.cli through ``add_commands``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

INDEX_EPILOG = """\
examples:
  llm2clip index photos/ --model runs/stage2-scenes/model --out photos.index
  llm2clip index photos/ --model M --out photos.index --hnsw          # approximate, for millions of images
  llm2clip index photos/ --model M --out photos.index --device cuda --precision bf16 --workers 8

  llm2clip index add photos.index more_photos/                      # add new images to a finished index

A killed run continues where it stopped when rerun with the same arguments (embeddings are written in
atomic chunks). Unreadable files are skipped, printed, and listed in INDEX/skipped.txt.
`index add` embeds only the images the index does not hold yet, builds the new version beside INDEX and
swaps it in whole: a running `llm2clip serve` picks it up without a restart.
"""

SEARCH_EPILOG = """\
examples:
  llm2clip search photos.index "a small red circle in the top left corner" -k 5
  llm2clip search photos.index --image query.png -k 5 --json

The index's own model is used (its path is in INDEX/manifest.json); --model must name the same model.
Scores are cosine similarities of L2-normalised embeddings.
"""


def add_commands(sub) -> None:
    p = sub.add_parser("index", help="embed a folder of images into a searchable index",
                       description="Embed every image under IMAGES_DIR (recursively) with an LLM2CLIP model into a "
                                   "faiss index (flat inner product, or HNSW with --hnsw).",
                       usage="llm2clip index IMAGES_DIR --model M --out INDEX [options]\n"
                             "       llm2clip index add INDEX DIR [--model M] [options]",
                       epilog=INDEX_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # One positional list, so `index add INDEX DIR` sits beside the original `index IMAGES_DIR` form.
    p.add_argument("paths", nargs="+", metavar="IMAGES_DIR", help="the image folder (or: add INDEX DIR)")
    p.add_argument("--model", "-m", type=Path, help="a saved model folder (run_dir/model); for add: default the "
                                                    "index's own")
    p.add_argument("--out", "-o", type=Path, metavar="INDEX", help="index folder to write")
    p.add_argument("--hnsw", action="store_true", help="HNSW graph (approximate, fast on large sets)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (default 32)")
    p.add_argument("--ef-construction", type=int, default=80, help="HNSW build breadth (default 80)")
    p.add_argument("--ef-search", type=int, default=64, help="HNSW search breadth stored as default (64)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk (default 1024)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    _model_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_index)

    s = sub.add_parser("search", help="search an image index by text or by image",
                       description="Print the top K images of INDEX for a text query (through the model's caption "
                                   "encoder) or for a query image.",
                       epilog=SEARCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("index", type=Path, metavar="INDEX")
    s.add_argument("query", nargs="?", help="text query (or use --image)")
    s.add_argument("--image", type=Path, help="query with this image instead of a text")
    s.add_argument("-k", type=int, default=10, help="results to print (default 10)")
    s.add_argument("--model", "-m", type=Path, help="the model folder (default: the one in the index manifest)")
    s.add_argument("--ef-search", type=int, help="HNSW search breadth (default: the index's)")
    s.add_argument("--caption-encoder", help="caption-encoder spec overriding the model's record (e.g. smollm2)")
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    _model_args(s)
    s.set_defaults(func=run_search)


def _model_args(p) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N (default auto)")
    # --dtype: the old name, kept working
    p.add_argument("--precision", "--dtype", dest="precision", default=None,
                   choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="model weights' precision (default fp32)")


def _print_skipped(skipped, where: Path) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) (listed in {where}):")
        for rel, why in skipped[:20]:
            print(f"  {rel}: {why}")
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more")


def run_index(args) -> int:
    from ..errors import InputError
    from .index import SKIPPED_FILE, add_to_index, build_index

    if args.paths[0] == "add" and len(args.paths) == 3:
        res = add_to_index(args.paths[1], args.paths[2], args.model, batch_size=args.batch_size,
                           workers=args.workers, device=args.device, precision=args.precision,
                           progress=False if args.no_progress else None)
        print(f"added {res.added} images to {res.path}: {res.count} in all (version {res.version})")
        _print_skipped(res.skipped, res.path / SKIPPED_FILE)
        return 0
    if len(args.paths) != 1 or args.model is None or args.out is None:
        raise InputError("usage: llm2clip index IMAGES_DIR --model M --out INDEX, or llm2clip index add INDEX DIR")
    res = build_index(Path(args.paths[0]), args.model, args.out, hnsw=args.hnsw, hnsw_m=args.hnsw_m,
                      ef_construction=args.ef_construction, ef_search=args.ef_search, chunk_size=args.chunk_size,
                      batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
                      progress=False if args.no_progress else None)
    kind = "HNSW" if args.hnsw else "flat inner product"
    state = "already complete" if res.already_complete else "indexed"
    print(f"{state}: {res.count} images in {res.path} ({kind})")
    _print_skipped(res.skipped, res.path / SKIPPED_FILE)
    return 0


def run_search(args) -> int:
    import sys

    from ..errors import InputError
    from .index import ImageIndex, open_model_for, query_truncated, search_index

    if (args.query is None) == (args.image is None):
        raise InputError("give a text QUERY or --image PATH (exactly one)")
    idx = ImageIndex.open(args.index)
    lm = open_model_for(idx, args.model, args.device, args.precision, args.caption_encoder)
    if args.query is not None and query_truncated(lm, [args.query])[0]:
        limit = getattr(getattr(lm.caption_encoder, "config", None), "max_length", "?")
        print(f"notice: the query is longer than the caption encoder's max_length ({limit} tokens); "
              "only its start was used", file=sys.stderr)
    hits = search_index(idx, args.query, image=args.image, k=args.k, model=lm, ef_search=args.ef_search)
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], indent=1))
        return 0
    print(f"{'rank':>4}  {'score':>7}  file")
    for h in hits:
        print(f"{h.rank:>4}  {h.score:>7.4f}  {h.path}")
    return 0
