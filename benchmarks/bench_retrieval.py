"""Retrieval scoring speed and memory: ours vs a looped routine like the official one vs CLIP_benchmark.

Scores random features of the COCO 5k test shape (5,000 images, 25,010 captions: 5 per image and
a 6th for 10 of them, 1280-d) and prints a Markdown table. Each measurement runs in a fresh
worker process pinned to ``--threads`` threads, and the methods take turns, so load from other
processes on a shared machine spreads over all of them; the table gives medians and ratios.

* ours: ``llm2clip.eval.retrieval.retrieval_metrics`` (exact ranks over blocks of captions).
* CLIP_benchmark: the scoring part of its ``zeroshot_retrieval.evaluate`` with its own
  ``recall_at_k`` and ``batchify`` (the full score matrix, then one-hot top-K over batches of 64).
* looped: our restatement of the official ``retrieval_global`` loop, generalised to several
  captions per image with the caption-to-image index: for each K, for each query, one
  vector-matrix product, ``topk`` and a membership test. It runs on a subset of the queries and
  its time is extrapolated linearly to all queries (each query costs the same: a full scan).

Peak memory is the growth of the worker's peak resident set during the call (VmHWM after
resetting it through /proc/self/clear_refs), features excluded.

    .venv/bin/python benchmarks/bench_retrieval.py            # the recorded table (RETRIEVAL.md)
    .venv/bin/python benchmarks/bench_retrieval.py --repeats 1 --looped-queries 200   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

KS = (1, 5, 10)


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_features(n_images: int, per_image: int, extra: int, dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    counts = torch.full((n_images,), per_image)
    counts[:extra] += 1
    ci = torch.repeat_interleave(torch.arange(n_images), counts)  # grouped, as CLIP_benchmark loads them
    img = torch.randn(n_images, dim, generator=g)
    txt = torch.randn(len(ci), dim, generator=g) + 0.06 * img[ci]  # enough signal for mid-range recalls
    return img, txt, ci


def run_ours(img, txt, ci, args):
    from llm2clip.eval.retrieval import retrieval_metrics

    m = retrieval_metrics(img, txt, ci, KS)
    return {k: m[k] for k in m if "@" in k}


def run_clip_benchmark(img, txt, ci, args):
    """The scoring statements of CLIP_benchmark's ``evaluate`` (after its encoding loop), calling its
    own ``recall_at_k`` and ``batchify``; tests/test_retrieval.py runs the whole ``evaluate``."""
    import torch
    import torch.nn.functional as F
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    images_emb, texts_emb = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    texts_image_index = ci.tolist()
    batch_size = 64  # CLIP_benchmark's default; evaluate reuses the image batch size here
    scores = texts_emb @ images_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), texts_image_index] = True
    m = {}
    for k in KS:
        t2i = batchify(recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k)
        i2t = batchify(recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k)
        m[f"t2i_R@{k}"], m[f"i2t_R@{k}"] = (t2i > 0).float().mean().item(), (i2t > 0).float().mean().item()
    return m


def looped_subset(img, txt, ci, n_text_q: int, n_image_q: int):
    """The official loop shape on the first queries; returns hits per K and the time it took."""
    import torch
    import torch.nn.functional as F

    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    caps_of = [[] for _ in range(len(img))]
    for c, i in enumerate(ci.tolist()):
        caps_of[i].append(c)
    hits, t_t2i, t_i2t = {}, 0.0, 0.0
    for k in KS:
        t0 = time.perf_counter()
        t2i = []
        for j in range(n_text_q):
            sim = txt[j] @ img.T
            top = torch.topk(sim, k).indices
            t2i.append(bool(ci[j] in top))
        t1 = time.perf_counter()
        i2t = []
        for i in range(n_image_q):
            sim = img[i] @ txt.T
            top = torch.topk(sim, k).indices
            i2t.append(any(c in top for c in caps_of[i]))
        t_t2i, t_i2t = t_t2i + t1 - t0, t_i2t + time.perf_counter() - t1
        hits[k] = (t2i, i2t)
    return hits, t_t2i, t_i2t


def run_looped(img, txt, ci, args):
    n_tq = min(args.looped_queries * 5, len(txt))
    n_iq = min(args.looped_queries, len(img))
    hits, t_t2i, t_i2t = looped_subset(img, txt, ci, n_tq, n_iq)
    peak = _status()["VmHWM"]  # before the agreement check below allocates
    dt = t_t2i + t_i2t
    # Extrapolate each direction: within one, every query costs the same (a full scan).
    full = t_t2i * len(txt) / n_tq + t_i2t * len(img) / n_iq
    from llm2clip.eval.retrieval import retrieval_ranks

    ranks = retrieval_ranks(img, txt, ci)
    agree = all(hits[k][0] == (ranks.t2i[:n_tq] < k).tolist() and hits[k][1] == (ranks.i2t[:n_iq] < k).tolist()
                for k in KS)
    return {"_peak_hwm": peak, "_subset_s": dt, "_extrapolated_s": full, "_queries": [n_tq, n_iq],
            "_agrees_with_ours": agree}


METHODS = {"ours": run_ours, "clip_benchmark": run_clip_benchmark, "looped": run_looped}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import clip_benchmark.metrics.zeroshot_retrieval  # noqa: F401  imports are not the routine's memory

    import llm2clip.eval.retrieval  # noqa: F401

    img, txt, ci = make_features(args.images, args.per_image, args.extra, args.dim)
    before = _status()["VmRSS"]
    ok = _reset_peak()
    t0 = time.perf_counter()
    out = METHODS[args.worker](img, txt, ci, args)
    dt = time.perf_counter() - t0
    peak = out.pop("_peak_hwm", None) or _status()["VmHWM"]
    peak = peak - before if ok else None
    print(json.dumps({"method": args.worker, "time_s": out.pop("_extrapolated_s", dt), "peak_bytes": peak,
                      "captions": len(txt), "images": len(img), "result": out}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--per-image", type=int, default=5)
    p.add_argument("--extra", type=int, default=10, help="images with one caption more (COCO: 25,010 captions)")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slow-repeats", type=int, default=2, help="repeats of the CLIP_benchmark and looped routines")
    p.add_argument("--looped-queries", type=int, default=100,
                   help="image queries timed for the looped routine (caption queries: 5x that)")
    p.add_argument("--methods", default="ours,clip_benchmark,looped")
    p.add_argument("--json", help="also write the raw measurements here")
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    methods = args.methods.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    base = [sys.executable, __file__, "--images", str(args.images), "--per-image", str(args.per_image),
            "--extra", str(args.extra), "--dim", str(args.dim), "--threads", str(args.threads),
            "--looped-queries", str(args.looped_queries)]
    runs = {m: [] for m in methods}
    for rep in range(args.repeats):
        for m in methods:  # methods take turns, so background load spreads over all of them
            if m != "ours" and rep >= args.slow_repeats:
                continue  # minutes per run: fewer repeats
            proc = subprocess.run(base + ["--worker", m], capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{m} failed:\n{proc.stderr[-3000:]}")
            runs[m].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[rep {rep + 1}] {m}: {runs[m][-1]['time_s']:.2f} s", file=sys.stderr)

    med = {m: statistics.median(r["time_s"] for r in runs[m]) for m in methods}
    ref = runs["ours"][0] if "ours" in runs else None
    n = runs[methods[0]][0]
    print(f"Scoring {n['images']:,} images x {n['captions']:,} captions, {args.dim}-d random features, "
          f"{args.threads} threads, R@{{{','.join(map(str, KS))}}} both directions; "
          f"median of {args.repeats} (others: {min(args.repeats, args.slow_repeats)}) fresh-process runs.\n")
    print("| routine | median time (s) | range (s) | peak extra memory (MiB) | time / ours | agrees with ours |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        ts = [r["time_s"] for r in runs[m]]
        peaks = [r["peak_bytes"] for r in runs[m] if r["peak_bytes"] is not None]
        peak = f"{max(peaks) / 2**20:.0f}" if peaks else "n/a"
        res = runs[m][0]["result"]
        if m == "looped":
            agree = "yes (on the timed subset)" if res["_agrees_with_ours"] else "NO"
            label = (f"looped, official shape (extrapolated from {res['_queries'][0]:,} caption + "
                     f"{res['_queries'][1]:,} image queries)")
        else:
            agree = ("yes" if ref and all(abs(res[k] - ref["result"][k]) < 1e-6 for k in ref["result"]) else "NO")
            label = {"ours": "ours (llm2clip.eval.retrieval)",
                     "clip_benchmark": "CLIP_benchmark (evaluate's scoring, its recall_at_k)"}[m]
        ratio = f"{med[m] / med['ours']:.1f}x" if "ours" in med else ""
        print(f"| {label} | {med[m]:.2f} | {min(ts):.2f}-{max(ts):.2f} | {peak} | {ratio} | {agree} |")
    if ref:
        print("\nR@K of ours: " + ", ".join(f"{k} {v:.4f}" for k, v in ref["result"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
