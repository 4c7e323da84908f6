"""`llm2clip shards MANIFEST --out DIR`: an image manifest into webdataset tar shards (registered by llm2clip.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
The manifest is the one stage 2 reads (JSONL: {"image": "a.jpg", "captions": [{"id": .., "kind": .., "text": ..}]},
or CSV with image, caption_id, kind[, text]). Each sample of a shard holds the image file as it is (jpg, jpeg,
png, webp; other types re-encoded as PNG) and a json with its captions; DIR gets <prefix>-000000.tar, ...
and shards.json. Train from them with

  data:
    train: {kind: webdataset, shards: DIR}      # or a pattern: DIR/train-{000000..000009}.tar

A killed run resumes when rerun with the same arguments; DIR appears only when every shard is written.
"""


def add_commands(sub) -> None:
    p = sub.add_parser(
        "shards",
        help="write an image manifest as webdataset tar shards",
        description="Convert an image-caption manifest (and its images) into webdataset tar shards for stage 2.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="JSONL or CSV manifest")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to create")
    p.add_argument("--image-root", type=Path, help="base of relative image paths (default: the manifest's folder)")
    p.add_argument("--allow-absolute-paths", action="store_true",
                   help="accept absolute image paths in the manifest (relative ones must stay inside the image root)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="train", help="shard name prefix (default train)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it exists and llm2clip wrote it (never the working or home folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_shards)


def run_shards(args) -> int:
    from .images import load_manifest
    from .shards import write_shards

    records = load_manifest(args.manifest, args.image_root, args.allow_absolute_paths)
    out = write_shards(records, args.out, per_shard=args.per_shard, prefix=args.prefix, overwrite=args.overwrite,
                       progress=False if args.no_progress else None)
    keys = ("out", "samples", "left_out", "left_out_images")  # what was left out, and why
    print(json.dumps({k: out[k] for k in keys if k in out} | {"shards": len(out["shards"])}, indent=2))
    return 0
