"""One GPU check of the whole chain, in a few minutes on one GPU (budget: 8 minutes).

    python benchmarks/gpu_check.py              # on a GPU: writes benchmarks/gpu_check.json and benchmarks/GPU.md
    python benchmarks/gpu_check.py --dry-run    # the same code path on the CPU with tiny settings (tests)

Parts, each in its own process, timed, with a time limit, and recorded as failed (with the end of its error
output) without stopping the others:

1. stage1: caption-contrastive LoRA on SmolLM2-135M-Instruct (bf16 autocast, gradient checkpointing, 20 steps)
2. embed: the stage-1 encoder (the base LLM if stage 1 failed) embeds the scene captions into a feature store
3. stage2_ddp: stage 2 under torchrun with one process (the DDP code path, NCCL on a GPU)
4. stage2_fsdp: the same with train.strategy fsdp
5. throughput: stage-2 steps of ViT-L/14-336 + the 4096-d adapter at bf16, with and without gradient
   checkpointing: images/s, and MFU from the model FLOPs counted on the architecture
   (bench_stage2.train_flops_per_image: 1.15 TFLOP per image) over the GPU's dense bf16 peak

The dry run uses the tiny random Llama, a small ViT, 16-pixel scenes and 2 steps; it writes only to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BUDGET_S = 480  # all parts together; each part's limit is cut to what is left
HOW_TO_RUN = """\
# GPU check

`benchmarks/gpu_check.py` runs the chain once on one GPU in a few minutes (limit 8): stage 1 (caption-contrastive
LoRA on SmolLM2-135M-Instruct, bf16, 20 steps), the embedding pass, stage 2 under torchrun with one process (DDP)
and with `train.strategy: fsdp`, and the stage-2 throughput of ViT-L/14-336 + the 4096-d adapter at bf16 with and
without gradient checkpointing (images/s and MFU; the model FLOPs, 1.15 TFLOP per image for a training step, are
counted on the architecture by `bench_stage2.train_flops_per_image`, recomputation not included).

    .venv/bin/python benchmarks/gpu_check.py                   # writes gpu_check.json and this file
    .venv/bin/python benchmarks/gpu_check.py --peak-tflops 989 # a GPU whose bf16 peak is not in bench_stage2
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/check   # CPU, tiny settings (the test's run)

Each part runs in its own process with a time limit; a failed part is recorded with the end of its error output
and the others still run. The script exits non-zero when a part failed.
"""


def settings(dry: bool, peak_tflops: float | None) -> dict:
    if dry:
        return {"device": "cpu", "llm": "tiny-random-llama", "stage1_steps": 2, "stage1_batch": 8,
                "scenes": 16, "render": 16, "vision": {"kind": "small_vit", "image_size": 16, "patch_size": 4,
                                                       "width": 32, "layers": 2, "heads": 2},
                "stage2_steps": 2, "stage2_batch": 8, "threads": 1,
                "throughput": {"device": "cpu", "threads": 1, "batch": 4, "warmup": 1, "steps": 2,
                               "tower": "small_vit", "text_dim": 32, "count_flops": True},
                "limits": {"stage1": 300, "embed": 200, "stage2_ddp": 200, "stage2_fsdp": 200, "throughput": 200}}
    return {"device": "cuda", "llm": "smollm2-135m-instruct", "stage1_steps": 20, "stage1_batch": 32,
            "scenes": 512, "render": 64, "vision": {"kind": "open_clip", "name": "ViT-B-16"},
            "stage2_steps": 20, "stage2_batch": 64, "threads": None,
            "throughput": {"device": "cuda", "threads": 8, "batch": 128, "warmup": 3, "steps": 10,
                           "tower": "ViT-L-14-336", "text_dim": 4096, "peak_tflops": peak_tflops},
            "limits": {"stage1": 150, "embed": 90, "stage2_ddp": 90, "stage2_fsdp": 90, "throughput": 150}}


# ------------------------------------------------------------------------------------ configs
def _write(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def stage1_config(work: Path, s: dict) -> Path:
    return _write(work / "stage1.yaml", {
        "objective": "contrastive", "out": str(work / "stage1"),
        "encoder": {"model": s["llm"], "max_length": 64, "device": s["device"], "dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32},
        "data": {"cupl_train": True, "cupl_per_class": 2},
        "contrastive": {"batch_size": s["stage1_batch"]},
        "optim": {"steps": s["stage1_steps"], "lr": 2e-4, "warmup_steps": 1, "precision": "bf16",
                  "grad_checkpointing": True},
        "eval": {"final": False}, "save_every": s["stage1_steps"]})


def embed_config(work: Path, s: dict) -> Path:
    from llm2clip.data.scenes import SceneSet

    captions = SceneSet(s["scenes"], render_size=s["render"]).captions()
    with open(work / "captions.jsonl", "w") as f:
        for cid, text in captions.items():
            f.write(json.dumps({"id": cid, "caption": text}) + "\n")
    encoder = work / "stage1" / "encoder"
    model = str(encoder) if (encoder / "llm2clip_encoder.json").is_file() else s["llm"]  # stage 1 may have failed
    return _write(work / "embed.yaml", {
        "encoder": {"kind": "llm", "model": model, "max_length": 64, "dtype": "bfloat16", "batch_size": 64,
                    "device": s["device"]},
        "captions": [str(work / "captions.jsonl")], "out": str(work / "store"), "dtype": "bfloat16",
        "progress": False})


def stage2_config(work: Path, s: dict, strategy: str) -> Path:
    store = work / "store"
    features = ({"store": str(store)} if (store / "manifest.json").is_file()
                else {"encoder": {"kind": "bow", "dim": 32}})  # the embedding pass may have failed
    train = {"batch_size": s["stage2_batch"], "steps": s["stage2_steps"], "precision": "bf16", "strategy": strategy,
             "grad_checkpointing": True, "log_every": 1, "checkpoint_every": 0, "device": s["device"]}
    if s["threads"]:
        train["threads"] = s["threads"]
    return _write(work / f"stage2_{strategy}.yaml", {
        "run_dir": str(work / f"stage2_{strategy}"),
        "model": {"embed_dim": 256, "vision": s["vision"], "text": {"kind": "adapter"}},
        "data": {"train": {"kind": "scenes", "count": s["scenes"], "render_size": s["render"]},
                 "features": features, "workers": 0},
        "optim": {"lr": 1e-4, "warmup_steps": 1}, "train": train})


# -------------------------------------------------------------------------------------- parts
def _env(dry: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if dry:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], limit: float, dry: bool) -> list[str]:
    """Run one part's process; its output lines, or an error carrying the end of its error output."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=_env(dry), cwd=HERE.parent)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-1500:]
        raise RuntimeError(f"over its {limit:.0f} s limit; stderr ends: "
                           f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}") from None
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}; stderr ends:\n{p.stderr[-1500:]}")
    return [x for x in p.stdout.splitlines() if x.strip()]


def _llm2clip(*args: str) -> list[str]:
    return [sys.executable, "-m", "llm2clip", *args]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "llm2clip", *args]


def part_stage1(work: Path, s: dict, limit: float, dry: bool) -> dict:
    lines = _run(_llm2clip("finetune-text", str(stage1_config(work, s))), limit, dry)
    summary = next((x for x in lines if x.startswith("{")), "")  # the run's summary (losses, CRA, time)
    return {"detail": summary[:300]}


def part_embed(work: Path, s: dict, limit: float, dry: bool) -> dict:
    cfg = embed_config(work, s)
    lines = _run(_llm2clip("embed", str(cfg), "--no-progress"), limit, dry)
    return {"detail": lines[-1][:300] if lines else ""}


def _stage2(work: Path, s: dict, limit: float, dry: bool, strategy: str) -> dict:
    cfg = stage2_config(work, s, strategy)
    _run(_torchrun("train", str(cfg), "--no-progress"), limit, dry)
    rows = [json.loads(x) for x in (work / f"stage2_{strategy}" / "metrics.jsonl").read_text().splitlines()
            if x.strip()]
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    return {"detail": f"{len(losses)} logged steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "",
            "losses": losses}


def part_stage2_ddp(work, s, limit, dry):
    return _stage2(work, s, limit, dry, "ddp")


def part_stage2_fsdp(work, s, limit, dry):
    return _stage2(work, s, limit, dry, "fsdp")


def part_throughput(work: Path, s: dict, limit: float, dry: bool) -> dict:
    """Both cases run even when one fails (out of memory without checkpointing, say); any failure fails the part."""
    rows, errors, started = [], [], time.monotonic()
    for ckpt in (False, True):
        case = {**s["throughput"], "precision": "bf16", "kind": "adapter", "grad_ckpt": ckpt,
                "name": f"{s['throughput']['tower']} + adapter {s['throughput']['text_dim']}-d, bf16"
                        + (" + grad ckpt" if ckpt else "")}
        try:
            left = limit - (time.monotonic() - started)
            lines = _run([sys.executable, str(HERE / "bench_stage2.py"), "--case", json.dumps(case)], left, dry)
            line = next((x for x in lines if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"no RESULT line from bench_stage2.py: {lines[-3:]}")
            rows.append(json.loads(line[7:]))
        except Exception as err:
            errors.append(f"{case['name']}: {type(err).__name__}: {err}")
    detail = "; ".join(f"{r['images_per_s']:.1f} images/s" + (f", MFU {100 * r['mfu']:.1f} %"
                                                               if r.get("mfu") is not None else "") for r in rows)
    return {"ok": not errors, "error": "\n".join(errors) or None, "detail": detail, "rows": rows}


PARTS = {"stage1": part_stage1, "embed": part_embed, "stage2_ddp": part_stage2_ddp,
         "stage2_fsdp": part_stage2_fsdp, "throughput": part_throughput}


# ------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    lines = [f"Run {result['started']} on {result['device']} (torch {result['torch']}); "
             f"{result['seconds']:.0f} s in all.", "",
             "| part | result | seconds | detail |", "|---|---|---:|---|"]
    for p in result["parts"]:
        detail = p.get("detail") if p["ok"] else p["error"].splitlines()[-1] if p["error"] else ""
        lines.append(f"| {p['name']} | {'ok' if p['ok'] else 'FAILED'} | {p['seconds']:.1f} | "
                     f"{(detail or '').replace('|', '/')} |")
    rows = next((p.get("rows") for p in result["parts"] if p["name"] == "throughput"), None)
    if rows:
        lines += ["", "| case | batch | images/s | train TFLOP per image | MFU | peak memory (GiB) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            tf = f"{r['train_tflop_per_image']:.3g}" if r.get("train_tflop_per_image") else "-"
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
            lines.append(f"| {r['name']} | {r['batch']} | {r['images_per_s']:.1f} | {tf} | {mfu} | "
                         f"{r['peak_mem_GiB']:.1f} |")
    return "\n".join(lines) + "\n"


def run_check(out: Path, dry: bool, peak_tflops: float | None = None, parts=None, budget: float = BUDGET_S) -> dict:
    import torch

    s = settings(dry, peak_tflops)
    device = torch.cuda.get_device_name(0) if not dry else f"CPU ({platform.machine()}, dry run)"
    result = {"started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
              "torch": torch.__version__, "dry_run": dry, "parts": []}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        for name, fn in PARTS.items():
            if parts and name not in parts:
                continue
            left = budget - (time.monotonic() - t0)
            limit = min(s["limits"][name], left)
            start = time.monotonic()
            rec = {"name": name, "ok": False, "error": None}
            try:
                if limit < 5:
                    raise RuntimeError("not run: the check's time budget is spent")
                got = fn(work, s, limit, dry)
                rec.update(got, ok=got.get("ok", True))
            except Exception as err:  # one part's failure is recorded; the rest still run
                rec["error"] = f"{type(err).__name__}: {err}"
            rec["seconds"] = time.monotonic() - start
            result["parts"].append(rec)
            print(f"{name}: {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']:.1f} s "
                  f"{rec.get('detail') or rec['error'] or ''}"[:400], file=sys.stderr)
    result["seconds"] = time.monotonic() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "gpu_check.md").write_text(table)
    if not dry:  # figures go into the repository's GPU.md only from a GPU
        (HERE / "GPU.md").write_text(HOW_TO_RUN + "\n## Latest run\n\n" + table)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 2 steps: the code path, no figures")
    ap.add_argument("--out", type=Path, help="where gpu_check.json and gpu_check.md go (default: benchmarks/, or a "
                                             "temporary folder for a dry run)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when bench_stage2 does not know it")
    ap.add_argument("--part", action="append", choices=list(PARTS), help="run only these parts (repeatable)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    args = ap.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no GPU here: use --dry-run for the CPU code path", file=sys.stderr)
            return 2
    out = args.out or (HERE if not args.dry_run else Path(tempfile.mkdtemp(prefix="gpu-check-out-")))
    result = run_check(out, args.dry_run, args.peak_tflops, args.part, args.budget)
    print(markdown(result))
    print(f"written: {out / 'gpu_check.json'}")
    return 0 if all(p["ok"] for p in result["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
