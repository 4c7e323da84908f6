"""One rule for relative paths: in a config file, relative to the file's folder, whatever the working
directory; in a config built in code or set from the command line, relative to the working directory."""

import argparse
from pathlib import Path

import pytest

from llm2clip.config import load_config, parse_config
from llm2clip.convert.official import resolve_vision
from llm2clip.features.extract import EmbedConfig
from llm2clip.finetune.config import FinetuneConfig
from llm2clip.pipeline import load_pipeline_config
from llm2clip.pipeline.config import PipelineConfig
from llm2clip.text.specs import parse_encoder_spec
from llm2clip.train.config import RunConfig

RUN = """\
run_dir: out
model:
  vision: {kind: open_clip, name: ViT-B-16, pretrained: ./weights.bin}
data:
  train: {kind: manifest, path: data/m.jsonl, image_root: images}
  val: {kind: webdataset, shards: "shards/a-{000..001}.tar::shards/b.tar"}
  features: {store: feats}
"""
FINETUNE = """\
out: out
encoder: {model: ./llm, adapters: [./lora]}
data: {groups: [groups.jsonl], text: [corpus.txt]}
eval: {groups: [heldout.jsonl]}
"""
PIPELINE = """\
run_dir: out
llm: {model: ./llm, adapters: [./lora]}
teachers:
  raw: {kind: llm}
  other: {kind: encoder, encoder: {kind: llm, model: ./other}}
variants: [{teacher: raw}, {teacher: other}]
stage2:
  model: {vision: {kind: open_clip, name: ViT-B-16, pretrained: ./weights.bin}}
fashion_mnist: {enabled: off, root: fmnist}
"""
EMBED = """\
encoder: {kind: llm, model: ./llm}
captions: [caps.jsonl]
out: store
"""


def _paths(kind: str, cfg) -> dict:
    """Each path field of a loaded config, by name."""
    if kind == "run":
        d = cfg.data
        return {"run_dir": cfg.run_dir, "pretrained": cfg.model.vision.pretrained, "manifest": d.train.path,
                "image_root": d.train.image_root, "shards": d.val.shards.split("::")[1], "store": d.features.store}
    if kind == "finetune":
        return {"out": cfg.out, "model": cfg.encoder.model, "adapter": cfg.encoder.adapters[0],
                "groups": cfg.data.groups[0], "text": cfg.data.text[0], "eval": cfg.eval.groups[0]}
    if kind == "pipeline":
        return {"run_dir": cfg.run_dir, "llm": cfg.llm.model, "adapter": cfg.llm.adapters[0],
                "teacher": cfg.teachers["other"].encoder.model, "pretrained": cfg.stage2.model.vision.pretrained,
                "fmnist": cfg.fashion_mnist.root}
    return {"model": cfg.encoder.model, "captions": cfg.captions[0].path, "out": cfg.out}


EXPECTED = {
    "run": {"run_dir": "out", "pretrained": "weights.bin", "manifest": "data/m.jsonl", "image_root": "images",
            "shards": "shards/b.tar", "store": "feats"},
    "finetune": {"out": "out", "model": "llm", "adapter": "lora", "groups": "groups.jsonl", "text": "corpus.txt",
                 "eval": "heldout.jsonl"},
    "pipeline": {"run_dir": "out", "llm": "llm", "adapter": "lora", "teacher": "other", "pretrained": "weights.bin",
                 "fmnist": "fmnist"},
    "embed": {"model": "llm", "captions": "caps.jsonl", "out": "store"},
}
KINDS = {"run": (RUN, RunConfig), "finetune": (FINETUNE, FinetuneConfig), "pipeline": (PIPELINE, PipelineConfig),
         "embed": (EMBED, EmbedConfig)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("where", ["root", "sub", "elsewhere"])
def test_relative_paths_resolve_against_the_config_folder(kind, where, tmp_path, monkeypatch):
    text, cls = KINDS[kind]
    folder = tmp_path / "configs" / "exp"
    folder.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (folder / "cfg.yaml").write_text(text)
    # the config named from its grandparent (a relative path with two parts, the case that once got the
    # folder put in front twice), from a sibling folder (through ..), and absolutely
    cwd, name = {"root": (tmp_path, "configs/exp/cfg.yaml"), "sub": (tmp_path / "elsewhere", "../configs/exp/cfg.yaml"),
                 "elsewhere": (tmp_path / "elsewhere", str(folder / "cfg.yaml"))}[where]
    monkeypatch.chdir(cwd)
    cfg = load_config(name, cls)
    got = {k: Path(v).resolve() for k, v in _paths(kind, cfg).items()}
    assert got == {k: (folder / v).resolve() for k, v in EXPECTED[kind].items()}


def test_encoder_and_vision_files_resolve_against_their_folder(tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "enc.yaml").write_text("encoder: {kind: llm, model: ./llm, adapters: [./lora]}\n")
    (folder / "vision.yaml").write_text("vision: {kind: open_clip, name: ViT-B-16, pretrained: ./w.bin}\n")
    monkeypatch.chdir(tmp_path)
    enc = parse_encoder_spec("specs/enc.yaml")
    assert Path(enc.model).resolve() == folder / "llm" and Path(enc.adapters[0]).resolve() == folder / "lora"
    assert Path(resolve_vision("specs/vision.yaml").pretrained).resolve() == folder / "w.bin"
    (folder / "sent.yaml").write_text("encoder: {kind: sentence, model: ./minilm}\n")
    assert Path(parse_encoder_spec("specs/sent.yaml").model).resolve() == folder / "minilm"
    (folder / "alias.yaml").write_text("encoder: {kind: sentence, model: all-minilm-l6-v2}\n")
    assert parse_encoder_spec("specs/alias.yaml").model == "all-minilm-l6-v2"  # a name, not a path


def test_absolute_paths_and_names_stay_as_given(tmp_path):
    (tmp_path / "cfg.yaml").write_text(RUN.replace("run_dir: out", f"run_dir: {tmp_path / 'abs'}")
                                       .replace("./weights.bin", "openai"))
    cfg = load_config(tmp_path / "cfg.yaml", RunConfig)
    assert cfg.run_dir == str(tmp_path / "abs")
    assert cfg.model.vision.pretrained == "openai"  # an open_clip tag, not a path


def test_configs_built_in_code_and_overrides_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    from llm2clip.pipeline.cli import _apply

    cfg = parse_config(dict(__import__("yaml").safe_load(FINETUNE)), FinetuneConfig)
    assert cfg.out == "out" and cfg.data.groups == ["groups.jsonl"]  # as given: the working directory's
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "cfg.yaml").write_text(PIPELINE)
    monkeypatch.chdir(tmp_path)
    loaded = load_pipeline_config("exp/cfg.yaml")
    assert Path(loaded.run_dir) == Path("exp/out")
    # a --run-dir typed on the command line is the working directory's, not the config's
    over = _apply(loaded, argparse.Namespace(run_dir=Path("mine"), parallel=None, threads=None))
    assert over.run_dir == "mine"


def test_presets_and_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a preset lives inside the package: its run_dir is the working directory's
    assert load_pipeline_config("quickstart").run_dir == "runs/quickstart"
    assert load_pipeline_config("smoke").run_dir == "runs/smoke"
    # the repository's configs write into the repository's runs/, wherever they are run from
    repo = Path(__file__).resolve().parents[1]
    runs = repo / "runs"
    stage1 = load_config(repo / "configs" / "stage1_cupl.yaml", FinetuneConfig)
    assert Path(stage1.out).resolve() == runs / "stage1_cupl"
    for name in ("stage2-scenes", "stage2-scenes-clip"):
        assert Path(load_config(repo / "configs" / f"{name}.yaml", RunConfig).run_dir).resolve() == runs / name
