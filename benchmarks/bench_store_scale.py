"""How `llm2clip embed` scales with the number of captions: peak memory and captions/s at 10^5 and 10^6.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_store_scale.py [--sizes 100000 1000000] [--procs 1 2]

The tiny random encoder (a seeded vector per caption text, 64-d) stands in for the LLM, so what is measured is the
job around it: reading and deduplicating the captions, planning the shards, writing the store. Each case runs in
its own process (`llm2clip embed`, or `torchrun --nproc_per_node N` for N > 1) under `/usr/bin/time -v`, whose
maximum resident set size is the peak memory (of the largest process). Captions are unique generated sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["red", "blue", "green", "small", "large", "circle", "square", "triangle", "left", "right", "above", "below"]


def write_captions(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(WORDS[(i >> (3 * k)) % len(WORDS)] for k in range(6))
            f.write(json.dumps({"id": f"c{i}", "caption": f"{words} number {i}"}) + "\n")


def run_case(tmp: Path, captions: Path, n: int, procs: int) -> dict:
    out = tmp / f"store-{n}-{procs}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = tmp / f"embed-{n}-{procs}.json"
    cfg.write_text(json.dumps({"encoder": {"kind": "random", "dim": 64}, "out": str(out), "shard_size": 65536,
                               "captions": [{"path": str(captions), "format": "jsonl"}], "progress": False}))
    yaml_cfg = cfg.with_suffix(".yaml")
    yaml_cfg.write_text(cfg.read_text())  # JSON is YAML
    bin_dir = Path(sys.executable).parent
    cmd = ([str(bin_dir / "llm2clip"), "embed", str(yaml_cfg)] if procs == 1 else
           [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "-m", "llm2clip", "embed",
            str(yaml_cfg)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"embed failed ({n}, {procs}):\n{res.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return {"captions": n, "processes": procs, "wall_s": wall, "captions_per_s": n / wall,
            "peak_rss_mb": rss_kb / 1024, "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--procs", type=int, nargs="+", default=[1])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in args.sizes:
            captions = tmp / f"captions-{n}.jsonl"
            write_captions(captions, n)
            for p in args.procs:
                rows.append(run_case(tmp, captions, n, p))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("\n| captions | processes | wall s | captions/s | peak RSS MB (largest process) | load at the end |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['captions']:,} | {r['processes']} | {r['wall_s']:.1f} | {r['captions_per_s']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['load']:.2f} |")


if __name__ == "__main__":
    main()
