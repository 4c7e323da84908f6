"""The stages of `llm2clip run`, as module-level functions of plain (picklable) arguments.

data       scene captions to embed, and scene caption groups for stage 1
stage1/T   caption-contrastive LoRA fine-tuning of the LLM for fine-tuned teacher T (CuPL classes + scene pairs)
embed/T    every scene caption embedded once by teacher T into a feature store
train/V    stage 2 of variant V (a teacher and a dense-caption share): vision tower + adapter
eval       CRA per teacher, short / dense retrieval per variant (held-out scenes)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..data.jsonl import read_jsonl
from ..fileio import read_json, write_text_atomic

log = logging.getLogger(__name__)


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def _write_jsonl(path: Path, rows) -> int:
    lines = [json.dumps(r) + "\n" for r in rows]
    write_text_atomic(path, "".join(lines))
    return len(lines)


# ------------------------------------------------------------------------------------- data
def scene_sets(scenes: dict):
    from ..data.scenes import SceneSet

    s = scenes
    common = dict(seed=s["seed"], min_objects=s["min_objects"], max_objects=s["max_objects"],
                  render_size=s["render_size"])
    return SceneSet(s["train"], offset=0, **common), SceneSet(s["val"], offset=s["val_offset"], **common)


def make_data(out: str, scenes: dict, stage1_scenes: int, fmnist_per_class: int | None = None) -> dict:
    """captions.jsonl (id, caption) of the train and held-out scenes, and of the Fashion-MNIST classes
    when given; stage1_groups.jsonl (the first `stage1_scenes` training scenes' short and dense captions
    as one group each) and heldout_groups.jsonl (the same for every held-out scene)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = scene_sets(scenes)
    rows = [{"id": cid, "caption": text} for ss in (train, val) for cid, text in ss.captions().items()]
    n_scene_rows = len(rows)
    if fmnist_per_class:
        from ..data.fashion_mnist import class_captions

        rows += [{"id": cid, "caption": text} for kinds in class_captions(fmnist_per_class).values()
                 for caps in kinds.values() for cid, text in caps]
    n_caps = _write_jsonl(out_dir / "captions.jsonl", rows)
    groups = []
    for i in range(min(stage1_scenes, len(train))):
        caps = train[i].captions()
        groups.append({"group": f"scene-{train[i].key}", "captions": list(caps.values()), "kinds": list(caps)})
    n_groups = _write_jsonl(out_dir / "stage1_groups.jsonl", groups)
    # the held-out scenes as caption groups too (for stage-1 studies: `llm2clip finetune-text` eval.groups)
    _write_jsonl(out_dir / "heldout_groups.jsonl",
                 ({"group": f"scene-{val[i].key}", "captions": list(c.values()), "kinds": list(c)}
                  for i in range(len(val)) for c in [val[i].captions()]))
    scene = rows[:n_scene_rows]
    words = {k: sum(len(r["caption"].split()) for r in scene if r["id"].endswith(k)) / max(1, len(scene) // 2)
             for k in ("-short", "-dense")}
    return {"captions": n_caps, "fashion_mnist_captions": n_caps - n_scene_rows, "stage1_groups": n_groups,
            "mean_words": {k[1:]: round(v, 1) for k, v in words.items()}}


# ----------------------------------------------------------------------------------- stage 1
def run_stage1(finetune_cfg: dict, threads: int | None, progress: bool = True) -> dict:
    from ..config import parse_config
    from ..finetune.config import FinetuneConfig
    from ..finetune.trainer import Stage1Trainer

    _threads(threads)
    cfg = parse_config(finetune_cfg, FinetuneConfig, "stage1")
    out = Path(cfg.out)
    summary = Stage1Trainer(cfg, progress=None if progress else False).run(resume=True)
    trunk = None
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        for _, row in read_jsonl(metrics):
            trunk = row.get("trunk_s", trunk)
    return {**summary, "trunk_s": trunk, "encoder": str(out / "encoder")}


# ------------------------------------------------------------------------------------- embed
def run_embed(embed_cfg: dict, threads: int | None, progress: bool = True) -> dict:
    from ..config import parse_config
    from ..features import FeatureStore
    from ..features.extract import EmbedConfig, run_embedding

    _threads(threads)
    cfg = parse_config(embed_cfg, EmbedConfig, "embed")
    out = run_embedding(cfg, progress=progress)
    store = FeatureStore.open(out)
    return {"store": str(out), "captions": store.num_ids, "dim": store.dim}


# ------------------------------------------------------------------------------------- train
def run_train(run_cfg: dict) -> dict:
    from ..config import parse_config
    from ..train.checkpoint import list_checkpoints
    from ..train.config import RunConfig
    from ..train.loop import fit

    logging.basicConfig(level=logging.WARNING)
    cfg = parse_config(run_cfg, RunConfig, "stage2")
    _threads(cfg.train.threads)
    resume = "latest" if list_checkpoints(cfg.run_dir) else None
    fit(cfg, resume=resume, progress=False)
    return train_result(Path(cfg.run_dir))


def train_result(run_dir: Path) -> dict:
    """The final held-out retrieval and the mean throughput, from the run's metrics.jsonl."""
    evals, ips, steps = {}, [], 0
    for _, row in read_jsonl(run_dir / "metrics.jsonl"):
        steps = max(steps, row.get("step", 0))
        if "eval" in row:
            evals = {"step": row["step"], **row["eval"]}
        if row.get("images_per_s"):
            ips.append(row["images_per_s"])
    ips.sort()
    return {"steps": steps, "eval": evals, "images_per_s": ips[len(ips) // 2] if ips else None,
            "model": str(run_dir / "model")}


def train_progress(run_dir: Path, total: int):
    """For the progress bar: (last logged step, total) of a running stage-2 variant."""
    path = Path(run_dir) / "metrics.jsonl"

    def read() -> tuple[int, int]:
        step = 0
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 4096))
                for line in f.read().decode("utf-8", "replace").splitlines()[1:] or []:
                    if line.startswith("{"):
                        try:
                            step = max(step, int(json.loads(line).get("step", 0)))
                        except ValueError:
                            pass
        except OSError:
            pass
        return min(step, total), total

    return read


def run_zeroshot(models: dict, test: int, root: str | None, threads: int | None) -> dict:
    """Zero-shot top-1 / top-5 on the Fashion-MNIST test split, through each model's own text path
    (class descriptions and templates; llm2clip.eval's built-in 'fashion-mnist' set)."""
    from ..eval.checkpoint import evaluate_checkpoint

    _threads(threads)
    out = {}
    for teacher, model_dir in models.items():
        bench = f"fashion-mnist={root}" if root else "fashion-mnist"
        run = evaluate_checkpoint(model_dir, [bench], options={"fashion-mnist": {"count": test}},
                                  device="cpu", progress=False)
        m = run["results"][0]["metrics"]
        out[teacher] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        log.info("zero-shot %s: top-1 %.3f", teacher, m.get("top1", float("nan")))
    return out


# -------------------------------------------------------------------------------------- eval
def dense_to_short(emb: torch.Tensor, ids: list[str], texts: list[str], ks) -> dict:
    """Scene CRA: each dense caption queries the distinct short captions (many scenes share one, e.g.
    'three shapes on a navy background'); a hit at K when its own scene's short caption is in the top K."""
    from ..eval.cra import paired_caption_retrieval

    row = {i: k for k, i in enumerate(ids)}
    dense = [k for k, i in enumerate(ids) if i.endswith("-dense")]
    short = [row[ids[k][: -len("-dense")] + "-short"] for k in dense]
    return paired_caption_retrieval(emb[dense], emb[short], [texts[k] for k in short], ks)


def run_eval(run_dir: str, scenes: dict, teachers: dict, variants: dict[str, list[str]], cupl: dict,
             ks: list[int], threads: int | None) -> dict:
    """CRA of every teacher on the held-out scenes (each caption's positive: the other caption of
    its scene) and on held-out CuPL classes; the retrieval of each variant comes from its training
    run's final held-out evaluation.

    ``teachers``: name -> {"kind": "store", "store": DIR, "encoder": config dict} or
    {"kind": "clip", "model": DIR}; ``variants``: variant -> its runs (one per seed), whose train results
    the run manifest holds; the report reads each run's per-query ranks from its folder.
    """
    import numpy as np

    from ..api import load
    from ..data.captions import cupl_caption_set
    from ..data.images import build_caption_encoder
    from ..eval.cra import caption_retrieval_accuracy
    from ..features import FeatureStore
    from ..text.specs import parse_caption_encoder_spec

    _threads(threads)
    _, val = scene_sets(scenes)
    ids, texts = [], []
    for i in range(len(val)):
        for kind, text in val[i].captions().items():
            ids.append(val.caption_id(i, kind))
            texts.append(text)
    cs = cupl_caption_set("heldout", cupl["classes"], cupl["per_class"], False)
    from .runner import PIPELINE_MANIFEST

    recorded = read_json(Path(run_dir) / PIPELINE_MANIFEST, "run manifest")["stages"]
    out: dict = {"teachers": {},
                 "variants": {v: [recorded[f"train/{r}"]["result"] for r in runs] for v, runs in variants.items()},
                 "runs": variants}
    for name, t in teachers.items():
        if t["kind"] == "clip":
            model = load(t["model"], device="cpu")  # the package's one loader, on the CPU as before
            scene_emb, cupl_emb = (model.encode_text(c, batch_size=256, progress=False) for c in (texts, cs.captions))
        else:  # scene captions from the teacher's store; CuPL through the teacher itself
            store = FeatureStore.open(t["store"])
            scene_emb = torch.from_numpy(np.asarray(store.get_by_ids(ids), np.float32))
            enc = build_caption_encoder(parse_caption_encoder_spec(t["encoder"]))
            cupl_emb = torch.as_tensor(np.asarray(enc.encode(cs.captions), np.float32))
            del enc
        out["teachers"][name] = {"scenes": dense_to_short(scene_emb.float(), ids, texts, ks),
                                 "cupl": caption_retrieval_accuracy(cupl_emb.float(), cs.groups, ks)}
        log.info("CRA %s: scenes R@1 %.3f, CuPL R@1 %.3f", name, out["teachers"][name]["scenes"]["R@1"],
                 out["teachers"][name]["cupl"]["R@1"])
    return out
