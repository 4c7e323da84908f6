"""Stage-1 study: which caption-contrastive recipe makes SmolLM2 the best caption encoder per minute.

Every row is the quickstart's own stage 1 (built from the quickstart preset by the pipeline, so the
data, held-out sets and defaults are the main job's) with a few fields changed. Each row trains in
its own process, evaluates every few steps and logs the wall time spent so far (evaluations
excluded, the frozen-trunk pass and any MNTP pre-pass included), so rows compare as CRA against
wall time. Metrics: held-out CuPL CRA R@1 (every description of 100 held-out classes x 5 queries
the other 499), scene CRA dense -> short on the held-out scenes, training tokens per second.

    .venv/bin/python benchmarks/stage1_study.py --rows causal-top4,causal-top8   # train rows (resumable)
    .venv/bin/python benchmarks/stage1_study.py --report                          # table + plot from runs
    .venv/bin/python benchmarks/stage1_study.py --precision causal-top8           # fp32 vs bf16 weights
    .venv/bin/python benchmarks/stage1_study.py --tiny --out-dir /tmp/s1          # seconds, tiny model

Run rows alone on the machine: their wall times are the study's x axis.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (what it changes, overrides of the stage-1 config as dotted keys; "scenes": training scenes
# in the groups; "mntp": an MNTP pre-pass of that many steps whose adapter the CC run starts from)
ROWS: dict[str, tuple[str, dict]] = {
    "bidir-top2": ("the quickstart before this study (bidirectional, LoRA top 2, 60 steps)", {}),
    "causal-top2": ("causal attention", {"encoder.bidirectional": False}),
    "causal-top4": ("causal, LoRA top 4", {"encoder.bidirectional": False, "lora.top_layers": 4}),
    "causal-top8": ("causal, LoRA top 8", {"encoder.bidirectional": False, "lora.top_layers": 8}),
    "causal-all": ("causal, LoRA on all 30 layers (no trunk cache), 16 steps, lr 5e-4",
                   {"encoder.bidirectional": False, "lora.top_layers": None, "optim.lr": 5e-4, "optim.steps": 16,
                    "optim.warmup_steps": 2}),
    "bidir-top8": ("bidirectional, LoRA top 8 (no MNTP)", {"lora.top_layers": 8}),
    "bidir-mntp-top8": ("bidirectional after an MNTP pass (30 steps of 8 x 64 tokens, LoRA all layers), "
                        "then CC LoRA top 8", {"lora.top_layers": 8, "mntp": 30}),
    "causal-top8-lr2e-3": ("causal, top 8, lr 2e-3", {"encoder.bidirectional": False, "lora.top_layers": 8,
                                                       "optim.lr": 2e-3}),
    "causal-top8-nohn-b48": ("causal, top 8, no hard negatives, batch 48 (about the same tokens per step)",
                             {"encoder.bidirectional": False, "lora.top_layers": 8,
                              "contrastive.hard_negatives": False, "contrastive.batch_size": 48}),
    "causal-top12-s40": ("causal, LoRA top 12, 40 steps", {"encoder.bidirectional": False, "lora.top_layers": 12,
                                                           "optim.steps": 40}),
    "quickstart-scenes": ("the quickstart recipe with the 400 scene pairs (causal, top 8, no hard negatives, "
                          "batch 48, lr 2e-3, 36 steps)",
                   {"encoder.bidirectional": False, "lora.top_layers": 8, "contrastive.hard_negatives": False,
                    "contrastive.batch_size": 48, "optim.lr": 2e-3, "optim.steps": 36, "optim.warmup_steps": 3}),
    "quickstart-noscenes": ("the quickstart recipe without scene pairs (CuPL descriptions only)",
                            {"encoder.bidirectional": False, "lora.top_layers": 8, "contrastive.hard_negatives": False,
                             "contrastive.batch_size": 48, "optim.lr": 2e-3, "optim.steps": 36,
                             "optim.warmup_steps": 3, "scenes": 0}),
    "causal-top8-lr3e-4": ("causal, top 8, lr 3e-4", {"encoder.bidirectional": False, "lora.top_layers": 8,
                                                       "optim.lr": 3e-4}),
    "causal-top8-b64": ("causal, top 8, batch 64", {"encoder.bidirectional": False, "lora.top_layers": 8,
                                                    "contrastive.batch_size": 64}),
    "causal-top8-len96": ("causal, top 8, captions cut at 96 tokens",
                          {"encoder.bidirectional": False, "lora.top_layers": 8, "encoder.max_length": 96}),
    "causal-top8-sym": ("causal, top 8, symmetric loss", {"encoder.bidirectional": False, "lora.top_layers": 8,
                                                          "contrastive.symmetric": True}),
    "causal-top8-scenes800": ("causal, top 8, all 800 training scenes' pairs",
                              {"encoder.bidirectional": False, "lora.top_layers": 8, "scenes": 800}),
    "causal-top8-cupl6": ("causal, top 8, 6 CuPL descriptions per class",
                          {"encoder.bidirectional": False, "lora.top_layers": 8, "data.cupl_per_class": 6}),
}

# The quickstart's stage 1 as it stood before this study: every row starts here, whatever the preset says now.
BASE = {"encoder.bidirectional": True, "encoder.max_length": 192, "encoder.dtype": "bfloat16",
        "data.cupl_per_class": 3, "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05, "lora.top_layers": 2,
        "contrastive.batch_size": 32, "contrastive.scale": 50, "contrastive.hard_negatives": True,
        "contrastive.symmetric": False, "contrastive.bucket_ratio": 1.25, "optim.steps": 60, "optim.lr": 1e-3,
        "optim.warmup_steps": 5, "optim.schedule": "linear", "optim.precision": "bf16",
        "eval.cupl_classes": 100, "eval.per_class": 5}
BASE_SCENES = 400

TINY = {"llm": {"model": "tiny-random-llama", "bidirectional": True, "pooling": "mean", "template": "none",
                "max_length": 64, "dtype": "float32", "batch_size": 16},
        "scenes": {"train": 16, "val": 8, "render_size": 16},
        "stage1": {"cupl_per_class": 2, "scenes": 8, "lora": {"r": 4, "alpha": 8, "top_layers": 1},
                   "contrastive": {"batch_size": 8}, "optim": {"steps": 4, "lr": 1e-3, "warmup_steps": 1,
                                                               "precision": "fp32"}},
        "eval": {"cupl_classes": 6, "cupl_per_class": 2}}


def base_config(out_dir: Path, tiny: bool, scenes: int | None):
    """The quickstart's stage-1 config and the data it reads, under ``out_dir``."""
    from llm2clip.config import load_config
    from llm2clip.pipeline.config import PipelineConfig
    from llm2clip.pipeline.plan import build_stages, preset_path

    raw = load_config(preset_path("quickstart"), PipelineConfig).model_dump(mode="json")
    if tiny:
        for k, v in TINY.items():
            raw[k] = {**raw[k], **v} if isinstance(v, dict) and k not in ("llm",) else v
    raw["fashion_mnist"]["enabled"] = "off"
    raw["stage1"]["scenes"] = scenes if scenes is not None else (raw["stage1"]["scenes"] if tiny else BASE_SCENES)
    raw["run_dir"] = str(out_dir / f"data-{raw['stage1']['scenes']}")
    stages = {s.name: s for s in build_stages(PipelineConfig(**raw))}
    data = stages["data"]
    if not (Path(raw["run_dir"]) / "data" / "heldout_groups.jsonl").is_file():
        data.fn(*data.args)
    cfg = copy.deepcopy(next(s.args[0] for n, s in stages.items() if n.startswith("stage1/")))  # its config
    cfg["eval"] = {"cupl_classes": raw["eval"]["cupl_classes"], "per_class": raw["eval"]["cupl_per_class"],
                   "final": True, "groups": [str((Path(raw["run_dir"]) / "data" / "heldout_groups.jsonl").absolute())]}
    if not tiny:
        for k, v in BASE.items():
            set_dotted(cfg, k, v)
    return cfg


def set_dotted(cfg: dict, key: str, value) -> None:
    *path, last = key.split(".")
    node = cfg
    for p in path:
        node = node.setdefault(p, {})
    node[last] = value


def row_config(name: str, out_dir: Path, tiny: bool) -> tuple[dict, dict | None]:
    """(contrastive config, MNTP pre-pass config or None) of one row."""
    overrides = dict(ROWS[name][1])
    scenes, mntp_steps = overrides.pop("scenes", None), overrides.pop("mntp", None)
    cfg = base_config(out_dir, tiny, scenes)
    for k, v in overrides.items():
        set_dotted(cfg, k, v)
    steps = cfg["optim"]["steps"]
    cfg["out"] = str(out_dir / name / "cc")
    cfg["eval"]["every"] = max(1, steps // 4)
    cfg["save_every"] = steps
    mntp = None
    if mntp_steps:
        mntp = copy.deepcopy(cfg)
        mntp.update(objective="mntp", out=str(out_dir / name / "mntp"), save_every=mntp_steps)
        mntp["lora"]["top_layers"] = None
        mntp["optim"].update(steps=2 if tiny else mntp_steps, lr=1e-3 if tiny else 2e-4, warmup_steps=2)
        mntp["mntp"] = {"block_size": 32 if tiny else 64, "batch_size": 4 if tiny else 8}
        mntp["data"]["heldout_text_fraction"] = 0.02
        mntp["eval"]["every"] = 0
        cfg["encoder"]["adapters"] = [str(out_dir / name / "mntp" / "adapter")]
    return cfg, mntp


def train_row(name: str, out_dir: Path, tiny: bool, threads: int) -> None:
    import torch

    from llm2clip.config import parse_config
    from llm2clip.finetune.config import FinetuneConfig
    from llm2clip.finetune.trainer import Stage1Trainer

    torch.set_num_threads(threads)
    cfg, mntp = row_config(name, out_dir, tiny)
    for part in ([mntp] if mntp else []) + [cfg]:
        Stage1Trainer(parse_config(part, FinetuneConfig, part["out"]), progress=not tiny).run(resume=True)


def row_result(name: str, out_dir: Path) -> dict | None:
    """Curve (train_s, CuPL CRA, scene CRA) and final figures of a finished row."""
    from llm2clip.data.jsonl import read_jsonl

    summary = out_dir / name / "cc" / "summary.json"
    if not summary.is_file():
        return None
    cc = [rec for _, rec in read_jsonl(out_dir / name / "cc" / "metrics.jsonl")]
    final = json.loads(summary.read_text())
    pre = 0.0
    mntp = out_dir / name / "mntp" / "summary.json"
    if mntp.is_file():
        pre = json.loads(mntp.read_text())["train_s"]
    scene_key = next((k for k in final if k.endswith("_dense_short_R@1")), None)
    curve = [(pre + r["train_s"], r["cra_R@1"], r.get(scene_key)) for r in cc if "train_s" in r and "cra_R@1" in r]
    curve.append((pre + final["train_s"], final["cra_R@1"], final.get(scene_key)))
    steps = [r for r in cc if "tokens" in r]
    tok_s = sum(r["tokens"] for r in steps) / max(1e-9, sum(r["step_s"] for r in steps))
    trunk = next((r["trunk_s"] for r in cc if "trunk_s" in r), 0.0)
    s2 = out_dir / name / "stage2.json"
    s2 = json.loads(s2.read_text()) if s2.is_file() else None
    stage2 = None if s2 is None else ((s2["dense/i2t_R@1"] + s2["dense/t2i_R@1"]) / 2,
                                      (s2["dense/i2t_R@5"] + s2["dense/t2i_R@5"]) / 2)
    load = out_dir / name / "load.json"
    load = json.loads(load.read_text())["load_1min"] if load.is_file() else None
    return {"row": name, "what": ROWS[name][0], "steps": final["step"], "wall_s": pre + final["train_s"], "load": load,
            "stage2_dense": stage2,
            "mntp_s": pre, "trunk_s": trunk, "tokens_per_s": tok_s, "cupl_R@1": final["cra_R@1"],
            "cupl_pool": final["cra_pool_size"], "scene_R@1": final.get(scene_key),
            "scene_pool": final.get(scene_key.replace("R@1", "pool_size")) if scene_key else None, "curve": curve}


def write_report(out_dir: Path, report: Path, tiny: bool = False, extra: str = "") -> list[dict]:
    rows = [r for r in (row_result(n, out_dir) for n in ROWS) if r]
    if not rows:
        raise SystemExit(f"no finished rows under {out_dir}")
    for r in rows:
        r.update(masked_cra(r["row"], out_dir, tiny))
    lines = ["| row | what changes | steps | wall (s) | of which MNTP / trunk (s) | tokens/s | CuPL CRA R@1 (pool) "
             "| scene CRA dense→short R@1 (pool) | CuPL CRA, names masked | stage-2 dense R@1 / R@5 | load "
             "| reproduce |", "|" + "---|" * 12]
    for r in rows:
        scene = f"{r['scene_R@1']:.3f} ({r['scene_pool']})" if r["scene_R@1"] is not None else "–"
        lines.append(f"| {r['row']} | {r['what']} | {r['steps']} | {r['wall_s']:.0f} | {r['mntp_s']:.0f} / "
                     f"{r['trunk_s']:.0f} | {r['tokens_per_s']:.0f} | {r['cupl_R@1']:.3f} ({r['cupl_pool']}) | "
                     f"{scene} | {r['masked_R@1']:.3f} | "
                     f"{'–' if r['stage2_dense'] is None else '{:.3f} / {:.3f}'.format(*r['stage2_dense'])} | "
                     f"{'–' if r['load'] is None else round(r['load'], 1)} "
                     f"| `--rows {r['row']}` |")
    lines += ["", "Untrained references on the same held-out sets:", "",
              "| encoder | CuPL CRA R@1 (pool) | scene CRA dense→short R@1 (pool) | CuPL CRA, names masked |",
              "|---|---|---|---|"]
    for r in references(out_dir, tiny):
        lines.append(f"| {r['encoder']} | {r['cupl_R@1']:.3f} ({r['cupl_pool']}) | {r['scene_R@1']:.3f} "
                     f"({r['scene_pool']}) | {r['masked_R@1']:.3f} |")
    (out_dir / "study.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, report.with_suffix(".png"))
    text = report.read_text() if report.is_file() else ""
    start, end = "<!-- study table -->", "<!-- /study table -->"
    table = f"{start}\n" + "\n".join(lines) + f"\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + table + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + table + "\n" + extra
    report.write_text(text)
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(rows):
        xs = [c[0] / 60 for c in r["curve"]]
        style = dict(marker="os^D"[i % 4], color=plt.cm.tab20(i % 20), label=r["row"])
        axes[0].plot(xs, [c[1] for c in r["curve"]], **style)
        if r["curve"][-1][2] is not None:
            axes[1].plot(xs, [c[2] for c in r["curve"]], **style)
    for ax, title in zip(axes, ["held-out CuPL CRA R@1 (pool 500)", "held-out scene CRA dense→short R@1"]):
        ax.set_xlabel("stage-1 wall time (min, evaluations excluded)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def masked_cra(name: str, out_dir: Path, tiny: bool) -> dict:
    """CuPL CRA with each description's class name masked: the descriptions must be matched by what
    they describe, not by the name they share (closer to captions in general); final encoder, bf16."""
    import torch

    from llm2clip.data.captions import cupl_caption_set
    from llm2clip.eval.cra import caption_retrieval_accuracy
    from llm2clip.text.config import LLMEncoderConfig
    from llm2clip.text.encoder import CaptionEncoder

    path = out_dir / name / "masked.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg, _ = row_config(name, out_dir, tiny)
    cs = cupl_caption_set("heldout", cfg["eval"]["cupl_classes"], cfg["eval"]["per_class"], True)
    enc = CaptionEncoder.from_config(LLMEncoderConfig(**{**cfg["encoder"], "model": str(Path(cfg["out"]) / "encoder"),
                                                         "adapters": []}))
    res = caption_retrieval_accuracy(torch.as_tensor(enc.encode(cs.captions)).float(), cs.groups)
    out = {"masked_R@1": res["R@1"], "masked_pool": res["pool_size"]}
    path.write_text(json.dumps(out))
    return out


def references(out_dir: Path, tiny: bool) -> list[dict]:
    """The same held-out metrics for the untrained LLM (causal, bidirectional) and all-MiniLM-L6-v2."""
    import torch

    from llm2clip.data.captions import cupl_caption_set
    from llm2clip.data.images import build_caption_encoder
    from llm2clip.eval.checkpoint import parse_caption_encoder_spec
    from llm2clip.eval.cra import caption_retrieval_accuracy, paired_caption_retrieval
    from llm2clip.finetune.data import load_groups_jsonl

    path = out_dir / "references.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = base_config(out_dir, tiny, None)
    e = cfg["eval"]
    sets = {m: cupl_caption_set("heldout", e["cupl_classes"], e["per_class"], m) for m in (False, True)}
    groups = [g for g in load_groups_jsonl(e["groups"][0]).groups]
    dense = [g.captions[g.kinds.index("dense")] for g in groups]
    short = [g.captions[g.kinds.index("short")] for g in groups]
    specs = {"SmolLM2 raw, causal": {**cfg["encoder"], "bidirectional": False},
             "SmolLM2 raw, bidirectional": {**cfg["encoder"], "bidirectional": True}}
    if not tiny:
        specs["all-MiniLM-L6-v2"] = {"kind": "sentence", "model": "all-minilm-l6-v2"}
    out = []
    for label, spec in specs.items():
        enc = build_caption_encoder(parse_caption_encoder_spec(spec))
        emb = lambda caps: torch.as_tensor(enc.encode(caps)).float()
        cupl, masked = (caption_retrieval_accuracy(emb(sets[m].captions), sets[m].groups) for m in (False, True))
        scene = paired_caption_retrieval(emb(dense), emb(short), short)
        out.append({"encoder": label, "cupl_R@1": cupl["R@1"], "cupl_pool": cupl["pool_size"],
                    "scene_R@1": scene["R@1"], "scene_pool": scene["pool_size"], "masked_R@1": masked["R@1"]})
    path.write_text(json.dumps(out, indent=1))
    return out


def precision(name: str, out_dir: Path, tiny: bool) -> dict:
    """The row's fine-tuned encoder with fp32 and with bf16 weights: CRA of each and their cosine."""
    import torch

    from llm2clip.data.captions import cupl_caption_set
    from llm2clip.eval.cra import caption_retrieval_accuracy
    from llm2clip.text.config import LLMEncoderConfig
    from llm2clip.text.encoder import CaptionEncoder

    cfg, _ = row_config(name, out_dir, tiny)
    cs = cupl_caption_set("heldout", cfg["eval"]["cupl_classes"], cfg["eval"]["per_class"], False)
    res, embs = {}, {}
    for dtype in ("float32", "bfloat16"):
        enc = CaptionEncoder.from_config(LLMEncoderConfig(**{
            **cfg["encoder"], "model": str(Path(cfg["out"]) / "encoder"), "adapters": [], "dtype": dtype}))
        embs[dtype] = torch.as_tensor(enc.encode(cs.captions)).float()
        res[dtype] = caption_retrieval_accuracy(embs[dtype], cs.groups)["R@1"]
    cos = torch.nn.functional.cosine_similarity(embs["float32"], embs["bfloat16"], dim=-1)
    return {"row": name, "cupl_R@1_fp32": res["float32"], "cupl_R@1_bf16": res["bfloat16"],
            "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}


def stage2_check(name: str, out_dir: Path, run_dir: Path) -> dict:
    """Stage 2 with a row's encoder as the teacher: the finished main-job run's CC variant at 50 % dense
    (same config, seed and data), with this row's encoder in place of the run's fine-tuned LLM."""
    from llm2clip.pipeline import stages as S

    path = out_dir / name / "stage2.json"
    if path.is_file():
        return json.loads(path.read_text())
    m = json.loads((run_dir / "manifest.json").read_text())["stages"]
    ec = copy.deepcopy(m["embed/smollm2-cc"]["inputs"]["config"])
    ec["encoder"]["model"] = str((out_dir / name / "cc" / "encoder").absolute())
    ec["out"] = str((out_dir / name / "stage2" / "embed").absolute())
    S.run_embed(ec, 2)
    rc = copy.deepcopy(m["train/smollm2-cc-dense50"]["inputs"]["config"])
    rc["run_dir"] = str((out_dir / name / "stage2" / "train").absolute())
    rc["data"]["features"]["store"] = ec["out"]
    rc["train"]["threads"] = 2
    ev = S.run_train(rc)["eval"]
    path.write_text(json.dumps(ev))
    return ev


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help=f"comma-separated rows to train (known: {', '.join(ROWS)}); 'all'")
    ap.add_argument("--report", action="store_true", help="write the table and plot from the finished rows")
    ap.add_argument("--precision", metavar="ROW", help="compare fp32 and bf16 weights of a finished row")
    ap.add_argument("--stage2", metavar="ROW", help=(
        "train the main job's CC stage-2 variant (50 %% dense) against a finished row's encoder; needs a finished "
        "run in --run-dir"))
    ap.add_argument("--run-dir", default="runs/quickstart", help="a finished main-job run (for --stage2)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model and data: a check that runs in seconds")
    ap.add_argument("--out-dir", default="runs/stage1_study")
    ap.add_argument("--out", default=str(HERE / "STAGE1_STUDY.md"), help="the report (Markdown; plot beside it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(a.out_dir)
    names = list(ROWS) if a.rows == "all" else [n for n in a.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    for n in names:
        t0 = time.perf_counter()
        finished_before = (out_dir / n / "cc" / "summary.json").is_file()
        if a.in_process:
            train_row(n, out_dir, a.tiny, a.threads)
            continue
        else:  # one process per row: every row starts from the same state
            subprocess.run([sys.executable, __file__, "--rows", n, "--in-process", "--out-dir", str(out_dir),
                            "--threads", str(a.threads)] + (["--tiny"] if a.tiny else []), check=True)
        load = os.getloadavg()
        if not finished_before:  # the load while this row trained, not at a later rerun
            (out_dir / n / "load.json").write_text(json.dumps({"load_1min": load[0], "load_15min": load[2]}))
        print(f"{n}: done in {time.perf_counter() - t0:.0f} s (load {load[0]:.1f})", flush=True)
    if a.stage2:
        print(json.dumps(stage2_check(a.stage2, out_dir, Path(a.run_dir))))
    if a.precision:
        p = precision(a.precision, out_dir, a.tiny)
        (out_dir / f"precision-{a.precision}.json").write_text(json.dumps(p, indent=1))
        print(json.dumps(p))
    if a.report:
        for r in write_report(out_dir, Path(a.out), a.tiny):
            print(f"{r['row']}: wall {r['wall_s']:.0f} s, CuPL {r['cupl_R@1']:.3f}, scenes {r['scene_R@1']}")


if __name__ == "__main__":
    main()
