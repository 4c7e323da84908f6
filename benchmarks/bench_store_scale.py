"""How `llm2clip embed` scales with the number of captions: peak memory and captions/s at 10^5 and 10^6.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_store_scale.py [--sizes 100000 1000000] [--procs 1 2]
        [--encoder-cost 0 50] [--before-src DIR] [--repeat 1] [--lookups]

The tiny random encoder (a seeded vector per caption text, 64-d) stands in for the LLM, so what is measured is the
job around it: reading and deduplicating the captions, planning the shards, writing the store. Each case runs in
its own process (`llm2clip embed`, or `torchrun --nproc_per_node N` for N > 1) under `/usr/bin/time -v`, whose
maximum resident set size is the peak memory (of the largest process). Captions are unique generated sentences.

``--encoder-cost US`` (benchmark only) makes the random encoder spend US microseconds of CPU per caption (a busy
loop on the thread's CPU clock, so it competes for cores as a real encoder does): the case where the encoder,
not the job around it, is the bottleneck. ``--before-src DIR`` runs every case also with another checkout's
``src`` first on PYTHONPATH (e.g. ``git archive <commit> src | tar -x -C DIR``), interleaved with this one, so
both see the same machine load. ``--lookups``: batches of 256 random ids read by id from the largest store
(`FeatureStore.get_by_ids`), per version, interleaved: microseconds per batch and the reader's memory growth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["red", "blue", "green", "small", "large", "circle", "square", "triangle", "left", "right", "above", "below"]
THIS = Path(__file__).resolve()


def write_captions(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(WORDS[(i >> (3 * k)) % len(WORDS)] for k in range(6))
            f.write(json.dumps({"id": f"c{i}", "caption": f"{words} number {i}"}) + "\n")


def worker(config: str, cost_us: float) -> None:
    """`llm2clip embed CONFIG` with a random encoder that costs ``cost_us`` µs of CPU per caption."""
    from llm2clip.features.cli import main as cli_main
    from llm2clip.text.baselines import RandomEncoder

    encode = RandomEncoder.encode

    def costly(self, captions, batch_size=None, progress=None):
        end = time.thread_time() + cost_us * len(captions) / 1e6
        while time.thread_time() < end:
            pass
        return encode(self, captions, batch_size, progress)

    RandomEncoder.encode = costly
    sys.exit(cli_main(["embed", config]))


def run_case(tmp: Path, captions: Path, n: int, procs: int, cost: float, version: str, src: str | None) -> dict:
    out = tmp / f"store-{n}-{procs}-{cost:g}-{version}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = tmp / f"embed-{n}-{procs}-{cost:g}-{version}.yaml"
    cfg.write_text(json.dumps({"encoder": {"kind": "random", "dim": 64}, "out": str(out), "shard_size": 65536,
                               "captions": [{"path": str(captions), "format": "jsonl"}], "progress": False}))
    bin_dir = Path(sys.executable).parent
    if cost:
        job = [str(THIS), "--worker", str(cfg), "--encoder-cost", str(cost)]
        cmd = [sys.executable, *job] if procs == 1 else [str(bin_dir / "torchrun"), "--standalone",
                                                           f"--nproc_per_node={procs}", *job]
    else:
        cmd = ([str(bin_dir / "llm2clip"), "embed", str(cfg)] if procs == 1 else
               [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "-m", "llm2clip", "embed",
                str(cfg)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"embed failed ({n}, {procs}, {version}):\n{res.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", res.stderr).group(1)) for k in ("User", "System"))
    return {"version": version, "captions": n, "processes": procs, "encoder_cost_us": cost, "wall_s": wall,
            "captions_per_s": n / wall, "captions_per_s_per_process": n / wall / procs,
            "peak_rss_mb": rss_kb / 1024, "cpu_s": cpu, "load_start": load0, "load_end": os.getloadavg()[0],
            "store": str(out)}


LOOKUP = r"""
import json, resource, sys, time
import numpy as np
from llm2clip.features import FeatureStore
store = FeatureStore.open(sys.argv[1])
n, batches = store.num_ids, int(sys.argv[2])
rng = np.random.default_rng(0)
ids = [[f"c{i}" for i in rng.integers(0, n, 256)] for _ in range(batches)]
store.check_all()  # hash every file once, as training does before its workers fork: not part of a lookup
store.get_by_ids(ids[0])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
for b in ids:
    store.get_by_ids(b)
dt = time.perf_counter() - t0
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"us_per_batch": dt / batches * 1e6, "rss_growth_mb": (rss1 - rss0) / 1024, "rss_mb": rss1 / 1024}))
"""


def lookups(store: str, src: str | None, batches: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if src:
        env["PYTHONPATH"] = src
    res = subprocess.run([sys.executable, "-c", LOOKUP, store, str(batches)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--procs", type=int, nargs="+", default=[1])
    ap.add_argument("--encoder-cost", type=float, nargs="+", default=[0.0],
                    help="µs of CPU per caption added to the random encoder (benchmark only; default 0)")
    ap.add_argument("--before-src", help="also run every case with this src folder first on PYTHONPATH")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all cases, interleaved (medians reported)")
    ap.add_argument("--lookups", type=int, default=0, metavar="BATCHES",
                    help="also time BATCHES random batches of 256 ids on the largest store, 3 interleaved rounds")
    ap.add_argument("--json", type=Path, help="also write every row here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.encoder_cost[0])
    versions = [("after", None)] + ([("before", str(Path(args.before_src).resolve()))] if args.before_src else [])
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = {}
        for n in args.sizes:
            files[n] = tmp / f"captions-{n}.jsonl"
            write_captions(files[n], n)
        for _ in range(args.repeat):
            for cost in args.encoder_cost:
                for n in args.sizes:
                    for p in args.procs:
                        for version, src in versions:
                            rows.append(run_case(tmp, files[n], n, p, cost, version, src))
                            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        looked = []
        if args.lookups:
            big = max(args.sizes)
            for _ in range(3):
                for version, src in versions:
                    store = next(r["store"] for r in rows if r["version"] == version and r["captions"] == big)
                    looked.append({"version": version, **lookups(store, src, args.lookups)})
                    print(json.dumps(looked[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "lookups": looked}, indent=1))
    report(rows, looked, args)


def report(rows: list[dict], looked: list[dict], args) -> None:
    med = statistics.median
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["version"], r["encoder_cost_us"], r["captions"], r["processes"]), []).append(r)
    print(f"\nmedians of {args.repeat} interleaved round(s)\n")
    print("| version | encoder µs/caption | captions | processes | wall s | captions/s | captions/s per process "
          "| peak RSS MB (largest process) | CPU s (all processes) | CPU s / wall s | load (1 min) at start-end |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for (v, c, n, p), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], kv[0][0])):
        loads = f"{min(r['load_start'] for r in rs):.2f}-{max(r['load_end'] for r in rs):.2f}"
        per_process = med(r["captions_per_s_per_process"] for r in rs)
        print(f"| {v} | {c:g} | {n:,} | {p} | {med(r['wall_s'] for r in rs):.1f} | "
              f"{med(r['captions_per_s'] for r in rs):,.0f} | {per_process:,.0f} | "
              f"{med(r['peak_rss_mb'] for r in rs):.0f} | {med(r.get('cpu_s', 0) for r in rs):.1f} | "
              f"{med(r.get('cpu_s', 0) / r['wall_s'] for r in rs):.2f} | {loads} |")
    lo, hi = min(args.sizes), max(args.sizes)
    print()
    for (v, c, n, p), rs in sorted(groups.items()):
        if n != hi or (v, c, lo, p) not in groups or lo == hi:
            continue
        small = groups[v, c, lo, p]
        growth = med(r["peak_rss_mb"] for r in rs) / med(r["peak_rss_mb"] for r in small) - 1
        flat = med(r["captions_per_s_per_process"] for r in rs) / med(r["captions_per_s_per_process"] for r in small)
        print(f"{v}, encoder {c:g} µs, {p} process(es): peak RSS {growth:+.0%} from {lo:,} to {hi:,}; captions/s per "
              f"process at {hi:,} / at {lo:,} = {flat:.2f}")
    for (v, c, n, p), rs in sorted(groups.items()):
        if p == 1:
            continue
        one = groups.get((v, c, n, 1))
        if one:
            speed = med(r["captions_per_s"] for r in rs) / med(r["captions_per_s"] for r in one)
            print(f"{v}, encoder {c:g} µs, {n:,} captions: {p} processes / 1 = {speed:.2f}x captions/s")
    for v in dict.fromkeys(r["version"] for r in looked):
        mine = [r for r in looked if r["version"] == v]
        us, rss = med(r["us_per_batch"] for r in mine), med(r["rss_mb"] for r in mine)
        print(f"{v}: lookups by id on the {hi:,}-id store, 256 ids a batch: {us:.0f} µs/batch, reader RSS "
              f"{rss:.0f} MB, +{med(r['rss_growth_mb'] for r in mine):.1f} MB during the lookups")


if __name__ == "__main__":
    main()
