"""Caption-encoder benchmark (issue: foundation): CRA of text encoders and encoding throughput.

    .venv/bin/python benchmarks/bench_caption_encoder.py --out benchmarks/CAPTION_ENCODER.md

CRA: 200 held-out CuPL classes x 5 descriptions (pool 1,000), with and without class-name
masking. Throughput: SmolLM2-135M-Instruct on CuPL captions, our sorted batches (fp32, bf16)
against a naive loop (one caption at a time) and unsorted batches, medians over repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from llm2clip.data.captions import cupl_caption_set
from llm2clip.eval.text_eval import markdown_table, score_encoders
from llm2clip.text import CaptionEncoder, build_text_encoder
from llm2clip.text.specs import parse_encoder_spec

CRA_ENCODERS = [
    "random",
    "minilm",
    "smollm2:bidirectional=false",
    "smollm2:bidirectional=true",
    "smollm2:bidirectional=false,template=tokenizer",
    "smollm2:bidirectional=true,template=tokenizer",
    "smollm2:bidirectional=false,pooling=last_token",
    "smollm2:bidirectional=true,pooling=last_token",
]


def throughput(n: int, repeats: int, naive_n: int) -> list[tuple[str, float]]:
    caps = cupl_caption_set("train", None, 1).captions[:n]
    rows = []

    def median_rate(fn, count):
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            rates.append(count / (time.perf_counter() - t0))
        return statistics.median(rates)

    for dtype in ("float32", "bfloat16"):
        enc: CaptionEncoder = build_text_encoder(parse_encoder_spec(f"smollm2:dtype={dtype}"))
        enc.encode(caps[:8], progress=False)  # warm-up
        if dtype == "float32":
            sub = caps[:naive_n]
            rows.append(("naive: one caption at a time, fp32",
                         median_rate(lambda: [enc.encode([c], progress=False) for c in sub], len(sub))))

            def unsorted():
                for s in range(0, len(caps), 32):
                    items = enc.tokenize(caps[s : s + 32])
                    with torch.inference_mode():
                        enc.forward(enc.collate(items))

            rows.append(("unsorted batches of 32, fp32", median_rate(unsorted, len(caps))))
        rows.append((f"ours: length-sorted batches of 32, {dtype} weights",
                     median_rate(lambda: enc.encode(caps, batch_size=32, progress=False), len(caps))))
        enc = None  # free the weights before the next dtype loads
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    ap.add_argument("--n", type=int, default=256, help="captions for throughput")
    ap.add_argument("--naive-n", type=int, default=48, help="captions for the naive loop")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-cra", action="store_true")
    args = ap.parse_args()

    cpu = platform.processor() or platform.machine()
    parts = [f"# Caption-encoder benchmark\n\nMachine: {os.cpu_count()} cores, {cpu}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Command: "
             "`.venv/bin/python benchmarks/bench_caption_encoder.py --out benchmarks/CAPTION_ENCODER.md`.\n"]
    if not args.skip_cra:
        sets = [cupl_caption_set("heldout", 200, 5, False), cupl_caption_set("heldout", 200, 5, True)]
        rows = score_encoders([(s, parse_encoder_spec(s)) for s in CRA_ENCODERS], sets, progress=False)
        rows.sort(key=lambda r: r["caption_set"])
        parts.append("## CRA on held-out CuPL classes (200 classes x 5 descriptions, pool 1,000)\n\n"
                     "Each caption queries the other 999; a hit when a top-K caption describes the same class. "
                     "`-masked`: class names replaced by 'X'. SmolLM2 rows: mean pooling unless named; "
                     "`template=tokenizer` wraps the caption in SmolLM2's chat turn.\n\n"
                     + markdown_table(rows, (1, 5, 10)))
    tp = throughput(args.n, args.repeats, args.naive_n)
    base = tp[0][1]
    lines = ["| setting | captions/s (median) | vs naive |", "|---|---|---|"]
    lines += [f"| {name} | {rate:.1f} | {rate / base:.1f}x |" for name, rate in tp]
    parts.append(f"## Encoding throughput, SmolLM2-135M-Instruct, {args.n} CuPL captions, median of {args.repeats}\n\n"
                 + "\n".join(lines))
    report = "\n\n".join(parts) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
