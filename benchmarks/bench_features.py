"""Benchmark of the caption-embedding store against the official layout (raw fp32 in tar members).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_features.py [--captions 300] [--repeats 3]

Measures, on SmolLM2-135M-Instruct and real CuPL captions:
  1. extraction captions/s of the job (fp32 and bf16 compute) against a naive loop that embeds one
     caption at a time and appends raw float32 bytes to a tar, as the official sidecars do;
  2. bytes per caption on disk: the store (fp16 / bf16 / fp32) against the tar of raw fp32 vectors;
  3. random-access reads (batches of 256 random ids) from the store against per-sample tar members;
  4. what checking reads costs (each file's sha256 and each shard's identity record, once per process):
     reads with against without the check, in interleaved rounds, median of the per-round ratios.
Prints a Markdown table of medians over repeats. Timings on a shared machine swing: read ratios.
``--verify-only`` runs part 4 alone (no model needed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import log

from llm2clip.data.captions import cupl_caption_set
from llm2clip.features import FeatureStore, write_store
from llm2clip.features import store as store_mod
from llm2clip.features.extract import EmbedConfig, run_embedding
from llm2clip.text import CaptionEncoder, LLMEncoderConfig


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_official_tar(path: Path, keys: list[str], vectors: np.ndarray) -> None:
    """One member per vector holding its raw float32 bytes, like the official *_text_embeddings.tar."""
    with tarfile.open(path, "w") as tf:
        for key, v in zip(keys, vectors):
            data = np.asarray(v, dtype=np.float32).tobytes()
            info = tarfile.TarInfo(f"{key}.shortsv_captions")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=300, help="CuPL captions to embed (default 300)")
    ap.add_argument("--naive-captions", type=int, default=100,
                    help="captions in the naive one-at-a-time loop, the first N of the same set (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per timing (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--read-rows", type=int, default=20000, help="rows in the random-read test (default 20000)")
    ap.add_argument("--read-batches", type=int, default=30, help="random batches of 256 per read timing")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--verify-only", action="store_true", help="only the cost of checked reads (part 4)")
    ap.add_argument("--verify-rounds", type=int, default=7, help="interleaved rounds of part 4 (default 7)")
    ap.add_argument("--verify-dim", type=int, default=576, help="vector width in part 4 (default 576, SmolLM2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        if not args.verify_only:
            run(args, tmp)
        verify_cost(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def verify_cost(args, tmp: Path) -> None:
    """Reads of a fresh store with the per-process check (sha256 + identity record of each file on first
    read) against the same reads with it off, in interleaved rounds (the order alternates)."""
    m, dim = args.read_rows, args.verify_dim
    rng = np.random.default_rng(3)
    keys = [f"sample{i:08d}" for i in range(m)]
    vecs = rng.standard_normal((m, dim)).astype(np.float32)
    path = write_store(tmp / "verify-store", keys, vecs, identity={"base_model": "bench", "dim": dim},
                       dtype="float16", shard_size=4096).path
    size = FeatureStore.open(path).disk_bytes()
    first = [keys[j] for j in rng.integers(0, m, 256)]
    epoch = [[keys[j] for j in part] for part in np.array_split(rng.permutation(m), -(-m // 256))]
    singles = [[keys[j]] for j in rng.permutation(m)[:5000]]
    workloads = {"first batch of 256 ids, fresh store": [first],
                 f"all {m} rows once, batches of 256 ids": epoch,
                 "5000 single-id reads (as the training dataset reads)": singles}

    def timed(batches, verify: bool) -> float:
        store_mod._VERIFIED.clear()  # as in a new process
        t = time.perf_counter()
        store = FeatureStore.open(path, verify_reads=verify)
        for b in batches:
            store.get_by_ids(b)
        return time.perf_counter() - t

    load_before = load()
    ratios = {w: [] for w in workloads}
    secs = {w: {True: [], False: []} for w in workloads}
    for r in range(args.verify_rounds):
        for w, batches in workloads.items():
            for verify in ((False, True) if r % 2 == 0 else (True, False)):
                secs[w][verify].append(timed(batches, verify))
            ratios[w].append(secs[w][True][-1] / secs[w][False][-1])
    load_after = load()
    lines = [
        "",
        f"Checked reads: a {m}-row {dim}-d fp16 store, {size / 2**20:.1f} MiB in "
        f"{len(FeatureStore.open(path).manifest['shards'])} shards, in the page cache; {args.verify_rounds} "
        f"interleaved rounds; load average (1/5/15 min) {load_before} before, {load_after} after.",
        "",
        "| workload | unchecked (s, median) | checked (s, median) | checked / unchecked (median of rounds) | "
        "range of rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for w in workloads:
        q = ratios[w]
        lines.append(f"| {w} | {statistics.median(secs[w][False]):.4f} | {statistics.median(secs[w][True]):.4f} | "
                     f"{statistics.median(q):.2f}x | {min(q):.2f}-{max(q):.2f} |")
    full = f"all {m} rows once, batches of 256 ids"
    extra = statistics.median(secs[full][True]) - statistics.median(secs[full][False])
    rate = size / 2**20 / max(extra, 1e-9)
    lines += ["", f"The check adds {extra * 1e3:.0f} ms to reading every row once ({rate:.0f} MiB/s of store "
              "hashed), once per process and file."]
    print("\n".join(lines))
    log(f"checked-read ratios: { {w: round(statistics.median(q), 3) for w, q in ratios.items()} }")


def run(args, tmp: Path) -> None:
    per_class = 5
    cs = cupl_caption_set("train", -(-args.captions // per_class), per_class)
    texts = cs.captions[: args.captions]
    ids = [f"{g}/{i}" for i, g in enumerate(cs.groups[: args.captions])]
    caps_file = tmp / "caps.jsonl"
    caps_file.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in zip(ids, texts)))
    n = len(texts)
    log(f"{n} CuPL captions, mean {np.mean([len(t) for t in texts]):.0f} characters; {args.threads} threads")

    encoders = {}
    for dt in ("float32", "bfloat16"):
        t = time.perf_counter()
        encoders[dt] = CaptionEncoder.from_config(LLMEncoderConfig(model="smollm2-135m-instruct", dtype=dt,
                                                                   batch_size=32))
        log(f"loaded SmolLM2 ({dt}) in {time.perf_counter() - t:.1f} s")
    encoders["float32"].encode(texts[:8])  # warm-up
    encoders["bfloat16"].encode(texts[:8])

    rows = {}
    run = [0]

    def job(dt: str) -> None:
        run[0] += 1
        cfg = EmbedConfig(encoder=encoders[dt].config.model_dump(), captions=[str(caps_file)],
                          out=str(tmp / f"job{run[0]}"), shard_size=128, dtype="float16", progress=False)
        run_embedding(cfg, encoder=encoders[dt])

    for dt in ("float32", "bfloat16"):
        s = median_time(lambda: job(dt), args.repeats)
        rows[f"job_{dt}"] = n / s
        log(f"job, {dt} compute: {n / s:.1f} captions/s")

    n_naive = min(args.naive_captions, n)

    def naive() -> None:
        with tarfile.open(tmp / "naive.tar", "w") as tf:
            for key, c in zip(ids[:n_naive], texts[:n_naive]):
                data = encoders["float32"].encode([c]).numpy().astype(np.float32).tobytes()
                info = tarfile.TarInfo(f"{key.replace('/', '_')}.shortsv_captions")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    s = median_time(naive, args.repeats)
    rows["naive"] = n_naive / s
    log(f"naive loop (1 caption per call, fp32, tar of raw fp32): {n_naive / s:.1f} captions/s")

    # ---------------------------------------------------------------- bytes per caption
    store = FeatureStore.open(tmp / "job1")
    vectors = store.get_by_ids(ids).astype(np.float32)
    write_official_tar(tmp / "official.tar", [i.replace("/", "_") for i in ids], vectors)
    tar_bpc = (tmp / "official.tar").stat().st_size / n
    sizes = {"float16": store.disk_bytes() / store.num_ids}
    for dt in ("bfloat16", "float32"):
        sizes[dt] = write_store(tmp / f"size-{dt}", ids, vectors, identity=store.identity, dtype=dt,
                                shard_size=128).disk_bytes() / n
    log(f"bytes/caption: store {sizes}, official tar {tar_bpc:.0f}")

    # ---------------------------------------------------------------- random reads
    m = args.read_rows
    rng = np.random.default_rng(0)
    big = vectors[rng.integers(0, n, m)] + rng.standard_normal((m, vectors.shape[1])).astype(np.float32) * 0.01
    keys = [f"sample{i:08d}" for i in range(m)]
    t = time.perf_counter()
    write_store(tmp / "read-store", keys, big, identity=store.identity, dtype="float16",
                            shard_size=4096)
    write_s = time.perf_counter() - t
    write_official_tar(tmp / "read.tar", keys, big)
    t = time.perf_counter()
    tf = tarfile.open(tmp / "read.tar")
    index = {mem.name.split(".", 1)[0]: mem for mem in tf.getmembers()}
    index_s = time.perf_counter() - t
    batches = [[keys[j] for j in rng.integers(0, m, 256)] for _ in range(args.read_batches)]

    def tar_read(batch):
        return np.stack([np.frombuffer(tf.extractfile(index[k]).read(), dtype=np.float32) for k in batch])

    def timed(fn, batches=batches) -> float:
        ts = []
        for b in batches:
            t = time.perf_counter()
            fn(b)
            ts.append(time.perf_counter() - t)
        return 256 / statistics.median(ts)

    fresh = FeatureStore.open(tmp / "read-store")
    rows["read_store_ids"] = statistics.median(timed(fresh.get_by_ids) for _ in range(args.repeats))
    row_batches = [rng.integers(0, m, 256) for _ in range(args.read_batches)]
    rows["read_store_rows"] = statistics.median(timed(fresh.get_rows, row_batches) for _ in range(args.repeats))
    rows["read_tar"] = statistics.median(timed(tar_read) for _ in range(args.repeats))
    np.testing.assert_allclose(fresh.get_by_ids(batches[0]).astype(np.float32), tar_read(batches[0]), atol=2e-2,
                               rtol=2e-3)
    log(f"reads rows/s: store by id {rows['read_store_ids']:.0f}, by row {rows['read_store_rows']:.0f}, "
        f"tar {rows['read_tar']:.0f}; tar index build {index_s:.2f} s, store write {write_s:.2f} s")

    r = rows
    lines = [
        f"SmolLM2-135M-Instruct (576-d), {n} CuPL captions ({n_naive} in the naive loop), {args.threads} threads; "
        f"medians of {args.repeats} runs.",
        "",
        "| measure | ours | baseline | ratio |",
        "|---|---:|---:|---:|",
        f"| extraction, fp32 compute (captions/s) | {r['job_float32']:.1f} | naive loop {r['naive']:.1f} | "
        f"{r['job_float32'] / r['naive']:.2f}x |",
        f"| extraction, bf16 compute (captions/s) | {r['job_bfloat16']:.1f} | naive loop {r['naive']:.1f} | "
        f"{r['job_bfloat16'] / r['naive']:.2f}x |",
        f"| bytes per caption, fp16 store | {sizes['float16']:.0f} | official fp32 tar {tar_bpc:.0f} | "
        f"{sizes['float16'] / tar_bpc:.2f} |",
        f"| bytes per caption, bf16 store | {sizes['bfloat16']:.0f} | official fp32 tar {tar_bpc:.0f} | "
        f"{sizes['bfloat16'] / tar_bpc:.2f} |",
        f"| bytes per caption, fp32 store | {sizes['float32']:.0f} | official fp32 tar {tar_bpc:.0f} | "
        f"{sizes['float32'] / tar_bpc:.2f} |",
        f"| random reads by id, batches of 256 (rows/s, {m} rows) | {r['read_store_ids']:.0f} | "
        f"tar members {r['read_tar']:.0f} | {r['read_store_ids'] / r['read_tar']:.1f}x |",
        f"| random reads by row, batches of 256 (rows/s) | {r['read_store_rows']:.0f} | "
        f"tar members {r['read_tar']:.0f} | {r['read_store_rows'] / r['read_tar']:.1f}x |",
        "",
        f"The tar reader needs an index of its members first ({index_s:.2f} s for {m} members, not counted); "
        "the store's sorted id file is memory-mapped and binary-searched.",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"rates": rows, "bytes_per_caption": {**sizes, "official_tar": tar_bpc},
                                         "tar_index_s": index_s}, indent=1))


if __name__ == "__main__":
    main()
