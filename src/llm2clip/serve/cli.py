"""`llm2clip serve`: registered by llm2clip.cli through ``add_commands``; fastapi and the model load lazily."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  llm2clip serve photos.index                          # http://127.0.0.1:8000/ (page), /docs (API)
  llm2clip serve photos.index --host 0.0.0.0 --port 8080 --batch-wait-ms 5 --max-batch 32

Endpoints: POST /v1/search (JSON {"text": ..., "k": 10}, or a multipart form with an image), POST
/v1/embed/text, POST /v1/embed/image, GET /health. The index's own model is used (--model must be the
same model). `llm2clip index add INDEX DIR` while it runs: the next query uses the new version.
Needs the serve extra: pip install 'llm2clip[serve]'.
"""


def add_commands(sub) -> None:
    from ..cli import at_least

    p = sub.add_parser("serve", help="serve an image index over HTTP: a search page and a JSON API",
                       description="Load INDEX and its model once and serve text and image search, embeddings "
                                   "and a search page (FastAPI, uvicorn).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", type=Path, metavar="INDEX")
    p.add_argument("--model", "-m", type=Path, help="the model folder (default: the one in the index manifest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=at_least(0), default=8000, help="port (default 8000)")
    p.add_argument("--batch-wait-ms", type=at_least(0.0, float), default=5.0,
                   help="how long a text query waits for others to share a caption-encoder forward (default 5)")
    p.add_argument("--max-batch", type=at_least(1), default=32, help="texts per forward at most; 1: no batching (32)")
    p.add_argument("--text-batching", default="padded", choices=["padded", "exact", "recorded"],
                   help="padded: a micro-batch is one forward (default); exact: one per distinct token count")
    p.add_argument("--max-body-mb", type=at_least(0.001, float), default=16.0,
                   help="largest request body in MB (default 16)")
    p.add_argument("--max-image-pixels", type=at_least(1), default=40_000_000,
                   help="largest uploaded image, width x height (default 40,000,000)")
    p.add_argument("--caption-encoder", help="caption-encoder spec overriding the model's record (e.g. smollm2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="weights' precision (fp32)")
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from ..errors import ConfigError

    try:
        import uvicorn

        from .app import ServeSettings, create_app
    except ImportError as err:
        raise ConfigError(f"llm2clip serve needs fastapi, uvicorn and python-multipart ({err}); "
                          "pip install 'llm2clip[serve]'") from None
    from ..search.index import ImageIndex, open_model_for

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    idx = ImageIndex.open(args.index)
    lm = open_model_for(idx, args.model, args.device, args.precision, args.caption_encoder)
    lm.caption_encoder  # noqa: B018 - load the LLM now: the first query should not pay for it
    settings = ServeSettings(batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch,
                             text_batching=None if args.text_batching == "recorded" else args.text_batching,
                             max_body_bytes=int(args.max_body_mb * (1 << 20)), max_image_pixels=args.max_image_pixels)
    app = create_app(lm, args.index, settings)
    print(f"serving {len(idx)} images of {idx.path} on http://{args.host}:{args.port}/ (API: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
