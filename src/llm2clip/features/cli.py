"""Commands of the feature store: `embed CONFIG`, `features verify DIR`, `features info DIR`.

Registered by the main `llm2clip` command through ``add_commands``; also runnable on its own
(``python -m llm2clip.features.cli embed CONFIG``), which is what torchrun launches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import InputError

EMBED_EPILOG = """\
config (YAML; relative paths resolve against the config file's folder):
  encoder:                 a text encoder, e.g. {kind: llm, model: smollm2-135m-instruct, dtype: bfloat16}
  captions:                sources, read in order:
    - cupl-train           built-in CuPL descriptions (ids '<class>/<n>'); or {builtin: cupl-heldout, classes: 50}
    - data/manifest.jsonl  an image manifest (JSONL or CSV): each caption's id and text
    - {path: caps.jsonl, format: jsonl}   older flat files with 'id' and 'caption' fields (JSONL/CSV/TSV)
  out: features/cupl       the store directory
  shard_size: 8192         rows per shard
  dtype: float16           float16 (default), bfloat16 or float32
  batch_size: 64           optional; default the encoder's

Equal captions are embedded once. A killed run resumes where it stopped when rerun with the same
config. On several GPUs or processes:
  torchrun --standalone --nproc_per_node=N -m llm2clip.features.cli embed CONFIG
"""


def add_commands(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed every caption once into a feature store (stage 2a)",
        description=("Run the caption encoder over caption manifests and write a sharded, checksummed feature "
                     "store that stage-2 training reads instead of running the LLM."),
        epilog=EMBED_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG", help="YAML embedding config")
    p.add_argument("--out", type=Path, help="store directory (overrides the config's 'out')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_embed)

    f = sub.add_parser(
        "features",
        help="inspect or check a feature store",
        description="Inspect or check a caption-embedding store written by `embed`.",
    )
    fsub = f.add_subparsers(dest="features_command", metavar="ACTION")
    v = fsub.add_parser(
        "verify",
        help="recompute every checksum and shape",
        description=("Read every shard and key file of the store, compare its sha256 and shape with the manifest "
                     "and each shard's identity record with the manifest's identity, and optionally that identity "
                     "with an expected one. Exit 0 when all match. (Reads check each file they touch, once per "
                     "process, as well.)"),
    )
    v.add_argument("dir", type=Path, metavar="DIR", help="store directory")
    v.add_argument("--identity", type=Path, metavar="JSON",
                   help="a JSON file with the expected encoder identity (or a manifest holding one)")
    v.set_defaults(func=_run_verify)
    i = fsub.add_parser(
        "info",
        help="print what a store holds",
        description="Print a store's size, dtype, dimension, shard layout and encoder identity (no checksums).",
    )
    i.add_argument("dir", type=Path, metavar="DIR", help="store directory")
    i.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    i.set_defaults(func=_run_info)
    f.set_defaults(func=lambda args: (f.print_help(), 2)[1])


def _run_embed(args) -> int:
    from ..distributed import finish
    from .extract import load_embed_config, run_embedding

    cfg = load_embed_config(args.config)
    if args.out:
        cfg.out = str(args.out)
    if args.no_progress:
        cfg.progress = False
    out = run_embedding(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"store: {out}")
    finish(0)  # under torchrun: barrier, destroy, os._exit (gloo can abort at interpreter exit)
    return 0


def _run_verify(args) -> int:
    from .store import FeatureStore

    expected = None
    if args.identity:
        try:
            data = json.loads(args.identity.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{args.identity}: cannot read the expected identity: {err}") from None
        expected = data.get("identity", data) if isinstance(data, dict) else None
        if not isinstance(expected, dict):
            raise InputError(f"{args.identity}: expected a JSON object")
    store = FeatureStore.open(args.dir, identity=expected)
    summary = store.verify(progress=None)
    print(f"ok: {store.path}: {summary['files']} files, {summary['rows']} rows, {summary['ids']} ids, "
          f"{summary['bytes'] / 2**20:.1f} MiB, checksums and shapes match")
    return 0


def _run_info(args) -> int:
    from .store import FeatureStore

    store = FeatureStore.open(args.dir)
    m = store.manifest
    size = store.disk_bytes()
    info = {"path": str(store.path), "rows": len(store), "ids": store.num_ids, "dim": store.dim,
            "dtype": store.dtype, "shards": len(m["shards"]), "shard_size": m["shard_size"], "bytes": size,
            "bytes_per_id": round(size / max(store.num_ids, 1), 1), "identity": store.identity,
            "captions": m.get("captions"), "truncated_captions": m.get("truncated_captions"),
            "max_length": m.get("max_length")}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"store:      {info['path']}")
    print(f"captions:   {info['ids']} ids -> {info['rows']} unique rows")
    print(f"vectors:    {info['dim']}-d {info['dtype']}, {info['shards']} shard(s) of {info['shard_size']} rows")
    print(f"size:       {size / 2**20:.2f} MiB ({info['bytes_per_id']} bytes per caption)")
    if info["truncated_captions"] is not None and info["max_length"] is not None:
        print(f"truncated:  {info['truncated_captions']} of {info['rows']} unique captions cut at max_length "
              f"{info['max_length']}")
    print("encoder:")
    for k, val in store.identity.items():
        print(f"  {k}: {val!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The feature-store commands on their own (``embed``, ``features ...``): the package CLI serves them."""
    from ..cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
