"""Stage-2 training throughput: LLM2CLIP (vision tower + adapter over stored caption embeddings)
against open_clip's own CLIP training step (same vision tower, its 12-layer text transformer).

Every case runs in its own process (peak memory is that process's), on the same thread count,
with the same batch and tower; the table reports the median step time over the timed steps, images/s
and the ratio to open_clip's step. Timings on a shared machine swing: read medians and ratios.

    python benchmarks/bench_stage2.py                  # CPU, 2 threads (STAGE2.md)
    python benchmarks/bench_stage2.py --gpu            # GPU: ViT-L/14-336, bf16, batch 64, +/- grad checkpointing

On a GPU each row also gives the model FLOPs of a training step per image (forward + backward, counted on the
architecture by ``train_flops_per_image``; recomputation under gradient checkpointing is not counted) and the MFU
against the GPU's dense bf16 peak (``peak_bf16_tflops``). benchmarks/gpu_check.py uses the same two functions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A small open_clip ViT (32 px, patch 4, width 128, 4 layers) registered as a config, so that open_clip's
# CLIP and ours build the very same tower; the text side is open_clip's standard CLIP text transformer.
SMALL_VIT = {"image_size": 32, "layers": 4, "width": 128, "patch_size": 4, "head_width": 32}
CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}


def _register(tmp: Path, vision_cfg: dict, name: str) -> None:
    import open_clip

    (tmp / f"{name}.json").write_text(json.dumps({"embed_dim": 512, "vision_cfg": vision_cfg, "text_cfg": CLIP_TEXT}))
    open_clip.add_model_config(tmp)


def _case_model(case: dict):
    """(model, make_batch, step_fn) for one case."""
    import torch

    dev = torch.device(case["device"])
    B = case["batch"]
    if case["kind"] == "open_clip":
        import open_clip

        model = open_clip.create_model(case["tower"], pretrained=None).to(dev)
        loss_fn = open_clip.ClipLoss()
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size

        def batch():
            return torch.randn(B, 3, size, size, device=dev), torch.randint(1, 49407, (B, 77), device=dev)

        def forward(x, t):
            img, txt, scale = model(x, t)[:3]
            return loss_fn(img, txt, scale)
    else:
        from llm2clip.losses import ClipLoss
        from llm2clip.model import LLM2CLIP, ModelConfig

        vision = ({"kind": "small_vit", "image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "heads": 4}
                  if case["tower"] == "small_vit" else {"kind": "open_clip", "name": case["tower"]})
        text = ({"kind": "adapter"} if case["kind"] == "adapter"
                else {"kind": "clip", **{k: CLIP_TEXT[k] for k in ("width", "heads", "layers")}})
        model = LLM2CLIP(ModelConfig(vision=vision, text=text, embed_dim=case.get("embed_dim", 1280)),
                         text_dim=case.get("text_dim")).to(dev)
        loss_fn = ClipLoss()
        size = model.visual.image_size

        def batch():
            t = (torch.randn(B, case["text_dim"], device=dev).half() if case["kind"] == "adapter"
                 else torch.randint(1, 49407, (B, 77), device=dev))
            return torch.randn(B, 3, size, size, device=dev), t

        def forward(x, t):
            i, tx = model(x, t)
            return loss_fn(i, tx, model.logit_scale)

    if case.get("grad_ckpt"):
        model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    return model, batch, forward, opt


# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, first match wins: the MFU denominator.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0), ("L4", 121.0))


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


def train_flops_per_image(case: dict) -> float | None:
    """FLOPs of one training step per image (forward + backward, no recomputation) of the case's model: the
    vision tower plus the adapter (or open_clip's whole CLIP), counted by torch's FlopCounterMode on copies
    built on the meta device (no memory, no compute). ViT-L/14-336 gives 1.145 TFLOP. None for the CLIP-text
    case of our code, which the GPU set does not run."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from llm2clip.model import TextAdapter
    from llm2clip.vision.config import SmallViTConfig
    from llm2clip.vision.towers import SmallViT

    n = 2
    with torch.device("meta"):
        if case["kind"] == "open_clip":
            model = open_clip.create_model(case["tower"], pretrained=None, device="meta")
            size = model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            inputs = (torch.randn(n, 3, size, size), torch.randint(1, 49407, (n, 77)))
            parts = [(lambda x, t: model(x, t)[:2], inputs)]
        elif case["kind"] == "adapter":
            if case["tower"] == "small_vit":
                tower = SmallViT(SmallViTConfig(image_size=32, patch_size=4, width=128, layers=4, heads=4))
                size = 32
            else:
                tower = open_clip.create_model(case["tower"], pretrained=None, device="meta").visual
                size = tower.image_size
                size = size[0] if isinstance(size, (tuple, list)) else size
            adapter = TextAdapter(case["text_dim"], case.get("embed_dim", 1280))
            parts = [(lambda x: (tower(x),), (torch.randn(n, 3, size, size),)),
                     (lambda t: (adapter(t),), (torch.randn(n, case["text_dim"]),))]
        else:
            return None
        counter = FlopCounterMode(display=False)
        with counter:
            for fn, inputs in parts:
                sum(o.float().sum() for o in fn(*inputs)).backward()
    return counter.get_total_flops() / n


def run_case(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        _register(Path(tmp), SMALL_VIT, "bench-small-ViT")
        model, batch, forward, opt = _case_model(case)
    dev = torch.device(case["device"])
    cuda = dev.type == "cuda"
    ac = (torch.autocast(dev.type, dtype=torch.bfloat16) if case.get("precision") == "bf16"
          else torch.autocast(dev.type, enabled=False))
    model.train()
    x, t = batch()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(case["warmup"] + case["steps"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ac:
            loss = forward(x, t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= case["warmup"]:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    text_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("text", "transformer.",
                      "token_embedding", "positional_embedding", "ln_final", "text_projection")))
    flops = mfu = None
    if cuda or case.get("count_flops"):
        flops = train_flops_per_image(case)
        peak = case.get("peak_tflops") or (peak_bf16_tflops(torch.cuda.get_device_name(dev)) if cuda else None)
        mfu = flops * case["batch"] / med / (peak * 1e12) if flops and peak else None
    return {**case, "median_step_s": med, "images_per_s": case["batch"] / med, "params_M": params / 1e6,
            "text_params_M": text_params / 1e6, "train_tflop_per_image": flops / 1e12 if flops else None, "mfu": mfu,
            "peak_mem_GiB": (torch.cuda.max_memory_allocated() / 2**30 if cuda
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)}


def cpu_cases(threads: int, batch: int, steps: int) -> list[dict]:
    base = {"device": "cpu", "threads": threads, "batch": batch, "warmup": 2, "steps": steps, "precision": "fp32"}
    return [
        {**base, "name": "open_clip CLIP step (text transformer 12x512, 77 tok)", "kind": "open_clip",
         "tower": "bench-small-ViT"},
        {**base, "name": "llm2clip, CLIP text tower (same as above, our code)", "kind": "clip",
         "tower": "bench-small-ViT"},
        {**base, "name": "llm2clip, adapter over stored 576-d (SmolLM2)", "kind": "adapter",
         "tower": "bench-small-ViT", "text_dim": 576},
        {**base, "name": "llm2clip, adapter over stored 2048-d (Llama-3.2-1B)", "kind": "adapter",
         "tower": "bench-small-ViT", "text_dim": 2048},
        {**base, "name": "llm2clip, adapter 576-d, our SmallViT tower", "kind": "adapter", "tower": "small_vit",
         "text_dim": 576},
    ]


def gpu_cases(batch: int, steps: int) -> list[dict]:
    base = {"device": "cuda", "threads": 8, "batch": batch, "warmup": 3, "steps": steps, "precision": "bf16",
            "tower": "ViT-L-14-336"}
    out = []
    for ck in (False, True):
        tag = " + grad ckpt" if ck else ""
        out += [
            {**base, "grad_ckpt": ck, "name": f"open_clip CLIP step ViT-L/14-336{tag}", "kind": "open_clip"},
            {**base, "grad_ckpt": ck, "name": f"llm2clip ViT-L/14-336 + adapter 4096-d{tag}", "kind": "adapter",
             "text_dim": 4096},
        ]
    return out


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["kind"] == "open_clip" and not r.get("grad_ckpt")), None)
    mem = "peak GPU mem (GiB)" if rows and rows[0]["device"] != "cpu" else "peak RSS (GiB)"
    mfu = any(r.get("mfu") is not None for r in rows)
    extra, rule = (" TFLOP per image (train) | MFU |", "---:|---:|") if mfu else ("", "")
    lines = [f"| case | params (M) | text side (M) | median step (s) | images/s (median) | images/s, each repeat | "
             f"vs open_clip | {mem} |{extra}", "|---|---:|---:|---:|---:|---|---:|---:|" + rule]
    for r in rows:
        ratio = r["images_per_s"] / ref["images_per_s"] if ref else float("nan")
        reps = ", ".join(f"{x:.1f}" for x in r.get("repeats", [r["images_per_s"]]))
        more = ""
        if mfu:
            tf, m = r.get("train_tflop_per_image"), r.get("mfu")
            more = f" {tf:.3f} |" if tf else " - |"
            more += f" {100 * m:.1f} % |" if m is not None else " - |"
        lines.append(f"| {r['name']} | {r['params_M']:.1f} | {r['text_params_M']:.1f} | {r['median_step_s']:.2f} | "
                     f"{r['images_per_s']:.1f} | {reps} | {ratio:.1f}x | {r['peak_mem_GiB']:.2f} |{more}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the GPU cases: ViT-L/14-336, bf16, +/- grad checkpointing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="default 64")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 8 CPU, 20 GPU)")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole set this many times; median per case")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for the MFU, when it is not in "
                    "PEAK_BF16_TFLOPS")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:  # child process
        print("RESULT " + json.dumps(run_case(json.loads(args.case))))
        return 0
    batch = args.batch or 64
    cases = gpu_cases(batch, args.steps or 20) if args.gpu else cpu_cases(args.threads, batch, args.steps or 8)
    cases = [{**c, "peak_tflops": args.peak_tflops} for c in cases]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for c in cases:
            p = subprocess.run([sys.executable, __file__, "--case", json.dumps(c)], capture_output=True, text=True,
                               env=env)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"case failed: {c['name']}\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(line[7:])
            results.setdefault(c["name"], []).append(r)
            print(f"[{rep + 1}/{args.repeats}] {c['name']}: {r['images_per_s']:.1f} images/s", file=sys.stderr)
    rows = []
    for runs in results.values():
        med = sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]
        rows.append({**med, "repeats": [r["images_per_s"] for r in runs]})
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
