"""Load test of `llm2clip serve`: text-search throughput and latency, micro-batching on against off.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serve.py --model RUN/model \\
        [--images 10000] [--clients 1 8 32] [--seconds 15] [--out benchmarks/SERVE.md]

Without --model a tiny stage-2 model with the tiny random LLM caption encoder is trained first (seconds);
with one (e.g. a quickstart-style run whose caption encoder is SmolLM2), its own encoder is used.

1. An index of ``--images`` generated scene PNGs is built (cached in --work between runs).
2. Two servers are started as subprocesses of `llm2clip serve` on 127.0.0.1: micro-batching on
   (--batch-wait-ms 5 --max-batch 32, padded batches) and off (--max-batch 1).
3. For each client count, both servers are loaded in turn (interleaved, the order alternating), each for
   ``--seconds``: every client posts a dense scene caption (k=10) and posts the next when answered. Requests
   in flight at the end are awaited and counted. Server RSS (VmRSS) is read before and after.
The load generator runs on the same cores as the server: the machine's load is recorded with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench_common import log, uptime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny model helpers for the default model




def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tiny_model(work: Path) -> Path:
    from stage2_helpers import tiny_run_config

    from llm2clip.config import parse_config
    from llm2clip.text.tiny import make_tiny_llm
    from llm2clip.train.config import RunConfig
    from llm2clip.train.loop import fit

    run = work / "tiny-run"
    if not (run / "model").is_dir():
        llm = make_tiny_llm(work / "tiny-llm", "llama")
        enc = {"kind": "llm", "model": str(llm), "max_length": 256, "batch_size": 32}
        cfg = tiny_run_config(run, train__steps=2, data__val=None, data__features={"encoder": enc})
        fit(parse_config(cfg, RunConfig), progress=False)
    return run / "model"


def build(args, model: Path) -> Path:
    from llm2clip.data.scenes import SceneSet
    from llm2clip.search import build_index

    photos = args.work / f"scenes-{args.images}"
    index = args.work / f"index-{args.images}-{model.parent.name}"
    if not (photos / ".done").is_file():
        log(f"rendering {args.images} scene PNGs into {photos}")
        photos.mkdir(parents=True, exist_ok=True)
        scenes = SceneSet(args.images, seed=5, render_size=args.render_size)
        for i in range(args.images):
            sub = photos / f"{i // 1000:02d}"
            sub.mkdir(exist_ok=True)
            scenes.image(i).save(sub / f"scene{i:05d}.png")
        (photos / ".done").write_text("ok")
    if args.fresh:
        shutil.rmtree(index, ignore_errors=True)
    t = time.perf_counter()
    res = build_index(photos, model, index, batch_size=128, progress=False)
    state = "cached" if res.already_complete else "built"
    log(f"index of {res.count} images: {time.perf_counter() - t:.0f} s ({state})")
    return index


def queries(kind: str = "dense", n: int = 400) -> list[str]:
    """Scene captions, shuffled: dense (about 60-170 tokens) or short (about 10)."""
    from llm2clip.data.scenes import SceneSet

    scenes = SceneSet(n, seed=99, offset=5_000_000)
    out = [scenes[i].dense_caption() if kind == "dense" else scenes[i].short_caption() for i in range(n)]
    random.Random(0).shuffle(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # the package of this checkout, unless PYTHONPATH names another copy
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTHONPATH", str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "llm2clip", "serve", str(index), "--model", str(model),
                             "--port", str(port), "--log-level", "warning", "--device", "cpu", *extra], env=env)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    async with httpx.AsyncClient() as c:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server at {url} exited with {proc.returncode}")
            try:
                if (await c.get(url + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url}: not ready after {timeout} s")


async def load(url: str, clients: int, seconds: float, texts: list[str], k: int) -> dict:
    import httpx

    lat, errors, statuses = [], 0, {}
    stop = time.perf_counter() + seconds
    nxt = iter(range(10**9))

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            text = texts[next(nxt) % len(texts)]
            t = time.perf_counter()
            try:
                r = await c.post(url + "/v1/search", json={"text": text, "k": k})
                ok = r.status_code == 200
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            except httpx.HTTPError as err:
                ok = False
                statuses[type(err).__name__] = statuses.get(type(err).__name__, 0) + 1
            if ok:
                lat.append(time.perf_counter() - t)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=600) as c:
        await asyncio.gather(*[client(c) for _ in range(clients)])
    wall = time.perf_counter() - t0
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {"clients": clients, "requests": len(lat), "errors": errors, "wall_s": wall, "rps": len(lat) / wall,
            "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99), "statuses": statuses}


async def health(url: str) -> dict:
    import httpx

    async with httpx.AsyncClient() as c:
        return (await c.get(url + "/health")).json()


def report(args, model: Path, rows: list[dict], servers: dict, before: str, after: str, n_images: int) -> str:
    from llm2clip.fileio import markdown_table

    base = {r["clients"]: r for r in rows if r["mode"] == "off"}
    table = markdown_table(
        ["clients", "batching", "requests", "errors", "req/s", "vs off", "p50 ms", "p95 ms", "p99 ms", "wall s"],
        [[r["clients"], r["mode"], r["requests"], r["errors"], f"{r['rps']:.2f}",
          f"{r['rps'] / base[r['clients']]['rps']:.2f}x" if base.get(r["clients"], {}).get("rps") else "-",
          f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['wall_s']:.1f}"] for r in rows],
        ["r", "l", "r", "r", "r", "r", "r", "r", "r", "r"])
    mem = markdown_table(["batching", "RSS before MB", "RSS after MB", "caption-encoder calls", "text queries"],
                         [[m, f"{s['rss_before']:.0f}", f"{s['rss_after']:.0f}", s["health"]["text_batches"],
                           s["health"]["text_queries"]] for m, s in servers.items()], ["l", "r", "r", "r", "r"])
    return "\n".join([
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: `{' '.join(sys.argv)}`", "",
        f"Model {model} ({args.model_note}); index of {n_images} images; queries: {args.queries} scene captions, k=10; "
        f"{args.seconds:.0f} s per run, in-flight requests awaited; server torch threads: {args.threads or 'default'}. "
        f"Load before: `{before}`; after: `{after}`.", "",
        table, "", mem, ""])


async def run(args) -> None:
    model = args.model or tiny_model(args.work)
    args.model_note = "given" if args.model else "tiny stage-2 model, tiny random LLM caption encoder"
    index = build(args, model)
    texts = queries(args.queries)
    modes = {"on": ["--batch-wait-ms", str(args.batch_wait_ms), "--max-batch", str(args.max_batch)],
             "off": ["--batch-wait-ms", "0", "--max-batch", "1"]}
    threads = ["--threads", str(args.threads)] if args.threads else []
    procs = {m: start_server(index, model, extra + threads) for m, extra in modes.items()}
    servers: dict = {}
    rows = []
    before = uptime()
    try:
        for m, (proc, url) in procs.items():
            await wait_ready(url, proc)
            await load(url, 2, 2, texts, args.k)  # warm up: first forwards, allocator
            servers[m] = {"rss_before": rss_mb(proc.pid)}
        for i, clients in enumerate(args.clients):
            for m in (list(modes) if i % 2 == 0 else list(modes)[::-1]):
                r = await load(procs[m][1], clients, args.seconds, texts, args.k)
                r["mode"] = m
                rows.append(r)
                log(f"{clients:>3} clients, batching {m}: {r['rps']:.2f} req/s, p50 {r['p50_ms']:.0f} ms, "
                    f"p99 {r['p99_ms']:.0f} ms, {r['errors']} errors ({uptime()})")
        for m, (proc, url) in procs.items():
            servers[m].update(rss_after=rss_mb(proc.pid), health=await health(url))
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(30)
    after = uptime()
    rows.sort(key=lambda r: (r["clients"], r["mode"] != "off"))
    text = report(args, model, rows, servers, before, after, int(json.loads((index / "manifest.json").read_text())
                                                                   ["count"]))
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "servers": servers, "load_before": before,
                                         "load_after": after}, indent=1, default=str) + "\n")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
        log(f"appended to {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a trained model folder (default: a tiny one, trained first)")
    ap.add_argument("--images", type=int, default=10_000, help="scene PNGs in the index (default 10000)")
    ap.add_argument("--render-size", type=int, default=32, help="PNG size in pixels (default 32)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (1 8 32)")
    ap.add_argument("--seconds", type=float, default=15, help="seconds of load per run (default 15)")
    ap.add_argument("--batch-wait-ms", type=float, default=5)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--queries", choices=["dense", "short"], default="dense", help="caption kind (default dense)")
    ap.add_argument("--threads", type=int, help="the servers' torch threads (default: torch's choice)")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_serve", help="cache of images and indexes")
    ap.add_argument("--out", type=Path, help="append the Markdown report here")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--fresh", action="store_true", help="rebuild the index")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
