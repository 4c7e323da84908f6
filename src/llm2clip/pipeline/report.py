"""The run report: the teacher-comparison table, the paper's claims checked against it, PNG plots,
timings per stage, the config and the versions of everything. Written to ``<run_dir>/report/``."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from ..fileio import markdown_table as _table
from ..fileio import write_json_atomic
from .config import ClipTeacher, LLMTeacher, PipelineConfig
from .runner import fmt_duration

PACKAGES = ("llm2clip", "torch", "torchvision", "transformers", "peft", "open_clip_torch", "timm", "numpy",
            "safetensors", "tokenizers", "pydantic")


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def _r1(ev: dict, kind: str) -> tuple[float | None, float | None]:
    return ev.get(f"{kind}/i2t_R@1"), ev.get(f"{kind}/t2i_R@1")


def _mean(a, b):
    return None if a is None or b is None else (a + b) / 2


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def build_rows(cfg: PipelineConfig, ev: dict, zeroshot: dict | None = None) -> list[dict]:
    rows = []
    ref = cfg.variants[0].dense
    for v in cfg.variants:
        res = ev["variants"][v.name]
        e = res.get("eval", {})
        cra = ev["teachers"].get(v.teacher, {})
        si, st = _r1(e, "short")
        di, dt = _r1(e, "dense")
        rows.append({
            "variant": v.name, "teacher": v.teacher, "label": cfg.teacher_label(v.teacher),
            "teacher_kind": _kind(cfg.teachers[v.teacher]), "dense": v.dense, "attention": _attention(cfg, v.teacher),
            "cra_scenes": cra.get("scenes", {}).get("R@1"), "cra_scenes_pool": cra.get("scenes", {}).get("pool_size"),
            "cra_cupl": cra.get("cupl", {}).get("R@1"), "cra_cupl_pool": cra.get("cupl", {}).get("pool_size"),
            "short_i2t": si, "short_t2i": st, "dense_i2t": di, "dense_t2i": dt,
            "short_R5": _mean(e.get("short/i2t_R@5"), e.get("short/t2i_R@5")),
            "dense_R5": _mean(e.get("dense/i2t_R@5"), e.get("dense/t2i_R@5")),
            "short": _mean(si, st), "dense_mean": _mean(di, dt), "steps": res.get("steps"),
            "images_per_s": res.get("images_per_s"), "val_images": e.get("n"),
            "zeroshot_top1": (zeroshot or {}).get(v.teacher, {}).get("top1") if v.dense == ref else None,
        })
    return rows


def _attention(cfg: PipelineConfig, name: str) -> str | None:
    if not isinstance(cfg.teachers[name], LLMTeacher):
        return None
    return "bidirectional" if cfg.teacher_llm(name).bidirectional else "causal"


def _kind(t) -> str:
    if isinstance(t, ClipTeacher):
        return "clip"
    if isinstance(t, LLMTeacher):
        return "llm-cc" if t.finetuned else "llm-raw"
    return "encoder"


def markdown_table(rows: list[dict]) -> str:
    header = ["variant", "text teacher", "dense %", "scene CRA dense→short R@1", "CRA CuPL R@1", "short I2T R@1",
              "short T2I R@1", "dense I2T R@1", "dense T2I R@1", "short R@5", "dense R@5", "zero-shot"]
    body = []
    for r in rows:
        cra_s = f"{_f(r['cra_scenes'])} ({r['cra_scenes_pool']})" if r["cra_scenes"] is not None else "–"
        cra_c = f"{_f(r['cra_cupl'])} ({r['cra_cupl_pool']})" if r["cra_cupl"] is not None else "–"
        zs = _f(r["zeroshot_top1"]) if r["zeroshot_top1"] is not None else "n/a"
        body.append([r["variant"], r["label"], round(r["dense"] * 100), cra_s, cra_c, _f(r["short_i2t"]),
                     _f(r["short_t2i"]), _f(r["dense_i2t"]), _f(r["dense_t2i"]), _f(r["short_R5"]), _f(r["dense_R5"]),
                     zs])
    return _table(header, body, align="l" * 3 + "r" * 9)


def check_claims(cfg: PipelineConfig, rows: list[dict]) -> list[dict]:
    """The paper's orderings (docs/METHOD.md 8), each with the numbers it was decided on."""
    claims = []
    by_kind: dict[str, list[dict]] = {}
    default = cfg.variants[0].dense
    for r in rows:
        if r["dense"] == default:
            by_kind.setdefault(r["teacher_kind"], []).append(r)
    base = [r for r in rows if r["dense"] == default and r["dense_mean"] is not None]

    def show(rs):
        return ", ".join(f"{r['label']} {r['dense_mean']:.3f}" for r in rs)

    raw = by_kind.get("llm-raw", [None])[0]
    cc = by_kind.get("llm-cc", [None])[0]
    clip = by_kind.get("clip", [None])[0]
    if raw and len(base) > 1:
        others = [r for r in base if r is not raw]
        ok = all(raw["dense_mean"] < r["dense_mean"] for r in others)
        claims.append({"claim": "the raw LLM is the worst teacher for dense captions", "holds": ok,
                       "numbers": f"dense R@1 (mean of I2T, T2I): {show(base)}"})
    if cc and len(base) > 1:
        others = [r for r in base if r["teacher_kind"] != "llm-cc"]  # other CC rows are settings of the same method
        ok = all(cc["dense_mean"] > r["dense_mean"] for r in others)
        claims.append({"claim": "CC fine-tuning lifts the LLM above the other teachers on dense captions",
                       "holds": ok, "numbers": f"dense R@1: {show(base)}"})
    if clip and len(base) > 1:
        emb = [r for r in base if r["teacher_kind"] in ("llm-cc", "encoder")]
        if emb:
            best = max(emb, key=lambda r: r["dense_mean"])
            claims.append({"claim": "the 77-token CLIP text tower falls behind on dense captions",
                           "holds": clip["dense_mean"] < best["dense_mean"],
                           "numbers": f"dense R@1: CLIP {clip['dense_mean']:.3f} vs best embedding teacher "
                                      f"{best['label']} {best['dense_mean']:.3f}"})
    if cc:
        ratio = sorted((r for r in rows if r["teacher"] == cc["teacher"]), key=lambda r: r["dense"])
        mid = next((r for r in ratio if r["dense"] == default), None)
        hi = next((r for r in ratio if r["dense"] == 1.0), None)
        lo = next((r for r in ratio if r["dense"] == 0.0), None)
        if mid and hi and mid is not hi and mid["short"] is not None:
            claims.append({"claim": f"100 % dense captions hurt short-caption retrieval (vs {round(default * 100)} %)",
                           "holds": hi["short"] < mid["short"],
                           "numbers": f"short R@1: 100 % {hi['short']:.3f}, "
                                      f"{round(default * 100)} % {mid['short']:.3f}"})
        if mid and lo and mid is not lo and mid["dense_mean"] is not None:
            claims.append({"claim": f"0 % dense captions hurt dense-caption retrieval (vs {round(default * 100)} %)",
                           "holds": lo["dense_mean"] < mid["dense_mean"],
                           "numbers": f"dense R@1: 0 % {lo['dense_mean']:.3f}, "
                                      f"{round(default * 100)} % {mid['dense_mean']:.3f}"})
    return claims


def _plots(cfg: PipelineConfig, rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    default = cfg.variants[0].dense
    base = [r for r in rows if r["dense"] == default]
    if base:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        x = range(len(base))
        ax.bar([i - 0.2 for i in x], [r["short"] or 0 for r in base], 0.4, label="short captions")
        ax.bar([i + 0.2 for i in x], [r["dense_mean"] or 0 for r in base], 0.4, label="dense captions")
        ax.set_xticks(list(x), [r["label"] for r in base], rotation=15)
        ax.set_ylabel("R@1 (mean of I2T and T2I)")
        ax.set_title(f"Held-out scenes, {round(default * 100)} % dense in training")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "teachers.png", dpi=110)
        plt.close(fig)
        files.append("teachers.png")
    by_teacher: dict[str, list[dict]] = {}
    for r in rows:
        by_teacher.setdefault(r["teacher"], []).append(r)
    for name, rs in by_teacher.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["dense"])
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot([r["dense"] * 100 for r in rs], [r["short"] or 0 for r in rs], "o-", label="short captions")
        ax.plot([r["dense"] * 100 for r in rs], [r["dense_mean"] or 0 for r in rs], "s-", label="dense captions")
        ax.set_xlabel("dense captions in training (%)")
        ax.set_ylabel("R@1 (mean of I2T and T2I)")
        ax.set_title(f"Dense-caption share, {cfg.teacher_label(name)}")
        ax.legend()
        fig.tight_layout()
        fname = f"dense_ratio_{name}.png"
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    curves = {}
    for r in base:
        pts = []
        path = Path(cfg.run_dir) / "train" / r["variant"] / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if "eval" in row and "dense/i2t_R@1" in row["eval"]:
                    pts.append((row["step"], _mean(row["eval"]["dense/i2t_R@1"], row["eval"]["dense/t2i_R@1"])))
        if len(pts) > 1:
            curves[r["label"]] = pts
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for label, pts in curves.items():
            ax.plot(*zip(*pts), "o-", label=label)
        ax.set_xlabel("stage-2 step")
        ax.set_ylabel("dense R@1 (held out)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "dense_curves.png", dpi=110)
        plt.close(fig)
        files.append("dense_curves.png")
    return files


def _clip_truncation(cfg: PipelineConfig) -> dict | None:
    """How many held-out dense captions exceed the CLIP tower's context (they are cut there)."""
    clip = next((t for t in cfg.used_teachers().values() if isinstance(t, ClipTeacher)), None)
    if clip is None:
        return None
    from ..model import _clip_tokenizer
    from .stages import scene_sets

    _, val = scene_sets(cfg.scenes.model_dump())
    tok = _clip_tokenizer(10_000)  # long enough never to cut, to count real lengths
    lens = [len(tok.encode(val[i].captions()["dense"])) + 2 for i in range(len(val))]
    n = clip.text.context_length
    return {"context": n, "over": sum(x > n for x in lens), "total": len(lens),
            "median_tokens": sorted(lens)[len(lens) // 2]}


def _stage1_text(cfg: PipelineConfig, st1: dict, ev: dict) -> list[str]:
    """One line per fine-tuned teacher, and what its attention means against the paper's recipe."""
    md = []
    for name, res in st1.items():
        if not res:
            continue
        cra = ev["teachers"].get(name, {})
        md.append(f"- Stage 1 of {cfg.teacher_label(name)} ({_attention(cfg, name)} attention): {res.get('step')} "
                  f"steps of caption-contrastive LoRA on the top {cfg.stage1.lora.top_layers or 'all'} layers; "
                  f"CuPL CRA R@1 {_f(cra.get('cupl', {}).get('R@1'))}, scene CRA dense→short "
                  f"{_f(cra.get('scenes', {}).get('R@1'))}; frozen-trunk pass {res.get('trunk_s')} s, "
                  f"training {res.get('train_s')} s.")
    causal = [n for n in st1 if _attention(cfg, n) == "causal"]
    bidir = [n for n in st1 if _attention(cfg, n) == "bidirectional"]
    if causal:
        text = (f"- Departure from the paper: {', '.join(cfg.teacher_label(n) for n in causal)} keeps the LLM's "
                "causal attention. The paper makes the LLM bidirectional and first adapts it with a long MNTP stage "
                "(LLM2Vec); benchmarks/STAGE1_STUDY.md compares the settings per minute of stage 1.")
        if bidir:
            def cra(n, kind):
                return _f(ev["teachers"].get(n, {}).get(kind, {}).get("R@1"))

            c, b = causal[0], bidir[0]
            text += (f" The paper's setting is kept as its own row, {cfg.teacher_label(b)}: the same stage 1 with "
                     f"bidirectional attention reaches CuPL CRA {cra(b, 'cupl')} (causal: {cra(c, 'cupl')}) and "
                     f"scene CRA {cra(b, 'scenes')} (causal: {cra(c, 'scenes')}).")
        md.append(text)
    return [*md, ""] if md else []


def _zeroshot_text(cfg: PipelineConfig, zs: dict) -> str:
    if not zs:
        return ("Zero-shot: no labelled image set in this run (n/a; Fashion-MNIST is used when the Debian package "
                "dataset-fashion-mnist is installed).")
    fm = cfg.fashion_mnist
    return (f"Zero-shot: top-1 on {fm.test} Fashion-MNIST test photos (10 classes, chance 0.100) of the same tower "
            f"trained for {fm.steps} steps on {fm.train} Fashion-MNIST training photos with that text side "
            "(class-level captions: CuPL descriptions as dense, the class name as short), classes scored through "
            "the model's own text path.")


def write_report(cfg: PipelineConfig, manifest: dict, config_source: str = "", out=None) -> dict:
    run_dir = Path(cfg.run_dir)
    rep = run_dir / "report"
    rep.mkdir(parents=True, exist_ok=True)
    ev = manifest["stages"]["eval"]["result"]
    zs = manifest["stages"].get("zeroshot", {}).get("result") or {}
    rows = build_rows(cfg, ev, zs)
    claims = check_claims(cfg, rows)
    plots = _plots(cfg, rows, rep)
    trunc = _clip_truncation(cfg)
    vers = versions()
    stage_s = {k: v.get("seconds") for k, v in manifest["stages"].items() if v.get("status") == "done"}
    table = markdown_table(rows)
    data = manifest["stages"].get("data", {}).get("result", {})
    st1 = {n: manifest["stages"].get(f"stage1/{n}", {}).get("result") for n in cfg.finetuned_teachers()}

    md = [f"# LLM2CLIP run report: {run_dir.name}", ""]
    md.append(f"Config: `{config_source or 'in memory'}`. Run folder: `{run_dir}`. Wall time of the last "
              f"invocation: **{fmt_duration(manifest.get('last_run_s', 0))}** (stages finished by earlier "
              f"invocations are skipped, not rerun); per-stage times below sum to "
              f"{fmt_duration(sum(s for s in stage_s.values() if s))} because stage-2 variants run "
              f"{cfg.parallel} at a time.")
    md += ["", "## Text teachers compared", "",
           f"Every variant trains the same vision tower ({cfg.stage2.model.vision.kind}, "
           f"{cfg.scenes.render_size} px) from scratch on the same {cfg.scenes.train} generated scenes for "
           f"{cfg.stage2.train.steps} steps of batch {cfg.stage2.train.batch_size}; only the text side differs. "
           f"Retrieval is on {cfg.scenes.val} held-out scenes (one short and one dense caption each; chance R@1 "
           f"{1 / cfg.scenes.val:.3f}). Captions: short {data.get('mean_words', {}).get('short', '?')} words on "
           f"average, dense {data.get('mean_words', {}).get('dense', '?')}. Scene CRA: each held-out dense caption "
           "queries the distinct short captions (pool size in brackets; many scenes share a short caption), a hit "
           "when its own scene's short caption ranks first. CuPL CRA: every description of the held-out classes "
           "queries all others, a hit when the first shares its class (the paper's CRA on real text). "
           + _zeroshot_text(cfg, zs), "", table, ""]
    if trunc:
        md.append(f"The CLIP text tower reads {trunc['context']} tokens: {trunc['over']} of {trunc['total']} "
                  f"held-out dense captions are longer (median {trunc['median_tokens']} tokens) and are cut.")
        md.append("")
    md += _stage1_text(cfg, st1, ev)
    md += ["## The paper's claims, checked", ""]
    if claims:
        for c in claims:
            md.append(f"- {'**holds**' if c['holds'] else '**does not hold**'}: {c['claim']} ({c['numbers']})")
    else:
        md.append("- (this run's variants do not allow the comparisons)")
    md += ["", "Differences of a few hundredths are within the noise of a few hundred held-out images and one seed.",
           ""]
    for p in plots:
        md += [f"![{p}]({p})", ""]
    md += ["## Timings per stage", "", "| stage | seconds |", "|---|---:|"]
    md += [f"| {k} | {v} |" for k, v in stage_s.items()]
    md += ["", "## Versions", "", "| package | version |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in vers.items()]
    md += ["", "## Config", "", "```yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(),
           "```", ""]
    (rep / "report.md").write_text("\n".join(md))
    result = {"rows": rows, "zeroshot": zs, "claims": claims, "clip_truncation": trunc, "stage_seconds": stage_s,
              "versions": vers, "eval": ev, "stage1": st1, "config": cfg.model_dump(mode="json"), "plots": plots}
    write_json_atomic(rep / "results.json", result)
    print("\n" + table + "\n", file=out)
    for c in claims:
        print(f"  {'holds' if c['holds'] else 'does not hold'}: {c['claim']}", file=out)
    print(f"\nreport: {rep / 'report.md'}", file=out, flush=True)
    return result
