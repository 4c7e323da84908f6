"""llm2clip.fileio: atomic files and folders, image opening, Markdown tables, and safe replacement of outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llm2clip import fileio
from llm2clip.errors import ConfigError, InputError


# ------------------------------------------------------------------------------------ atomic files
def test_write_atomic_leaves_the_old_file_when_the_writer_fails(tmp_path):
    p = tmp_path / "sub" / "a.json"
    fileio.write_json_atomic(p, {"x": Path("y")})
    assert p.read_text() == '{\n  "x": "y"\n}\n'

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        fileio.write_atomic(p, boom)
    assert json.loads(p.read_text()) == {"x": "y"} and sorted(os.listdir(p.parent)) == ["a.json"]
    assert fileio.write_bytes_atomic(p, b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_remove_temp_files_clears_files_and_folders_of_killed_writers(tmp_path):
    (tmp_path / f".a.npy{fileio.TMP_MARK}12").write_bytes(b"x")
    (tmp_path / f".b{fileio.TMP_MARK}x").mkdir()
    (tmp_path / "keep.npy").write_bytes(b"x")
    assert fileio.remove_temp_files(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npy"]


def test_building_dir_publishes_only_a_finished_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), fileio.building_dir(out) as tmp:
        (tmp / "f").write_text("x")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with fileio.building_dir(out) as tmp:
        (tmp / "f").write_text("1")
    with fileio.building_dir(out, keep_existing=True) as tmp:  # a cache built meanwhile by another process wins
        (tmp / "f").write_text("2")
    assert (out / "f").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with fileio.building_dir(out) as tmp:  # replacing: the old folder is swapped aside, then removed
        (tmp / "f").write_text("3")
    assert (out / "f").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------------ images, tables
def test_open_image_and_its_errors(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 3), "red").save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert fileio.open_image(tmp_path / "a.png").size == (4, 3)
    assert fileio.open_image(data).mode == "RGB"
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for bad in (tmp_path / "cut.png", b"not an image", tmp_path / "missing.png"):
        with pytest.raises(fileio.image_errors()):
            fileio.open_image(bad)
    assert Image.DecompressionBombError in fileio.image_errors()


def test_markdown_table():
    assert fileio.markdown_table(["a", "b"], [[1, "x"]], align="lr") == "| a | b |\n|---|---:|\n| 1 | x |"
    with pytest.raises(ValueError):
        fileio.markdown_table(["a"], [[1, 2]])


# ------------------------------------------------------------------------------------ replacing outputs
def _ours(folder: Path, record: str = fileio.JOB_RECORD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / record).write_text("{}")
    return folder


def test_prepare_output_dir_allows_absent_empty_and_our_own_folders(tmp_path):
    assert fileio.prepare_output_dir(tmp_path / "new" / "out", False) == tmp_path / "new" / "out"
    assert (tmp_path / "new").is_dir()
    (tmp_path / "empty").mkdir()
    fileio.prepare_output_dir(tmp_path / "empty", False)
    for record in ("llm2clip_model.json", "llm2clip_encoder.json", "llm2clip_conversion.json", fileio.JOB_RECORD):
        fileio.prepare_output_dir(_ours(tmp_path / record), True)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shards.json").write_text(json.dumps({"format": "llm2clip-shards/1"}))
    fileio.prepare_output_dir(shards, True)


def test_prepare_output_dir_refusals(tmp_path, monkeypatch):
    full = _ours(tmp_path / "full")
    with pytest.raises(ConfigError, match="not empty .*--force"):
        fileio.prepare_output_dir(full, False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not written by llm2clip"):
        fileio.prepare_output_dir(foreign, True)
    (foreign / "shards.json").write_text('{"format": "someone-else"}')  # a shards.json must carry our format
    with pytest.raises(ConfigError, match="not written by llm2clip"):
        fileio.prepare_output_dir(foreign, True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        fileio.prepare_output_dir(tmp_path / "file", True)
    # The working folder, any folder above it, and the home folder: never, even when llm2clip wrote them.
    work = _ours(tmp_path / "work" / "inner")
    _ours(tmp_path / "work")
    monkeypatch.chdir(work)
    for target in (Path("."), Path(".."), work):
        with pytest.raises(ConfigError, match="working folder"):
            fileio.prepare_output_dir(target, True)
    home = _ours(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="home folder"):
        fileio.prepare_output_dir(home, True)
    with pytest.raises(InputError):
        fileio.prepare_output_dir(foreign, True, error=InputError)
    assert (foreign / "thesis.tex").exists() and (work / fileio.JOB_RECORD).exists()


def test_convert_force_replaces_only_what_llm2clip_wrote(tmp_path, monkeypatch):
    from llm2clip.convert.official import _finish_dir, _fresh_dir

    monkeypatch.chdir(_ours(tmp_path / "cwd"))
    with pytest.raises(ConfigError, match="working folder"):
        _fresh_dir(Path("."), True)  # `--out . --force` used to delete the working folder
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by llm2clip"):
        _fresh_dir(foreign, True)
    old = _ours(tmp_path / "model", "llm2clip_model.json")
    tmp = _fresh_dir(old, True)
    (tmp / "llm2clip_model.json").write_text('{"new": 1}')
    _finish_dir(tmp, old)
    assert json.loads((old / "llm2clip_model.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "foreign", "model"]


def _records(folder: Path, n: int = 3):
    from PIL import Image

    from llm2clip.data.images import Caption, Record

    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
        recs.append(Record(str(folder / f"{i}.png"), {"short": [Caption(f"c{i}", f"caption {i}")]}))
    return recs


def test_shards_overwrite_replaces_only_what_llm2clip_wrote(tmp_path, monkeypatch):
    from llm2clip.data.shards import write_shards

    recs = _records(tmp_path / "images")
    write_shards(recs, tmp_path / "shards", per_shard=2, progress=False)
    with pytest.raises(InputError, match="not empty .*--overwrite"):
        write_shards(recs, tmp_path / "shards", per_shard=2, progress=False)
    out = write_shards(recs, tmp_path / "shards", per_shard=3, overwrite=True, progress=False)
    assert [s["url"] for s in out["shards"]] == ["train-000000.tar"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shards.json", "train-000000.tar"]
    with pytest.raises(InputError, match="not written by llm2clip"):
        write_shards(recs, tmp_path / "images", overwrite=True, progress=False)
    monkeypatch.chdir(tmp_path / "shards")
    with pytest.raises(InputError, match="working folder"):
        write_shards(recs, ".", overwrite=True, progress=False)
    assert len(list((tmp_path / "images").iterdir())) == 3 and (tmp_path / "shards" / "shards.json").is_file()
