"""Your own data, one format (issue 16.4): the image manifest row is the caption record of `embed`, stage 2 and
`eval-text`; the configs/own-data example runs end to end through the CLI; the older shapes still read, warned."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from llm2clip.cli import main
from llm2clip.data.captions import load_caption_file
from llm2clip.data.images import load_manifest
from llm2clip.errors import InputError
from llm2clip.features.extract import FileSource, read_captions

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "own-data"
ROWS = [{"image": "photos/a.jpg", "captions": [{"id": "a-1", "kind": "short", "text": "a red circle"},
                                                {"id": "a-2", "kind": "dense", "text": "A red circle, centered."}]},
        {"image": "photos/b.jpg", "captions": [{"id": "b-1", "kind": "short", "text": "a blue square"},
                                                {"id": "b-2", "kind": "dense", "text": "A blue square, top left."}]}]
CSV = ("image,caption_id,kind,text\nphotos/a.jpg,a-1,short,a red circle\nphotos/a.jpg,a-2,dense,"
       "\"A red circle, centered.\"\nphotos/b.jpg,b-1,short,a blue square\nphotos/b.jpg,b-2,dense,"
       "\"A blue square, top left.\"\n")


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "deprecated" in r.getMessage()]


# ----------------------------------------------------------------------------- the example, end to end
def test_the_own_data_example_runs_end_to_end_through_the_cli(tmp_path, capsys):
    """manifest -> embed (MiniLM) -> train (3 steps) -> eval-text and retrieval on its images -> index -> search,
    run from a copy of the repository's layout so the configs' relative paths land in runs/own-data/."""
    from llm2clip.eval.benchmark import Benchmark
    from llm2clip.eval.checkpoint import load_eval_model
    from llm2clip.eval.retrieval import caption_index_from_lists, evaluate_retrieval
    from llm2clip.features import FeatureStore

    ex = tmp_path / "configs" / "own-data"
    shutil.copytree(EXAMPLE, ex)
    runs = tmp_path / "runs" / "own-data"

    assert main(["embed", str(ex / "embed.yaml"), "--no-progress"]) == 0
    store = FeatureStore.open(runs / "store")
    assert store.num_ids == 24 and store.dim == 384  # 12 images x (short, dense); MiniLM's width

    assert main(["train", str(ex / "train.yaml"), "--steps", "3", "--run-dir", str(runs / "train"),
                 "--no-progress"]) == 0
    model_dir = runs / "train" / "model"
    assert (model_dir / "model.safetensors").is_file()
    rows = [json.loads(x) for x in (runs / "train" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in rows) == 3

    # eval-text: CRA of the caption encoder on the manifest's captions, one group per image
    assert main(["eval-text", "-e", "minilm", "-c", str(ex / "manifest.jsonl"), "-k", "1", "5",
                 "--out", str(runs / "cra.json")]) == 0
    (cra,) = json.loads((runs / "cra.json").read_text())
    assert cra["pool_size"] == 24 and 0 <= cra["R@1"] <= 1

    # retrieval on the example's images (`llm2clip eval` takes registered benchmarks only: the Python API)
    records = load_manifest(ex / "manifest.jsonl", ex)
    captions, index = caption_index_from_lists([[c.text for cs in r.captions.values() for c in cs]
                                                for r in records])
    bench = Benchmark("own-data", "retrieval", [r.image for r in records], captions, index)
    model = load_eval_model(str(model_dir), device="cpu")
    metrics = evaluate_retrieval(model, bench, preprocess=model.preprocess, progress=False)["metrics"]
    assert metrics["images"] == 12 and metrics["captions"] == 24 and 0 <= metrics["t2i_R@1"] <= 1

    index_dir = runs / "index"
    assert main(["index", str(ex / "images"), "--model", str(model_dir), "--out", str(index_dir),
                 "--no-progress"]) == 0
    files = (index_dir / "files.txt").read_text().split()
    assert len(files) == 12 and all(f.endswith(".png") for f in files)
    capsys.readouterr()
    assert main(["search", str(index_dir), records[0].captions["dense"][0].text, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
    assert all(Path(h["path"]).name in {Path(f).name for f in files} for h in hits)


def test_the_example_manifest_is_the_one_shape():
    records = load_manifest(EXAMPLE / "manifest.jsonl", EXAMPLE)
    assert len(records) == 12 and all(Path(r.image).is_file() for r in records)
    assert all(sorted(r.captions) == ["dense", "short"] for r in records)
    ids = [c.id for r in records for cs in r.captions.values() for c in cs]
    assert len(ids) == len(set(ids)) == 24
    assert all(p.stat().st_size < 4096 for p in (EXAMPLE / "images").glob("*.png"))


# ----------------------------------------------------------------------------- the three readers
@pytest.mark.parametrize("name", ["m.jsonl", "m.csv"])
def test_every_reader_takes_the_manifest_shape(tmp_path, caplog, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text(CSV, encoding="utf-8")
    else:
        _jsonl(path, ROWS)
    with caplog.at_level(logging.WARNING):
        caps = read_captions([FileSource(path=str(path))])  # embed
        records = load_manifest(path, tmp_path)  # stage 2
        cs = load_caption_file(path)  # eval-text
    assert caps.ids == ["a-1", "a-2", "b-1", "b-2"] and caps.texts[1] == "A red circle, centered."
    assert [r.image for r in records] == [str(tmp_path / "photos" / "a.jpg"), str(tmp_path / "photos" / "b.jpg")]
    assert records[1].captions["dense"][0].text == "A blue square, top left."
    assert cs.groups == ["photos/a.jpg"] * 2 + ["photos/b.jpg"] * 2 and cs.captions[2] == "a blue square"
    assert _deprecations(caplog) == []
    explicit = read_captions([FileSource(path=str(path), format="manifest")])
    assert explicit.fingerprint == caps.fingerprint


def test_the_old_shapes_still_read_with_one_deprecation_warning(tmp_path, caplog):
    flat = _jsonl(tmp_path / "caps.jsonl", [{"id": "a-1", "caption": "a red circle"}, {"id": 7, "caption": "x"}])
    flat_csv = tmp_path / "caps.csv"
    flat_csv.write_text("id,caption\na-1,a red circle\n", encoding="utf-8")
    grouped = _jsonl(tmp_path / "groups.jsonl", [{"group": "a", "caption": "a red circle"},
                                                 {"group": "a", "caption": "A red circle, centered."}])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # once per file
            assert read_captions([FileSource(path=str(flat))]).ids == ["a-1", "7"]
            assert read_captions([FileSource(path=str(flat_csv))]).ids == ["a-1"]
            assert load_caption_file(grouped).groups == ["a", "a"]
    warned = _deprecations(caplog)
    assert len(warned) == 3
    for path, msg in zip((flat, flat_csv, grouped), warned):
        assert str(path) in msg and '"captions": [{"id"' in msg
    # a format set in the config reads a flat caption file (ids without images) and is not warned about
    caplog.clear()
    other = _jsonl(tmp_path / "other.jsonl", [{"id": "c-1", "caption": "a cat"}])
    with caplog.at_level(logging.WARNING):
        assert read_captions([FileSource(path=str(other), format="jsonl")]).ids == ["c-1"]
    assert _deprecations(caplog) == []


BAD = [
    ({"image": "photos/c.jpg"}, "field 'captions'"),
    ({"image": "photos/c.jpg", "captions": [{"kind": "short", "text": "a cat"}]}, "field 'id'"),
    ({"image": "photos/c.jpg", "captions": [{"id": "c-1", "kind": "short", "text": " "}]}, "field 'text'"),
    ({"image": "photos/c.jpg", "captions": [{"id": "c-1", "text": "a cat"}]}, "field 'kind'"),
    ({"captions": [{"id": "c-1", "kind": "short", "text": "a cat"}]}, "field 'image'"),
]
READERS = {"embed": lambda p: read_captions([FileSource(path=str(p))]), "stage 2": load_manifest,
           "eval-text": load_caption_file}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("row,field", BAD, ids=["no-captions", "no-id", "empty-text", "no-kind", "no-image"])
def test_a_bad_row_names_file_line_and_field(tmp_path, reader, row, field):
    path = _jsonl(tmp_path / "m.jsonl", [ROWS[0], row])
    with pytest.raises(InputError, match=rf"m\.jsonl:2: .*{field}"):
        READERS[reader](path)


@pytest.mark.parametrize("reader", ["embed", "eval-text"])
def test_embedding_and_eval_text_need_each_captions_text(tmp_path, reader):
    path = _jsonl(tmp_path / "m.jsonl", [ROWS[0], {"image": "b.jpg", "captions": [{"id": "b-1", "kind": "short"}]}])
    assert load_manifest(path)[1].captions["short"][0].text is None  # stage 2 reads the store by id
    with pytest.raises(InputError, match=r"m\.jsonl:2: caption 'b-1' has no 'text'"):
        READERS[reader](path)


def test_a_bad_csv_row_names_its_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(CSV + "photos/c.jpg,,short,a cat\n", encoding="utf-8")
    for read in READERS.values():
        with pytest.raises(InputError, match=r"m\.csv:6: field 'id'"):
            read(path)


@pytest.mark.slow
def test_the_optional_stage1_on_the_manifest_then_embed_with_its_encoder(tmp_path):
    """stage1.yaml fine-tunes SmolLM2 on the manifest's captions grouped by image (2 steps here), and
    embed-stage1.yaml embeds the manifest with the fine-tuned encoder."""
    import yaml

    from llm2clip.features import FeatureStore
    from llm2clip.finetune.data import load_groups_jsonl

    groups = load_groups_jsonl(EXAMPLE / "manifest.jsonl")
    assert len(groups) == 12 and all(g.kinds == ["short", "dense"] for g in groups.groups)
    ex = tmp_path / "configs" / "own-data"
    shutil.copytree(EXAMPLE, ex)
    cfg = yaml.safe_load((ex / "stage1.yaml").read_text())
    cfg["optim"]["steps"], cfg["eval"]["cupl_classes"], cfg["eval"]["per_class"] = 2, 4, 2  # short, same chain
    (ex / "stage1.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune-text", str(ex / "stage1.yaml")]) == 0
    runs = tmp_path / "runs" / "own-data"
    summary = json.loads((runs / "stage1" / "summary.json").read_text())
    assert summary["manifest_dense_short_pool_size"] == 12
    assert main(["embed", str(ex / "embed-stage1.yaml"), "--no-progress"]) == 0
    store = FeatureStore.open(runs / "store-stage1")
    assert store.num_ids == 24 and store.dim == 576  # SmolLM2-135M's width


def test_a_manifest_whose_images_have_one_caption_each_gives_no_stage1_groups(tmp_path):
    from llm2clip.finetune.data import load_groups_jsonl

    rows = [{"image": r["image"], "captions": r["captions"][:1]} for r in ROWS]
    with pytest.raises(InputError, match="two or more captions"):
        load_groups_jsonl(_jsonl(tmp_path / "m.jsonl", rows))
    old = _jsonl(tmp_path / "g.jsonl", [{"group": "a", "captions": ["x", "y"]}])  # the stage-1 group file still reads
    assert load_groups_jsonl(old).groups[0].captions == ["x", "y"]
