"""Stage-1 benchmark: CRA of raw vs caption-contrastive SmolLM2, training throughput, CRA curve.

    .venv/bin/llm2clip finetune-text configs/stage1_cupl.yaml          # the fine-tuning (timed)
    .venv/bin/python benchmarks/bench_stage1.py --run runs/stage1_cupl --out benchmarks/STAGE1.md

Throughput: tokens/s of one caption-contrastive training step on the same batch, in the same
process: the naive setting (LoRA on all 30 layers, fp32, full forward) against ours (LoRA on the
top layers, bf16 autocast, frozen trunk computed once per caption), medians over steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from llm2clip.data.captions import cupl_caption_set
from llm2clip.eval.text_eval import markdown_table, score_encoders
from llm2clip.finetune.config import FinetuneConfig
from llm2clip.finetune.trainer import Stage1Trainer
from llm2clip.text.specs import parse_encoder_spec


def step_throughput(top_layers, precision, cache, batch_size, steps, tmp) -> float:
    cfg = FinetuneConfig(
        encoder={"model": "smollm2-135m-instruct", "max_length": 64}, out=str(tmp),
        lora={"top_layers": top_layers}, data={"cupl_per_class": 8},
        contrastive={"batch_size": batch_size, "cache_trunk": cache}, optim={"steps": 100, "precision": precision})
    tr = Stage1Trainer(cfg, progress=False)
    tokens, times = [], []
    for i in range(steps + 1):
        pairs = tr.sampler.batch(tr.step, batch_size)
        n_tok = sum(len(t.ids) for t in tr.encoder.tokenize([p.query for p in pairs] + [p.positive for p in pairs]
                                                           + [p.negative for p in pairs]))
        if tr.trunk:  # the trunk of this batch is computed before timing: it is done once per caption
            tr.trunk.fill(tr.encoder.tokenize([p.query for p in pairs] + [p.positive for p in pairs]
                                              + [p.negative for p in pairs]))
        t0 = time.perf_counter()
        tr.train_step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
            tokens.append(n_tok)
    return statistics.median(t / s for t, s in zip(tokens, times))


def curve_png(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    pts = [(r["step"], r["cra_R@1"], r.get("cra_R@5")) for r in rows if "cra_R@1" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="CRA R@1")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="CRA R@5")
    ax.set_xlabel("training step")
    ax.set_ylabel("CRA on 200 held-out CuPL classes x 5 (pool 1,000)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M-Instruct, caption-contrastive LoRA (top layers)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/stage1_cupl"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/STAGE1.md"))
    ap.add_argument("--batch", type=int, default=32, help="pairs per step for the throughput rows")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    parts = [f"# Stage-1 benchmark: caption-contrastive fine-tuning of SmolLM2-135M-Instruct\n\n"
             f"Machine: {os.cpu_count()} cores, torch {torch.__version__}. Commands:\n\n"
             "```\n.venv/bin/llm2clip finetune-text configs/stage1_cupl.yaml\n"
             ".venv/bin/python benchmarks/bench_stage1.py --run runs/stage1_cupl --out benchmarks/STAGE1.md\n```\n"]
    summary = json.loads((args.run / "summary.json").read_text())
    cfg = json.loads((args.run / "config.json").read_text())
    parts.append(f"Fine-tuning: {cfg['optim']['steps']} steps of {cfg['contrastive']['batch_size']} pairs "
                 f"(+1 hard negative each), LoRA r={cfg['lora']['r']} on the top {cfg['lora']['top_layers']} layers, "
                 f"{cfg['optim']['precision']}, {cfg['data']['cupl_per_class']} descriptions per training class: "
                 f"**{summary['train_s'] / 60:.1f} min** of training wall time (trunk computation included).")
    encs = ["random", "minilm", "smollm2:bidirectional=false", "smollm2", str(args.run / "encoder")]
    sets = [cupl_caption_set("heldout", 200, 5, False), cupl_caption_set("heldout", 200, 5, True)]
    rows = score_encoders([(e, parse_encoder_spec(e)) for e in encs], sets, progress=False)
    for r in rows:
        r["encoder"] = {"smollm2": "SmolLM2 raw, bidirectional, mean",
                        "smollm2:bidirectional=false": "SmolLM2 raw, causal, mean",
                        str(args.run / "encoder"): "SmolLM2 CC-fine-tuned (ours), bidirectional, mean",
                        "minilm": "all-MiniLM-L6-v2", "random": "random"}[r["encoder"]]
    rows.sort(key=lambda r: r["caption_set"])
    parts.append("## CRA on the held-out CuPL classes (pool 1,000)\n\n" + markdown_table(rows))
    curve = args.out.parent / "stage1_cra_curve.png"
    curve_png(args.run / "metrics.jsonl", curve)
    parts.append(f"## CRA against training steps\n\n![CRA curve]({curve.name})")
    tmp = Path("runs/_bench_stage1_tmp")
    settings = [("naive: LoRA on all 30 layers, fp32, full forward", None, "fp32", False),
                ("LoRA on all 30 layers, bf16 autocast", None, "bf16", False),
                ("LoRA on the top 4 layers, bf16, full forward", 4, "bf16", False),
                ("ours: LoRA on the top 4 layers, bf16, cached frozen trunk", 4, "bf16", True)]
    tp = [(name, step_throughput(top, prec, cache, args.batch, args.steps, tmp)) for name, top, prec, cache in settings]
    lines = ["| setting | tokens/s (median) | vs naive |", "|---|---|---|"]
    lines += [f"| {n} | {r:.0f} | {r / tp[0][1]:.1f}x |" for n, r in tp]
    parts.append(f"## Training throughput ({args.batch} pairs + {args.batch} negatives per step, same batches)\n\n"
                 + "\n".join(lines))
    report = "\n\n".join(parts) + "\n"
    print(report)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
