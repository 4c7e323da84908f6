"""Caption-encoder fast paths against fp32: captions/s and fidelity, with the plain loops as baselines.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_caption_paths.py [--threads 1] [--rounds 3] [--cra]
        [--int8] [--compile] [--more-threads 2] [--out FILE]

SmolLM2-135M-Instruct (the `smollm2` preset, causal, mean pooling). Two workloads: "mixed" (CuPL descriptions
and scene dense captions, about 15 to 190 tokens) and "short" (scene short captions, about 10 tokens). Every
case runs once per round, the cases interleaved, and each is reported as the median over rounds of its
captions/s and of its ratio to the batched bf16 transformers loop in the same round. Fidelity: minimum and
mean cosine of each caption's embedding to the fp32 one (exact-length batching), on CuPL and on dense
captions; CRA: held-out CuPL, 200 classes x 5 (pool 1,000), R@1, with the minimum cosine to fp32 there too.
Options add int8 dynamic quantization (--int8), torch.compile (--compile: minutes of compiling first) and the
main paths again at another thread count (--more-threads N, each case switching threads as it runs).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llm2clip.data.captions import cupl_caption_set
from llm2clip.data.scenes import make_scene
from llm2clip.eval.cra import caption_retrieval_accuracy
from llm2clip.fileio import markdown_table
from llm2clip.text import build_text_encoder
from llm2clip.text.specs import parse_encoder_spec

SPEC = "smollm2:bidirectional=false"


def plain_loop(enc, dtype: torch.dtype, batch: int = 32):
    """A length-sorted padded batch loop over the bare transformers model (the shape of LLM2Vec's encode):
    its own tokenizer call with padding, the model in ``dtype``, mean pooling over the attention mask."""
    model = copy.deepcopy(enc.model).to(dtype)
    tok = enc.tokenizer
    tok.padding_side = "right"

    @torch.inference_mode()
    def run(caps):
        order = sorted(range(len(caps)), key=lambda i: -len(caps[i]))
        out = torch.empty(len(caps), enc.dim)
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            t = tok([caps[i] for i in idx], return_tensors="pt", padding=True)
            h = model(**t).last_hidden_state.float()
            m = t["attention_mask"][..., None].float()
            out[idx] = (h * m).sum(1) / m.sum(1)
        return out

    return run


def ours(enc, batching: str, autocast: bool = False):
    def run(caps):
        enc.config.batching = batching
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return enc.encode(caps, progress=False)
        return enc.encode(caps, progress=False)

    return run


def int8(enc, which: str):
    """int8 dynamic quantization (weights per tensor, activations per batch) of the ``which`` linears."""
    q = copy.copy(enc)
    q.model = copy.deepcopy(enc.model)
    names = {n for n, m in q.model.named_modules() if isinstance(m, torch.nn.Linear)
             and (which == "all" or ".mlp." in f".{n}")}
    q.model = torch.ao.quantization.quantize_dynamic(q.model, names, dtype=torch.qint8)
    return ours(q, "exact")


def compiled(spec: str):
    enc = build_text_encoder(parse_encoder_spec(spec))
    enc.model.forward = torch.compile(enc.model.forward, dynamic=True)  # caption lengths vary per batch
    return ours(enc, "exact")


def with_threads(fn, n: int, back: int):
    def run(caps):
        torch.set_num_threads(n)
        try:
            return fn(caps)
        finally:
            torch.set_num_threads(back)

    return run


def outliers(enc, captions, top: int = 10) -> str:
    """The linear layers with the largest absolute outputs (fp32) over ``captions``: where the outlier
    dimensions of the residual stream come from."""
    peak: dict[str, float] = {}

    def hook(name):
        def h(mod, inp, out):
            peak[name] = max(peak.get(name, 0.0), out.abs().max().item())
        return h

    handles = [m.register_forward_hook(hook(n)) for n, m in enc.model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        enc.encode(captions, progress=False)
    finally:
        for h in handles:
            h.remove()
    rows = [[n, f"{v:,.0f}"] for n, v in sorted(peak.items(), key=lambda kv: -kv[1])[:top]]
    return markdown_table(["linear layer", "largest absolute output"], rows, "lr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mixed", type=int, default=192, help="captions in the mixed workload")
    ap.add_argument("--short", type=int, default=192, help="captions in the short workload")
    ap.add_argument("--fidelity", type=int, default=256, help="CuPL captions in the fidelity table")
    ap.add_argument("--cra", action="store_true", help="also held-out CuPL CRA per precision (slow)")
    ap.add_argument("--int8", action="store_true", help="also int8 dynamic quantization of the linear layers")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (inductor) of the bf16 paths")
    ap.add_argument("--more-threads", type=int, default=0, help="also the main paths at this many threads")
    ap.add_argument("--outliers", action="store_true", help="only list the linears with the largest outputs (fp32)")
    ap.add_argument("--only", help="parts of path names, separated by '|' (names hold commas): time only the paths "
                    "that contain one (and the baseline)")
    ap.add_argument("--out", type=Path, help="write the Markdown tables here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cupl = cupl_caption_set("train", None, 1).captions
    dense = [make_scene(0, i).dense_caption() for i in range(args.mixed // 3)]
    workloads = {"mixed": cupl[: args.mixed - len(dense)] + dense,
                 "short": [make_scene(0, i).short_caption() for i in range(args.short)]}

    f32 = build_text_encoder(parse_encoder_spec(SPEC + ",dtype=float32"))
    if args.outliers:
        print(outliers(f32, cupl[:32] + dense[:8]))
        return
    b16 = build_text_encoder(parse_encoder_spec(SPEC + ",dtype=bfloat16"))
    mlp = build_text_encoder(parse_encoder_spec(SPEC + ",dtype=float32,bf16_linears=mlp"))
    lin = build_text_encoder(parse_encoder_spec(SPEC + ",dtype=float32,bf16_linears=all"))
    cases = {
        "one caption at a time, fp32": None,
        "transformers loop, batches of 32, fp32": plain_loop(f32, torch.float32),
        "transformers loop, batches of 32, bf16": plain_loop(f32, torch.bfloat16),
        "ours fp32, exact-length": ours(f32, "exact"),
        "ours fp32, packed": ours(f32, "packed"),
        "ours bf16, exact-length": ours(b16, "exact"),
        "ours bf16, padded": ours(b16, "padded"),
        "ours bf16, packed": ours(b16, "packed"),
        "ours bf16 matmuls, fp32 weights and residual (autocast)": ours(f32, "exact", autocast=True),
        "ours bf16 linears, rest fp32 (bf16_linears=all)": ours(lin, "exact"),
        "ours bf16 MLP linears, rest fp32 (bf16_linears=mlp)": ours(mlp, "exact"),
    }
    if args.int8:
        cases["ours int8 dynamic, all linears"] = int8(f32, "all")
        cases["ours int8 dynamic, MLP linears, rest fp32"] = int8(f32, "mlp")
    if args.compile:
        cases["ours bf16, torch.compile"] = compiled(SPEC + ",dtype=bfloat16")
        cases["ours bf16_linears=mlp, torch.compile"] = compiled(SPEC + ",dtype=float32,bf16_linears=mlp")
    if args.more_threads:
        n = args.more_threads
        for name in ("transformers loop, batches of 32, bf16", "ours fp32, exact-length", "ours bf16, exact-length",
                     "ours bf16 MLP linears, rest fp32 (bf16_linears=mlp)"):
            cases[f"{name}, {n} threads"] = with_threads(cases[name], n, args.threads)
    base = "transformers loop, batches of 32, bf16"
    if args.only:
        keep = [k.strip() for k in args.only.split("|") if k.strip()]
        cases = {k: v for k, v in cases.items() if k == base or any(p in k for p in keep)}
    single = ours(f32, "exact")
    one_at_a_time_n = 24

    for fn in cases.values():  # warm-up: first calls pay for lazy initialisation (and compiling)
        (fn or single)(workloads["mixed"][:4] + workloads["short"][:32])
    rates = {w: {c: [] for c in cases} for w in workloads}
    for r in range(args.rounds):
        for w, caps in workloads.items():
            for name, fn in cases.items():
                # one at a time is slow: an evenly spaced subset, so that it has the workload's mix of lengths
                sub = caps[:: max(1, len(caps) // one_at_a_time_n)] if fn is None else caps
                t0 = time.perf_counter()
                if fn is None:
                    for c in sub:
                        single([c])
                else:
                    fn(sub)
                rates[w][name].append(len(sub) / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)

    parts = [f"## Caption-encoder paths, SmolLM2-135M-Instruct, {args.threads} thread(s), median of {args.rounds} "
             f"interleaved rounds (load at the end {os.getloadavg()[0]:.1f})\n"]
    for w in workloads:
        rows = []
        for name in cases:
            ratio = statistics.median(a / b for a, b in zip(rates[w][name], rates[w][base]))
            rows.append([name, f"{statistics.median(rates[w][name]):.1f}", f"{ratio:.2f}x"])
        parts.append(f"Workload {w} ({len(workloads[w])} captions):\n\n"
                     + markdown_table(["path", "captions/s", "vs transformers bf16 loop"], rows, "lrr"))

    ref = {k: ours(f32, "exact")(v) for k, v in (("cupl", cupl[: args.fidelity]), ("dense", dense))}
    fid_rows = []
    for name, fn in cases.items():
        if fn is None or name.startswith("transformers") or name.endswith(" threads"):
            continue
        cells = [name]
        for k, v in (("cupl", cupl[: args.fidelity]), ("dense", dense)):
            cos = F.cosine_similarity(fn(v), ref[k])
            cells += [f"{cos.min().item():.4f}", f"{cos.mean().item():.4f}"]
        fid_rows.append(cells)
    parts.append("Fidelity to fp32 (cosine of each caption's embedding):\n\n" + markdown_table(
        ["path", "CuPL min", "CuPL mean", "dense min", "dense mean"], fid_rows, "lrrrr"))
    if args.cra:
        held = cupl_caption_set("heldout", 200, 5, False)
        cra_rows = []
        held_ref = None
        for name in ("ours fp32, exact-length", "ours bf16, exact-length",
                     "ours bf16 matmuls, fp32 weights and residual (autocast)",
                     "ours bf16 linears, rest fp32 (bf16_linears=all)",
                     "ours bf16 MLP linears, rest fp32 (bf16_linears=mlp)",
                     *(["ours int8 dynamic, MLP linears, rest fp32"] if args.int8 else [])):
            if name not in cases:
                continue
            emb = cases[name](held.captions)
            held_ref = emb if held_ref is None else held_ref
            cos = F.cosine_similarity(emb, held_ref)
            cra_rows.append([name, f"{caption_retrieval_accuracy(emb, held.groups, [1])['R@1']:.3f}",
                             f"{cos.min().item():.4f}", f"{cos.mean().item():.4f}"])
        parts.append("Held-out CuPL CRA (200 x 5, pool 1,000), and cosine to fp32 on those 1,000 captions:\n\n"
                     + markdown_table(["path", "R@1", "min cosine", "mean cosine"], cra_rows, "lrrr"))
    report = "\n\n".join(parts) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
