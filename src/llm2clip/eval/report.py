"""Evaluation reports: results as JSON (with model and data identity), a Markdown table laid out
like the paper's (R@1 I2T / T2I per benchmark, in %), and PNG plots (recall@K curves, R@1 bars).

A *run* is the JSON object :func:`make_run` builds: one model, the per-benchmark results that
``evaluate_retrieval`` / ``evaluate_zeroshot`` return, and where and when it ran. Tables and plots
take a list of runs, one row or series per model.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..fileio import markdown_table as markdown_table_of
from ..fileio import write_atomic, write_json_atomic, write_text_atomic

CURVE_TICKS = (1, 2, 5, 10, 20, 50, 100)


def model_identity(model, name: str | None = None) -> dict:
    """The model's own ``identity()`` when it has one, else its class; ``name`` labels the row."""
    ident = {}
    fn = getattr(model, "identity", None)
    if callable(fn):
        ident.update(fn())
    ident.setdefault("class", f"{type(model).__module__}.{type(model).__qualname__}")
    ident["name"] = name or ident.get("name") or type(model).__name__
    return ident


def make_run(model: dict | str, results: Sequence[dict], **extra) -> dict:
    from .. import __version__

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_version = None
    model = {"name": model} if isinstance(model, str) else dict(model)
    if "name" not in model:
        raise InputError("the model identity needs a 'name'")
    return {"model": model, "results": list(results),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "llm2clip_version": __version__,
            "environment": {"python": platform.python_version(), "torch": torch_version}, **extra}


def load_runs(paths: Sequence[str | Path]) -> list[dict]:
    runs = []
    for p in paths:
        try:
            obj = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{p}: cannot read results: {err}") from None
        runs.extend(obj if isinstance(obj, list) else [obj])
    return runs


# The paper's column order and names (Table 2, then cross-lingual, then zero-shot).
DISPLAY = {"flickr30k": "Flickr30k", "coco": "COCO", "sharegpt4v": "ShareGPT4V", "urban1k": "Urban-1k",
           "docci": "DOCCI", "flickr30k-cn": "Flickr30k-CN", "coco-cn": "COCO-CN", "imagenet": "ImageNet",
           "scenes-short": "Scenes short", "scenes-dense": "Scenes dense", "fashion-mnist": "Fashion-MNIST",
           "cupl-cra": "model CRA: CuPL"}  # through the model's text path, adapter included (not the encoder's own)


def _benchmarks(runs: Sequence[dict]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for run in runs:
        for r in run["results"]:
            seen.setdefault(r["benchmark"], r["task"])
    order = list(DISPLAY)
    return sorted(seen.items(), key=lambda bt: order.index(bt[0]) if bt[0] in order else len(order))


def _label(bench: str) -> str:
    return DISPLAY.get(bench, bench)


def _find(run: dict, bench: str) -> dict | None:
    return next((r for r in run["results"] if r["benchmark"] == bench), None)


def _pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def _header(bench: str, task: str, k: int) -> str:
    if task == "retrieval":
        return f"{_label(bench)} (I2T / T2I R@{k})"
    if task == "cra":
        return f"{_label(bench)} (R@1, pool)"
    return f"{_label(bench)} (top-1 / top-5)"


def markdown_table(runs: Sequence[dict], k: int = 1) -> str:
    """Rows: models; columns: benchmarks. Retrieval cells are ``I2T / T2I`` R@k in %, zero-shot
    cells ``top-1 / top-5`` in %, CRA cells R@1 in % with the pool size."""
    if isinstance(runs, dict):
        runs = [runs]
    benches = _benchmarks(runs)
    head = ["Model"] + [_header(b, t, k) for b, t in benches]
    rows = []
    for run in runs:
        cells = [run["model"]["name"]]
        for b, t in benches:
            r = _find(run, b)
            if r is None:
                cells.append("")
            elif t == "retrieval":
                m = r["metrics"]
                cells.append(f"{_pct(m.get(f'i2t_R@{k}'))} / {_pct(m.get(f't2i_R@{k}'))}")
            elif t == "cra":
                m = r["metrics"]
                cells.append(f"{_pct(m.get('R@1'))} ({m.get('pool_size', '?')})")
            else:
                m = r["metrics"]
                cells.append(f"{_pct(m.get('top1'))} / {_pct(m.get('top5'))}")
        rows.append(cells)
    return markdown_table_of(head, rows)


def data_table(runs: Sequence[dict]) -> str:
    """Which data each run scored: sizes, skips and annotation hashes (first 12 hex digits)."""
    if isinstance(runs, dict):
        runs = [runs]
    rows = []
    for run in runs:
        for r in run["results"]:
            d = r.get("data", {})
            files = ", ".join(f"{n}: {h[:12]}" for n, h in d.get("files", {}).items())
            size = d.get("captions", d.get("classes", ""))
            rows.append([run["model"]["name"], r["benchmark"], d.get("images", ""), size, d.get("skipped", 0), files])
    return markdown_table_of(["Model", "Benchmark", "Images", "Captions / classes", "Skipped", "Annotation sha256"],
                             rows)


def markdown_report(runs: Sequence[dict], title: str = "llm2clip evaluation") -> str:
    if isinstance(runs, dict):
        runs = [runs]
    parts = [f"# {title}", "", "R@1 in %, I2T (image queries) / T2I (caption queries).", "", markdown_table(runs), ""]
    skipped = [(run["model"]["name"], s) for run in runs for s in run.get("skipped", [])]
    if skipped:
        parts += ["Skipped:", ""] + [f"- {name}: {s['benchmark']}: {s['reason']}" for name, s in skipped] + [""]
    parts += ["## Data", "", data_table(runs), ""]
    return "\n".join(parts)


def _save(fig, path) -> Path:
    """The figure as a PNG at ``path``, written atomically."""
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        _pyplot().close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_recall_curves(runs: Sequence[dict], path: str | Path) -> Path:
    """One panel per retrieval benchmark: R@K against K, I2T solid and T2I dashed, one colour per model."""
    plt = _pyplot()
    benches = [b for b, t in _benchmarks(runs) if t == "retrieval"]
    if not benches:
        raise InputError("no retrieval results to plot")
    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.4), squeeze=False)
    for ax, b in zip(axes[0], benches, strict=True):
        for j, run in enumerate(runs):
            r = _find(run, b)
            if r is None or "curves" not in r:
                continue
            c = r["curves"]
            color = f"C{j % 10}"
            ax.plot(c["k"], [100 * v for v in c["i2t"]], "-o", ms=3, color=color, label=f"{run['model']['name']} I2T")
            ax.plot(c["k"], [100 * v for v in c["t2i"]], "--s", ms=3, color=color, label=f"{run['model']['name']} T2I")
        ax.set_xscale("log")
        ax.set_xticks(CURVE_TICKS, [str(k) for k in CURVE_TICKS])
        ax.set_title(_label(b))
        ax.set_xlabel("K")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall@K (%)")
    handles = {}  # one entry per series, also for models missing from the last panel
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_r1_bars(runs: Sequence[dict], path: str | Path) -> Path:
    """Grouped bars: per benchmark, R@1 I2T and T2I (retrieval) or top-1 (zero-shot) of each model."""
    plt = _pyplot()
    benches = _benchmarks(runs)
    if not benches:
        raise InputError("no results to plot")
    series = []  # (label, values per benchmark)
    for run in runs:
        i2t, t2i = [], []
        for b, _ in benches:
            r = _find(run, b)
            m = r["metrics"] if r else {}
            i2t.append(100 * m.get("i2t_R@1", m.get("top1", m.get("R@1", float("nan")))))
            t2i.append(100 * m.get("t2i_R@1", float("nan")))
        series += [(f"{run['model']['name']} I2T / top-1 / CRA", i2t), (f"{run['model']['name']} T2I", t2i)]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(benches)), 3.6))
    for j, (label, vals) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(benches))]
        ax.bar(xs, vals, width, label=label, color=f"C{(j // 2) % 10}", alpha=1.0 if j % 2 == 0 else 0.55)
    ax.set_xticks(range(len(benches)))
    ax.set_xticklabels([_label(b) for b, _ in benches], rotation=20)
    ax.set_ylabel("R@1 / top-1 / CRA R@1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def write_report(runs: Sequence[dict], out_dir: str | Path, title: str = "llm2clip evaluation") -> dict:
    """results.json, report.md, recall_curves.png (if any retrieval) and r1_bars.png in ``out_dir``."""
    if isinstance(runs, dict):
        runs = [runs]
    out = Path(out_dir)
    paths = {"json": write_json_atomic(out / "results.json", list(runs))}
    md = markdown_report(runs, title)
    if any(t == "retrieval" for _, t in _benchmarks(runs)):
        paths["curves"] = plot_recall_curves(runs, out / "recall_curves.png")
        md += "\n![recall@K](recall_curves.png)\n"
    paths["bars"] = plot_r1_bars(runs, out / "r1_bars.png")
    md += "\n![R@1](r1_bars.png)\n"
    paths["markdown"] = write_text_atomic(out / "report.md", md)
    return paths
