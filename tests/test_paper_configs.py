"""configs/paper: the paper's recipe validates as written, and runs end to end with tiny stand-ins.

The stand-ins go where a user puts their own copies (models/ and data/ beside the configs), so the configs'
paths are the ones tested; ``shrink`` is the one override of each config: sizes, steps and device only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm2clip.config import load_config
from llm2clip.features.extract import EmbedConfig, run_embedding
from llm2clip.finetune.config import FinetuneConfig
from llm2clip.train.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
KINDS = {"stage1": FinetuneConfig, "embed": EmbedConfig, "stage2": RunConfig}
LLMS = {"llama-3.2-1b": "Llama-3.2-1B-Instruct", "llama-3-8b": "Meta-Llama-3-8B-Instruct"}
STAGE2 = ("stage2-eva02-l14-336", "stage2-openai-vit-l14")

# What shrinks each config to a CPU test: dotted field -> value. Nothing here touches a path.
SHRINK = {
    "stage1": {"encoder.device": "cpu", "encoder.max_length": 64, "optim.steps": 2, "optim.warmup_steps": 1,
               "mntp.block_size": 16, "mntp.batch_size": 2, "contrastive.batch_size": 8,
               "contrastive.chunk_size": 4, "eval.every": 0, "eval.cupl_classes": 4, "eval.per_class": 2,
               "save_every": 1},
    "embed": {"encoder.device": "cpu", "encoder.max_length": 64, "encoder.batch_size": 8, "shard_size": 16,
              "progress": False},
    "stage2": {"model.vision": {"kind": "small_vit", "image_size": 16, "patch_size": 4, "width": 32, "layers": 2,
                                "heads": 2},
               "model.embed_dim": 32, "model.text.depth": 1, "data.workers": 0, "optim.warmup_steps": 1,
               "train.batch_size": 8, "train.steps": 2, "train.device": "cpu", "train.threads": 1,
               "train.checkpoint_every": 0, "train.log_every": 1},
}


def kind_of(path: Path) -> str:
    return path.name.split("-")[0]


def shrink(data: dict, kind: str) -> dict:
    for dotted, value in SHRINK[kind].items():
        node = data
        *parents, last = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return data


def configs() -> list[Path]:
    return sorted(PAPER.glob("*.yaml"))


def test_the_recipe_is_all_there():
    names = {p.stem for p in configs()}
    for llm in LLMS:
        assert {f"stage1-mntp-{llm}", f"stage1-cc-{llm}", f"embed-{llm}"} <= names
    assert set(STAGE2) <= names
    assert (PAPER / "README.md").is_file() and (PAPER / "eval.sh").is_file()


@pytest.mark.parametrize("path", configs(), ids=lambda p: p.stem)
def test_config_validates_with_the_official_settings(path):
    text = path.read_text()
    assert not re.search(r"^\s*[\w.]+:\s*/", text, re.M), "paths in configs/paper are relative"
    cfg = load_config(path, KINDS[kind_of(path)])
    if kind_of(path) == "stage1":
        e, lo = cfg.encoder, cfg.lora
        assert (lo.r, lo.alpha, lo.dropout, lo.top_layers) == (16, 32, 0.05, None)
        assert (cfg.optim.lr, cfg.optim.precision, cfg.optim.grad_checkpointing) == (2e-4, "bf16", True)
        assert (e.max_length, e.pooling, e.bidirectional, e.template) == (512, "mean", True, "llama3")
        if cfg.objective == "mntp":
            assert (cfg.mntp.mask_probability, cfg.mntp.block_size) == (0.2, 512)
        else:
            c = cfg.contrastive
            assert (c.batch_size, c.scale, c.hard_negatives, c.mask_same_group) == (512, 50, True, True)
            assert (cfg.optim.warmup_steps, cfg.optim.schedule) == (300, "linear")
            mntp = path.stem.replace("-cc-", "-mntp-")  # the MNTP run's adapter, in the repository's runs/paper
            assert e.adapters == [str(PAPER / ".." / ".." / "runs" / "paper" / mntp / "adapter")]
    elif kind_of(path) == "embed":
        assert (cfg.encoder.dtype, cfg.encoder.pooling, cfg.encoder.max_length) == ("bfloat16", "mean", 512)
    else:
        t, o = cfg.train, cfg.optim
        assert (t.batch_size, t.precision, t.grad_checkpointing) == (4096, "bf16", True)
        assert (o.layer_decay, o.weight_decay, o.grad_clip) == (0.85, 0.05, 5.0)
        assert cfg.data.caption_kinds == {"short": 0.5, "dense": 0.5}
        assert cfg.model.vision.kind == "open_clip" and cfg.model.embed_dim == 1280
        assert cfg.model.vision.name in {"EVA02-L-14-336", "ViT-L-14"}


def test_eval_script_names_registered_benchmarks():
    from llm2clip.eval.registry import REGISTRY

    text = (PAPER / "eval.sh").read_text()
    names = re.search(r"sets=\(([^)]*)\)", text).group(1).split()
    assert {"flickr30k", "coco", "sharegpt4v", "urban1k", "docci"} <= set(names)
    assert set(names) <= set(REGISTRY)
    assert subprocess.run(["bash", "-n", str(PAPER / "eval.sh")]).returncode == 0


# ------------------------------------------------------------------------------------- end to end
def _stand_ins(root: Path, tiny_llm_dir: Path) -> None:
    """Tiny models and data at the placeholder paths the configs name."""
    sys.path.insert(0, str(Path(__file__).parent))
    from stage2_helpers import write_scene_manifest

    from llm2clip.data.images import load_manifest
    from llm2clip.data.shards import write_shards

    for name in LLMS.values():
        shutil.copytree(tiny_llm_dir, root / "models" / name)
    data = root / "data"
    manifest = write_scene_manifest(root / "scenes", 24)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (data / "mntp").mkdir(parents=True)
    texts = [c["text"] for r in rows for c in r["captions"]]
    (data / "mntp" / "wikipedia.txt").write_text("\n".join(texts[::2]) + "\n")
    (data / "mntp" / "cc3m_captions.txt").write_text("\n".join(texts[1::2]) + "\n")
    with open(data / "caption_groups.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"group": i, "kinds": [c["kind"] for c in r["captions"]],
                                "captions": [c["text"] for c in r["captions"]]}) + "\n")
    with open(data / "captions.jsonl", "w") as f:
        for r in rows:
            for c in r["captions"]:
                f.write(json.dumps({"id": c["id"], "caption": c["text"]}) + "\n")
    write_shards(load_manifest(manifest), data / "shards", per_shard=8, progress=False)


def _tiny_config(root: Path, name: str):
    """configs/paper/NAME.yaml shrunk, written beside the stand-ins, loaded as a user would load it."""
    kind = name.split("-")[0]
    data = shrink(yaml.safe_load((PAPER / f"{name}.yaml").read_text()), kind)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path, KINDS[kind])


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, tiny_llm_dir):
    """Every config of the recipe in order: MNTP, CC and embedding per LLM, then both stage-2 towers."""
    from llm2clip.finetune.trainer import Stage1Trainer
    from llm2clip.train.loop import fit

    top = tmp_path_factory.mktemp("paper")
    root = top / "configs" / "paper"  # the configs' runs go two folders up: top/runs/paper
    root.mkdir(parents=True)
    _stand_ins(root, tiny_llm_dir)
    for llm in LLMS:
        for stage in ("stage1-mntp", "stage1-cc"):
            Stage1Trainer(_tiny_config(root, f"{stage}-{llm}"), progress=False).run(resume=False)
        run_embedding(_tiny_config(root, f"embed-{llm}"), progress=False)
    for name in STAGE2:
        fit(_tiny_config(root, name), progress=False)
    return top / "runs" / "paper"


def test_the_recipe_runs_end_to_end_on_tiny_models(paper_run):
    from llm2clip.features.store import FeatureStore
    from llm2clip.model import LLM2CLIP

    for llm in LLMS:
        assert (paper_run / f"stage1-mntp-{llm}" / "adapter" / "adapter_config.json").is_file()
        manifest = json.loads((paper_run / f"stage1-cc-{llm}" / "encoder" / "llm2clip_encoder.json").read_text())
        # the MNTP adapter merged first (recorded by its folder's name), then the CC one
        assert manifest["identity"]["adapters"] == ["adapter", f"stage1-cc-{llm}/adapter"]
        store = FeatureStore.open(paper_run / f"features-{llm}")
        assert store.num_ids == 48  # 24 scenes x (short, dense)
        assert store.identity["weight_hash"] == manifest["identity"]["weight_hash"]
    for name in STAGE2:
        model = LLM2CLIP.from_pretrained(paper_run / name / "model")
        assert model.text.in_dim == 32  # the tiny LLM's width, taken from the 8B config's store
