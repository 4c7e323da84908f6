"""Levers for a cheaper stage 2 of the quickstart (3 seeds per variant in the wall time of one).

Every figure comes from the real trainer (``llm2clip.train.loop.Stage2Trainer``): the generated scenes,
the feature store, the PairDataset/StepBatchSampler loader, the model, the CLIP loss, grad clipping,
AdamW and the scheduler, as ``llm2clip quickstart`` builds them (``pipeline/plan.py::_train_stage``).

    python benchmarks/bench_stage2_levers.py shapes   # images/s per tower shape, 1 thread, interleaved rounds
    python benchmarks/bench_stage2_levers.py threads  # 2 processes x 1 thread against 1 process x 2 threads
    python benchmarks/bench_stage2_levers.py profile  # where one step's time goes (~30 steps)
    python benchmarks/bench_stage2_levers.py quality  # held-out dense R@1 of whole runs (slow: one run at a time)
    python benchmarks/bench_stage2_levers.py clip-text  # the CLIP text tower: open_clip's forward vs length buckets
    python benchmarks/bench_stage2_levers.py data       # a batch's samples one by one vs the batched text lookup
    python benchmarks/bench_stage2_levers.py overhead   # the model step: eager vs torch.compile vs vmapped ensemble
    python benchmarks/bench_stage2_levers.py adamw      # AdamW's step: per-tensor loop vs foreach vs fused

``shapes`` builds every case in one process (1 thread), then runs rounds; each round times every case
in turn (a few warm-up steps, then a fixed number of timed steps) and the table gives the median
images/s and the median over rounds of each case's ratio to the first (today's) case, measured in the
same round, so a neighbour's load shifts both. The 1-minute load average is printed per round.

The feature store defaults to the one an earlier quickstart left in runs/quickstart/embed/minilm
(caption ids = the preset's scenes: seed 0, 800 train, 200 val at offset 1000000).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE = ROOT / "runs" / "quickstart" / "embed" / "minilm"

# The quickstart preset's stage-2 run config for one adapter variant (teacher minilm, dense 0.5), as
# pipeline/plan.py::_train_stage builds it with parallel 2 (threads 1).
SCENES = {"kind": "scenes", "seed": 0, "min_objects": 2, "max_objects": 5, "render_size": 32}
BASE = {
    "seed": 0,
    "model": {"embed_dim": 256,
              "vision": {"kind": "small_vit", "image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "heads": 4},
              "text": {"kind": "adapter", "depth": 4, "expansion": 2, "standardize": True}},
    "data": {"train": {**SCENES, "count": 800, "offset": 0}, "val": {**SCENES, "count": 200, "offset": 1000000},
             "val_max": 200, "caption_kinds": {"short": 0.5, "dense": 0.5}},
    "optim": {"lr": 1.0e-3, "weight_decay": 0.05, "layer_decay": 1.0, "warmup_steps": 30, "grad_clip": 5.0},
    "train": {"batch_size": 64, "steps": 350, "log_every": 10, "eval_every": 175, "checkpoint_every": 175,
              "device": "cpu", "threads": 1},
}
CLIP_TEXT = {"kind": "clip", "context_length": 77, "width": 128, "heads": 4, "layers": 4}  # the preset's clip teacher

# name -> vision overrides, or train.precision (today's first: every ratio is against it)
SHAPES = {
    "today: patch 4, width 128, 4 layers (65 tokens)": {},
    "patch 8 (17 tokens)": {"patch_size": 8},
    "width 96": {"width": 96},
    "3 layers": {"layers": 3},
    "patch 8, width 96": {"patch_size": 8, "width": 96},
    "patch 8, 3 layers": {"patch_size": 8, "layers": 3},
    "today's tower, bf16 autocast": {"precision": "bf16"},
}

# name -> (vision overrides, steps, lr, warmup[, train overrides]) for the quality runs
SETTINGS = {
    "today (p4, 350 steps, lr 1e-3, warmup 30)": ({}, 350, 1e-3, 30),
    "p8, 350 steps, lr 1e-3, warmup 30": ({"patch_size": 8}, 350, 1e-3, 30),
    "p4, 175 steps, lr 2e-3, warmup 15": ({}, 175, 2e-3, 15),
    "p8, 175 steps, lr 2e-3, warmup 15": ({"patch_size": 8}, 175, 2e-3, 15),
    "p8 w96, 350 steps, lr 1e-3, warmup 30": ({"patch_size": 8, "width": 96}, 350, 1e-3, 30),
    "p8, 250 steps, lr 1e-3, warmup 20": ({"patch_size": 8}, 250, 1e-3, 20),
    "p4 w96, 350 steps, lr 1e-3, warmup 30": ({"width": 96}, 350, 1e-3, 30),
    "p8 w96, batch 32, 350 steps, lr 1e-3, warmup 30": ({"patch_size": 8, "width": 96}, 350, 1e-3, 30,
                                                        {"batch_size": 32}),
}


def run_config(store: Path | None, vision: dict | None = None, *, clip: bool = False, steps: int | None = None,
               lr: float | None = None, warmup: int | None = None, seed: int = 0, threads: int = 1,
               run_dir: str = "", train: dict | None = None) -> dict:
    d = copy.deepcopy(BASE)
    d["run_dir"], d["seed"] = run_dir, seed
    vision = dict(vision or {})
    if "precision" in vision:
        d["train"]["precision"] = vision.pop("precision")
    d["model"]["vision"].update(vision)
    if clip:
        d["model"]["text"] = dict(CLIP_TEXT)
    elif store is not None and (store / "manifest.json").is_file():
        d["data"]["features"] = {"store": str(store.absolute())}
    else:  # no store here: the bag-of-words stand-in at MiniLM's width, embedded in memory
        d["data"]["features"] = {"encoder": {"kind": "bow", "dim": 384}}
    if steps is not None:
        d["train"].update(steps=steps, eval_every=steps // 2, checkpoint_every=steps // 2)
    if lr is not None:
        d["optim"]["lr"] = lr
    if warmup is not None:
        d["optim"]["warmup_steps"] = warmup
    d["train"]["threads"] = threads
    d["train"].update(train or {})
    return d


def load1() -> float:
    return os.getloadavg()[0]


def interleaved(cases: dict, rounds: int, reps: int = 1) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per call of each case, per round (each round times every case in turn, ``reps`` calls each, so a
    neighbour's load shifts them alike), and the 1-minute load average after each round."""
    per: dict[str, list[float]] = {k: [] for k in cases}
    loads = []
    for _ in range(rounds):
        for name, fn in cases.items():
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            per[name].append((time.perf_counter() - t) / reps)
        loads.append(load1())
    return per, loads


def preset_model_config():
    """The quickstart preset's stage-2 model: tower patch 8 / width 96, the adapter."""
    from llm2clip.model import ModelConfig

    cfg = copy.deepcopy(BASE["model"])
    cfg["vision"].update(patch_size=8, width=96)
    return ModelConfig.model_validate(cfg)


class Harness:
    """A trainer built up to its loader, stepped by hand (no evaluation, no checkpoints)."""

    def __init__(self, cfg: dict):
        from llm2clip.train.config import RunConfig
        from llm2clip.train.loop import Stage2Trainer

        self.tmp = tempfile.TemporaryDirectory()
        cfg = {**cfg, "run_dir": self.tmp.name}
        cfg["train"] = {**cfg["train"], "steps": 10**6}  # never runs out of batches
        self.tr = tr = Stage2Trainer(RunConfig.model_validate(cfg), resume=False, progress=False)
        import torch

        torch.manual_seed(tr.cfg.seed)
        tr.data()
        tr.model()
        tr.restore()
        tr.loaders()
        tr._it, tr._n = iter(tr.loader), 0
        tr.train_model.train()
        self.params = sum(p.numel() for p in tr.net.parameters())
        self.visual_params = sum(p.numel() for p in tr.net.visual.parameters())

    def steps(self, n: int) -> float:
        """Seconds for n training steps."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.tr.train_step()
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- shapes
def cmd_shapes(args) -> None:
    import torch

    torch.set_num_threads(1)
    cases = {name: run_config(args.store, v) for name, v in SHAPES.items()}
    if args.clip:
        cases["CLIP text tower variant, today's tower"] = run_config(args.store, {}, clip=True)
        cases["CLIP text tower variant, patch 8"] = run_config(args.store, {"patch_size": 8}, clip=True)
        cases["CLIP text tower variant, patch 8, width 96"] = run_config(args.store, {"patch_size": 8, "width": 96},
                                                                          clip=True)
    if args.only:  # today's case always stays: the ratios are against it
        ref0 = next(iter(cases))
        cases = {n: c for n, c in cases.items() if n == ref0 or any(o in n for o in args.only)}
    hs = {}
    for name, c in cases.items():
        hs[name] = Harness(c)
        print(f"built {name}: {hs[name].params / 1e6:.2f}M params ({hs[name].visual_params / 1e6:.2f}M vision)",
              file=sys.stderr)
    B = BASE["train"]["batch_size"]
    ips: dict[str, list[float]] = {n: [] for n in hs}
    ratios: dict[str, list[float]] = {n: [] for n in hs}
    loads = []
    ref = next(iter(hs))
    for r in range(args.rounds):
        row = {}
        for name, h in hs.items():
            h.steps(args.warmup)
            row[name] = args.steps * B / h.steps(args.steps)
            ips[name].append(row[name])
        for name in hs:
            ratios[name].append(row[name] / row[ref])
        loads.append(load1())
        print(f"round {r + 1}/{args.rounds} (load {loads[-1]:.2f}): "
              + ", ".join(f"{n.split(':')[0]} {v:.0f}" for n, v in row.items()), file=sys.stderr)
    print(f"\n1 thread, batch {B}, {args.warmup} warm-up + {args.steps} timed steps per case per round, "
          f"{args.rounds} rounds; 1-min load average per round: {', '.join(f'{x:.2f}' for x in loads)}\n")
    print("| case | params (M) | vision (M) | images/s (median) | images/s, each round "
          "| vs today (median of per-round ratios) |")
    print("|---|---:|---:|---:|---|---:|")
    for name, h in hs.items():
        print(f"| {name} | {h.params / 1e6:.2f} | {h.visual_params / 1e6:.2f} | {statistics.median(ips[name]):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in ips[name])} | {statistics.median(ratios[name]):.2f}x |")


# ---------------------------------------------------------------------------------------- clip-text
def cmd_clip_text(args) -> None:
    """The CLIP-text-tower variant's training step with open_clip's forward (every caption at 77 positions)
    against the length-bucketed forward (llm2clip.text.clip_tower), at several dense shares; interleaved."""
    import torch

    from llm2clip.text.clip_tower import clip_text_forward

    torch.set_num_threads(1)
    vision = {"patch_size": 8, "width": 96}  # the preset's tower
    hs = {}
    for dense in args.dense:
        for mode in ("open_clip", "buckets"):
            cfg = run_config(args.store, vision, clip=True)
            cfg["data"]["caption_kinds"] = {k: v for k, v in {"short": 1 - dense, "dense": dense}.items() if v > 0}
            h = Harness(cfg)
            tower = h.tr.net.text
            tower.forward = ((lambda tokens, t=tower: t.transformer(tokens)) if mode == "open_clip"
                             else (lambda tokens, t=tower: clip_text_forward(t.transformer, tokens)))
            hs[(dense, mode)] = h
    B = BASE["train"]["batch_size"]
    ips: dict = {k: [] for k in hs}
    loads = []
    for r in range(args.rounds):
        for k, h in hs.items():
            h.steps(args.warmup)
            ips[k].append(args.steps * B / h.steps(args.steps))
        loads.append(load1())
        print(f"round {r + 1}/{args.rounds} (load {loads[-1]:.2f}): "
              + ", ".join(f"{d}/{m} {ips[(d, m)][-1]:.0f}" for d, m in hs), file=sys.stderr)
    print(f"\n1 thread, batch {B}, tower patch 8 / width 96, CLIP text 77 tokens width 128 x 4 layers; {args.warmup} "
          f"warm-up + {args.steps} timed steps per case per round, {args.rounds} rounds; 1-min load average per "
          f"round: {', '.join(f'{x:.2f}' for x in loads)}\n")
    print("| dense share | images/s, open_clip forward (median) | images/s, length buckets (median) "
          "| buckets vs open_clip (median of per-round ratios) | per-round ratios |")
    print("|---:|---:|---:|---:|---|")
    for dense in args.dense:
        a, b = ips[(dense, "open_clip")], ips[(dense, "buckets")]
        rs = [y / x for x, y in zip(a, b)]
        print(f"| {dense:g} | {statistics.median(a):.0f} | {statistics.median(b):.0f} | "
              f"{statistics.median(rs):.2f}x | {', '.join(f'{x:.2f}' for x in rs)} |")


# --------------------------------------------------------------------------------------------- data
def cmd_data(args) -> None:
    """The training data of a step (the trainer's own dataset and batch keys): each sample fetched alone, its
    caption vector looked up by itself, against ``PairDataset.__getitems__`` (one store lookup per batch)."""
    import torch

    torch.set_num_threads(1)
    h = Harness(run_config(args.store, {"patch_size": 8, "width": 96}))
    ds, sampler = h.tr.loader.dataset, h.tr.loader.batch_sampler
    keys = [b for _, b in zip(range(args.batches), iter(sampler))]
    ds.__getitems__(keys[0])  # open the store's files (and their checks) before timing

    def one_by_one():
        for b in keys:
            [ds[k] for k in b]

    def batched():
        for b in keys:
            ds.__getitems__(b)

    secs, loads = interleaved({"one by one": one_by_one, "batched": batched}, args.rounds)
    per = {k: [1e3 * x / len(keys) for x in v] for k, v in secs.items()}
    ratios = [a / b for a, b in zip(per["one by one"], per["batched"])]
    print(f"\n{len(keys)} batches of {len(keys[0])}, {args.rounds} interleaved rounds, 1 thread; 1-min load average "
          f"per round: {', '.join(f'{x:.2f}' for x in loads)}\n")
    print("| data path | ms per batch (median) | each round |")
    print("|---|---:|---|")
    for name, v in per.items():
        print(f"| {name} | {statistics.median(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    print(f"\nbatched vs one by one: {statistics.median(ratios):.2f}x (median of per-round ratios: "
          f"{', '.join(f'{x:.2f}' for x in ratios)})")


# ------------------------------------------------------------------------------------------ threads
def cmd_threads(args) -> None:
    """Each measurement starts its processes, waits until all are built, then lets them step for
    ``--seconds``; total images/s is the sum over processes."""
    B = BASE["train"]["batch_size"]
    modes = {"2 processes x 1 thread": [1, 1], "1 process x 2 threads": [2]}
    if args.alone:
        modes["1 process x 1 thread (alone)"] = [1]
    tot: dict[str, list[float]] = {m: [] for m in modes}
    per: dict[str, list[list[float]]] = {m: [] for m in modes}
    loads = []
    for r in range(args.rounds):
        for mode, threads in modes.items():
            go = Path(tempfile.mkdtemp()) / "go"
            procs = [subprocess.Popen([sys.executable, __file__, "--store", str(args.store), "_child", "--threads",
                                       str(t), "--go", str(go), "--seconds", str(args.seconds)],
                                      stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": str(t)}) for t in threads]
            ready = [go.with_name(f"ready.{p.pid}") for p in procs]
            while not all(x.exists() for x in ready):
                time.sleep(0.1)
            go.touch()
            outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            v = [o["steps"] * B / o["seconds"] for o in outs]
            tot[mode].append(sum(v))
            per[mode].append(v)
        loads.append(load1())
        print(f"round {r + 1}/{args.rounds} (load {loads[-1]:.2f}): "
              + ", ".join(f"{m} {tot[m][-1]:.0f}" for m in modes), file=sys.stderr)
    ref = "2 processes x 1 thread"
    print(f"\ntoday's case (patch 4), batch {B}, {args.seconds:.0f} s of steps per measurement after 3 warm-up steps, "
          f"{args.rounds} rounds; 1-min load average per round: {', '.join(f'{x:.2f}' for x in loads)}\n")
    print("| mode | total images/s (median) | total images/s, each round | per process, each round | vs 2 x 1 thread |")
    print("|---|---:|---|---|---:|")
    for m in modes:
        rat = statistics.median(a / b for a, b in zip(tot[m], tot[ref]))
        print(f"| {m} | {statistics.median(tot[m]):.0f} | {', '.join(f'{x:.0f}' for x in tot[m])} | "
              f"{'; '.join('+'.join(f'{x:.0f}' for x in v) for v in per[m])} | {rat:.2f}x |")


def cmd_child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    h = Harness(run_config(args.store, threads=args.threads))
    h.steps(3)
    args.go.with_name(f"ready.{os.getpid()}").touch()
    while not args.go.exists():
        time.sleep(0.02)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        h.steps(1)
        n += 1
    print(json.dumps({"steps": n, "seconds": time.perf_counter() - t0}))


# ------------------------------------------------------------------------------------------ profile
def cmd_profile(args) -> None:
    """Phases of today's step, timed by hand as loop._train_step runs them; then the vision tower's and the
    adapter's forward+backward each on its own (to split the backward between them)."""
    import torch

    from llm2clip.train.fsdp import reduce_replicated_grads

    torch.set_num_threads(1)
    vision = {"patch_size": args.patch} if args.patch else {}
    h = Harness(run_config(args.store, vision))
    tr = h.tr
    model, opt, loss_fn = tr.net, tr.optimizer, tr.loss_fn
    phases = ["data (sampler, caption choice, store lookup, collate)", "vision forward", "adapter forward",
              "loss", "backward (both towers)", "grad clip", "AdamW step", "scheduler + clamp"]
    acc = {p: [] for p in phases}
    h.steps(3)
    for _ in range(args.steps):
        t = [time.perf_counter()]
        im, tx, _ = next(tr._it)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        fi = model.encode_image(im)
        t.append(time.perf_counter())
        ft = model.encode_text(tx)
        t.append(time.perf_counter())
        loss = loss_fn(fi, ft, model.logit_scale, model.logit_bias)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        reduce_replicated_grads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.cfg.optim.grad_clip)
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        tr.scheduler.step()
        model.clamp_logit_scale()
        t.append(time.perf_counter())
        for p, a, b in zip(phases, t, t[1:]):
            acc[p].append(b - a)
    # backward split: each tower's forward+backward alone, same batch shapes
    im, tx, _ = next(tr._it)
    iso = {}
    for name, f in (("vision", lambda: model.encode_image(im)), ("adapter", lambda: model.encode_text(tx))):
        fw, bw = [], []
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            y = f()
            t1 = time.perf_counter()
            y.square().mean().backward()
            t2 = time.perf_counter()
            fw.append(t1 - t0)
            bw.append(t2 - t1)
        iso[name] = (statistics.median(fw), statistics.median(bw))
    total = sum(statistics.median(v) for v in acc.values())
    print(f"\n{'patch ' + str(args.patch) if args.patch else 'today'}: 1 thread, batch 64, {args.steps} steps after 3 "
          f"warm-up; load {load1():.2f}\n")
    print("| phase | median ms/step | share |")
    print("|---|---:|---:|")
    for p, v in acc.items():
        m = statistics.median(v)
        print(f"| {p} | {1e3 * m:.1f} | {100 * m / total:.0f}% |")
    print(f"| **sum of medians** | **{1e3 * total:.1f}** | ({64 / total:.0f} images/s) |")
    print("\n| alone | forward ms | backward ms |")
    print("|---|---:|---:|")
    for k, (a, b) in iso.items():
        print(f"| {k} | {1e3 * a:.1f} | {1e3 * b:.1f} |")


# ----------------------------------------------------------------------------------------- overhead
def cmd_overhead(args) -> None:
    """The preset's model (tower patch 8 / width 96, 576-d adapter) forward + CLIP loss + backward, 1 thread,
    batch 64: eager, torch.compile (inductor), and N models stacked and vmapped (torch.func) as one ensemble,
    the shape of "train every variant of a seed in one process". The model step is about 85 % of a quickstart
    adapter step; the data, AdamW and the scheduler are left out of every case alike."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    from llm2clip.model import LLM2CLIP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = preset_model_config()
    B, N = BASE["train"]["batch_size"], args.models
    models = [LLM2CLIP(cfg, text_dim=576) for _ in range(N)]
    images, texts = torch.randn(N, B, 3, 32, 32), torch.randn(N, B, 576)
    labels = torch.arange(B)

    def loss(img, txt, scale):
        logits = scale.exp() * img @ txt.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def eager_one(m, x, y):
        i, t = m(x, y)
        return loss(i, t, m.logit_scale)

    def eager():  # N separate models, one after another
        for k, m in enumerate(models):
            eager_one(m, images[k], texts[k]).backward()

    compiled_one = torch.compile(eager_one)

    def compiled():
        for k, m in enumerate(models):
            compiled_one(m, images[k], texts[k]).backward()

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(p, b, x, y):
        i, t = functional_call(base, (p, b), (x, y))
        return loss(i, t, p["logit_scale"])

    def ensemble():
        vmap(one)(params, buffers, images, texts).sum().backward()

    t0 = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - t0
    cases = {"eager, one model after another": eager, "torch.compile (inductor)": compiled,
             f"vmapped ensemble of {N}": ensemble}
    for fn in cases.values():
        fn()
    secs, loads = interleaved(cases, args.rounds, args.steps)
    per = {k: [N * B / x for x in v] for k, v in secs.items()}  # images/s
    first = next(iter(per))
    print(f"\n{N} models x batch {B}, 1 thread, {args.rounds} interleaved rounds of {args.steps} steps; "
          f"torch.compile's first call {compile_s:.0f} s; 1-min load average per round: "
          + ", ".join(f"{x:.2f}" for x in loads) + "\n")
    print("| case | images/s (median) | each round | vs eager (median of per-round ratios) |")
    print("|---|---:|---|---:|")
    for name, xs in per.items():
        ratio = statistics.median(a / b for a, b in zip(xs, per[first]))
        print(f"| {name} | {statistics.median(xs):.0f} | {', '.join(f'{x:.0f}' for x in xs)} | {ratio:.2f}x |")


# -------------------------------------------------------------------------------------------- adamw
def cmd_adamw(args) -> None:
    """AdamW's step over the preset model's parameter groups (tower patch 8 / width 96, 576-d adapter), 1 thread:
    PyTorch's per-tensor loop (its CPU default), foreach, and the fused kernel (what build_optimizer picks)."""
    import torch

    from llm2clip.model import LLM2CLIP
    from llm2clip.train.optim import param_groups

    torch.set_num_threads(1)
    cases = {}
    for name, kw in (("per-tensor loop (CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                     ("fused (build_optimizer)", {"fused": True})):
        torch.manual_seed(0)
        m = LLM2CLIP(preset_model_config(), text_dim=576)
        groups = param_groups(m, 1e-3, 0.05)
        for g in groups:
            g.pop("names")
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, **kw)
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        cases[name] = opt
    params = sum(p.numel() for g in next(iter(cases.values())).param_groups for p in g["params"])
    tensors = sum(len(g["params"]) for g in next(iter(cases.values())).param_groups)
    secs, loads = interleaved({k: opt.step for k, opt in cases.items()}, args.rounds, args.steps)
    per = {k: [1e3 * x for x in v] for k, v in secs.items()}  # ms per step
    first = next(iter(per))
    print(f"\n{params / 1e6:.2f} M parameters in {tensors} tensors, 1 thread, {args.rounds} interleaved rounds of "
          f"{args.steps} steps; 1-min load average per round: " + ", ".join(f"{x:.2f}" for x in loads) + "\n")
    print("| AdamW | ms per step (median) | each round | speed vs the loop (median of per-round ratios) |")
    print("|---|---:|---|---:|")
    for name, xs in per.items():
        ratio = statistics.median(a / b for a, b in zip(per[first], xs))
        print(f"| {name} | {statistics.median(xs):.1f} | {', '.join(f'{x:.1f}' for x in xs)} | {ratio:.2f}x |")


# ------------------------------------------------------------------------------------------ quality
def cmd_quality(args) -> None:
    """Whole runs through loop.fit, one at a time; held-out dense R@1 (mean of i2t and t2i) per seed."""
    from llm2clip.train.config import RunConfig
    from llm2clip.train.loop import fit

    names = list(SETTINGS) if not args.settings else [list(SETTINGS)[i] for i in args.settings]
    out_dir = Path(args.out_dir)
    rows = []
    for name in names:
        vision, steps, lr, warmup, *train = SETTINGS[name]
        for seed in args.seeds:
            tag = "".join(c if c.isalnum() else "-" for c in name)[:60].strip("-") + f"-s{seed}"
            cfg = run_config(args.store, vision, steps=steps, lr=lr, warmup=warmup, seed=seed,
                             run_dir=str(out_dir / tag), train=train[0] if train else None)
            l0, t0 = load1(), time.perf_counter()
            res = fit(RunConfig.model_validate(cfg), resume=False, progress=False)
            sec = time.perf_counter() - t0
            ev = res["eval"]
            row = {"setting": name, "seed": seed, "seconds": sec, "load_start": l0, "load_end": load1(),
                   "dense_R@1": (ev["dense/i2t_R@1"] + ev["dense/t2i_R@1"]) / 2,
                   "dense_R@5": (ev["dense/i2t_R@5"] + ev["dense/t2i_R@5"]) / 2, **ev}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            with open(out_dir / "quality.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| setting | seed | dense R@1 (mean i2t, t2i) | dense i2t / t2i R@1 | dense R@5 (mean) | short R@5 (mean) "
          "| seconds | load start/end |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['seed']} | {r['dense_R@1']:.3f} | {r['dense/i2t_R@1']:.3f} / "
              f"{r['dense/t2i_R@1']:.3f} | {r['dense_R@5']:.3f} | "
              f"{(r['short/i2t_R@5'] + r['short/t2i_R@5']) / 2:.3f} | {r['seconds']:.0f} | "
              f"{r['load_start']:.1f}/{r['load_end']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE,
                    help="feature store of the minilm teacher (without one: bag-of-words 384-d in memory)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("shapes", help="images/s per vision-tower shape, 1 thread, interleaved rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="timed steps per case per round")
    p.add_argument("--clip", action="store_true", help="also the CLIP-text-tower variant at patch 4, 8, 8 + width 96")
    p.add_argument("--only", nargs="+", help="keep only the cases whose name contains one of these (and today's)")
    p = sub.add_parser("threads", help="2 processes x 1 thread against 1 process x 2 threads (today's case)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--alone", action="store_true", help="also 1 process x 1 thread on its own")
    p = sub.add_parser("profile", help="where today's step time goes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--patch", type=int, default=0, help="profile this patch size instead of today's 4")
    p = sub.add_parser("quality", help="whole runs, one at a time: held-out dense R@1 per setting and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--settings", type=int, nargs="+", help="indices into SETTINGS (default all)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "levers"))
    p = sub.add_parser("clip-text", help="CLIP text tower: open_clip's forward against length buckets")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per case per round")
    p.add_argument("--dense", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="dense-caption shares")
    p = sub.add_parser("data", help="a step's samples one by one against the batched text lookup")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=40)
    p = sub.add_parser("overhead", help="the model step: eager, torch.compile, a vmapped ensemble of N models")
    p.add_argument("--models", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps (of all N models) per case per round")
    p = sub.add_parser("adamw", help="AdamW's step: the per-tensor loop, foreach, fused")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=50)
    p = sub.add_parser("_child")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--go", type=Path)
    p.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    {"shapes": cmd_shapes, "threads": cmd_threads, "profile": cmd_profile, "quality": cmd_quality,
     "clip-text": cmd_clip_text, "data": cmd_data, "overhead": cmd_overhead, "adamw": cmd_adamw,
     "_child": cmd_child}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
