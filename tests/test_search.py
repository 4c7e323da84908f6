"""Image search (llm2clip index / search): skipping and listing unreadable files, resuming a killed run, the
model check, and real retrieval behaviour (an image finds itself; text scores equal the model's similarity)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from stage2_helpers import another_model, tiny_run_config
from stage2_helpers import search_cli as _cli

import llm2clip
from llm2clip.config import parse_config
from llm2clip.data.scenes import SceneSet
from llm2clip.errors import ConfigError, InputError
from llm2clip.fileio import JOB_RECORD
from llm2clip.search import ImageIndex, build_index, search_index
from llm2clip.search.index import CHUNK_DIR, IndexInterrupted, find_images
from llm2clip.train.config import RunConfig
from llm2clip.train.loop import fit

N_SCENES = 30




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("search-model") / "run"
    fit(parse_config(tiny_run_config(run, train__steps=3, data__val=None), RunConfig), progress=False)
    return run / "model"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """30 generated scenes as PNGs in nested folders, a corrupt PNG, a truncated JPEG, and files to ignore."""
    root = tmp_path_factory.mktemp("images")
    scenes = SceneSet(N_SCENES, seed=7, render_size=32)
    for i in range(N_SCENES):
        sub = root / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        scenes.image(i).save(sub / f"scene{i:02d}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    scenes.image(0).save(root / "cut.jpg")
    data = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated mid-stream
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored: hidden")
    return root


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, model_dir, images):
    out = tmp_path_factory.mktemp("idx") / "flat"
    build_index(images, model_dir, out, chunk_size=8, batch_size=5, progress=False)
    return out


def test_index_command_skips_and_lists_unreadable_files(tmp_path, model_dir, images, capsys):
    out = tmp_path / "index"
    assert _cli("index", images, "--model", model_dir, "--out", out, "--chunk-size", "8", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert f"indexed: {N_SCENES} images" in printed
    assert "skipped 2 unreadable file(s)" in printed and "a/broken.png:" in printed and "cut.jpg:" in printed
    skipped = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    assert set(skipped) == {"a/broken.png", "cut.jpg"}
    files = (out / "files.txt").read_text().splitlines()
    assert len(files) == N_SCENES and files == sorted(files) and "b/c/scene01.png" in files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == N_SCENES and manifest["skipped"] == 2 and manifest["index"]["kind"] == "flat"
    assert manifest["model"]["path"] == str(model_dir.resolve()) and len(manifest["model"]["weights_sha256"]) == 64
    assert not (out / CHUNK_DIR).exists() and not (out / JOB_RECORD).exists()
    # a rerun of a finished index does nothing; another index kind in the same folder is refused
    assert _cli("index", images, "--model", model_dir, "--out", out, "--chunk-size", "8", "--no-progress") == 0
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already holds a finished index"):
        build_index(images, model_dir, out, hnsw=True, progress=False)


def test_image_query_finds_that_image_first(flat_index, images, model_dir, capsys):
    idx = ImageIndex.open(flat_index)
    for rel in ("a/scene00.png", "b/c/scene13.png", "scene29.png"):
        hits = search_index(idx, image=images / rel, k=3)
        assert hits[0].file == rel and hits[0].path == str(images.resolve() / rel)
        assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[1].score < hits[0].score
    assert _cli("search", flat_index, "--image", images / "b/c/scene04.png", "-k", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "file"] and lines[1].split()[2].endswith("b/c/scene04.png")


def test_text_query_scores_equal_the_model_similarity(flat_index, images, model_dir, capsys):
    query = "This image shows three shapes on a plain navy background. In the top left there is a small red circle."
    hits = search_index(flat_index, query, k=N_SCENES)
    lm = llm2clip.load(model_dir)
    files = [h.file for h in hits]
    sim = lm.similarity(lm.encode_image([images / f for f in files]), lm.encode_text([query]))[:, 0]
    assert np.allclose([h.score for h in hits], sim.numpy(), atol=1e-5)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    readable = set(find_images(images)[0]) - {"a/broken.png", "cut.jpg"}
    assert sorted(files) == sorted(readable)  # every readable image, each once
    assert _cli("search", flat_index, query, "-k", "3", "--json") == 0
    top = json.loads(capsys.readouterr().out)
    assert [h["file"] for h in top] == files[:3] and top[0]["score"] == pytest.approx(hits[0].score, abs=1e-6)
    rows = ImageIndex.open(flat_index).files
    assert all(rows[h["row"]] == h["file"] for h in top)  # the row numbers `llm2clip serve` uses


def test_killed_run_resumes_from_its_chunks(tmp_path, model_dir, images, flat_index):
    out = tmp_path / "index"
    with pytest.raises(IndexInterrupted):
        build_index(images, model_dir, out, chunk_size=8, progress=False, stop_after_chunks=2)
    chunks = sorted(p.name for p in (out / CHUNK_DIR).iterdir())
    assert chunks == ["chunk-00000.npz", "chunk-00001.npz"]
    (out / CHUNK_DIR / ".chunk-00002.npz.tmp-999").write_bytes(b"half a chunk")  # a write cut by the kill
    with pytest.raises(ConfigError, match="another chunk_size"):
        build_index(images, model_dir, out, chunk_size=4, progress=False)
    res = build_index(images, model_dir, out, chunk_size=8, batch_size=3, progress=False)
    total = N_SCENES + 2
    assert res.embedded_now == total - 16 and res.count == N_SCENES and len(res.skipped) == 2
    a, b = ImageIndex.open(out), ImageIndex.open(flat_index)
    assert a.files == b.files
    assert np.allclose(a.index.reconstruct_n(0, N_SCENES), b.index.reconstruct_n(0, N_SCENES), atol=1e-6)


KILL_SCRIPT = """
import sys, time
from llm2clip.api import LoadedModel
from llm2clip.search import build_index
slow = LoadedModel.embed_pixels
def embed(self, x, normalize=True):  # slow enough to be killed mid-run
    time.sleep(0.3)
    return slow(self, x, normalize)
LoadedModel.embed_pixels = embed
build_index(sys.argv[1], sys.argv[2], sys.argv[3], chunk_size=4, batch_size=2, progress=False)
"""


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_index(tmp_path, model_dir, images, flat_index):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "index"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(images), str(model_dir), str(out)], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / CHUNK_DIR).glob("chunk-*.npz"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list((out / CHUNK_DIR).glob("chunk-*.npz")))
    assert 2 <= done < 8 and not (out / "manifest.json").exists()
    res = build_index(images, model_dir, out, chunk_size=4, progress=False)
    assert res.embedded_now == N_SCENES + 2 - 4 * done
    a, b = ImageIndex.open(out), ImageIndex.open(flat_index)
    assert a.files == b.files and len(res.skipped) == 2
    assert np.allclose(a.index.reconstruct_n(0, N_SCENES), b.index.reconstruct_n(0, N_SCENES), atol=1e-6)


def test_hnsw_index(tmp_path, model_dir, images):
    out = tmp_path / "hnsw"
    assert _cli("index", images, "--model", model_dir, "--out", out, "--hnsw", "--hnsw-m", "8", "--workers", "2",
                "--no-progress") == 0  # decoding in worker processes too
    idx = ImageIndex.open(out)
    assert idx.manifest["index"] == {"kind": "hnsw", "metric": "inner_product", "M": 8, "ef_construction": 80,
                                     "ef_search": 64}
    assert type(idx.index).__name__ == "IndexHNSWFlat"
    for rel in ("a/scene03.png", "scene05.png"):
        assert search_index(idx, image=images / rel, k=5, ef_search=16)[0].file == rel
    extra = tmp_path / "extra"  # `index add` keeps the index kind and its settings
    extra.mkdir()
    SceneSet(1, seed=123, render_size=32).image(0).save(extra / "new.png")
    assert _cli("index", "add", out, extra, "--no-progress") == 0
    grown = ImageIndex.open(out)
    assert type(grown.index).__name__ == "IndexHNSWFlat" and grown.manifest["index"] == idx.manifest["index"]
    assert len(grown) == N_SCENES + 1 and grown.version == 2
    assert search_index(grown, image=extra / "new.png", k=3)[0].path == str((extra / "new.png").resolve())


def test_precision_option_and_its_old_name(flat_index, images, model_dir, capsys):
    """search loads the index's model through llm2clip.load: --precision (or the old --dtype) casts the weights."""
    want = search_index(flat_index, image=images / "scene02.png", k=3, device="cpu")
    got = search_index(flat_index, image=images / "scene02.png", k=3, device="cpu", precision="bf16")
    assert [h.file for h in got][:1] == [h.file for h in want][:1] == ["scene02.png"]
    assert got[0].score == pytest.approx(want[0].score, abs=2e-2)
    for flag in ("--precision", "--dtype"):
        assert _cli("search", flat_index, "--image", images / "scene02.png", "-k", "1", flag, "bfloat16") == 0
        assert capsys.readouterr().out.splitlines()[1].split()[2].endswith("scene02.png")
    with pytest.warns(DeprecationWarning, match="use precision="):
        search_index(flat_index, "a red circle", k=1, device="cpu", dtype="bfloat16")


def test_another_model_is_refused(tmp_path, model_dir, flat_index, images):
    other = another_model(model_dir, tmp_path / "other")
    with pytest.raises(ConfigError, match="built with another model.*weights_sha256"):
        search_index(flat_index, "a red circle", model=other)
    out = tmp_path / "partial"  # resuming a build with it is refused too
    with pytest.raises(IndexInterrupted):
        build_index(images, model_dir, out, chunk_size=8, progress=False, stop_after_chunks=1)
    with pytest.raises(ConfigError, match="started with another model"):
        build_index(images, other, out, chunk_size=8, progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)  # the same model in another folder is fine
    assert search_index(flat_index, image=images / "scene02.png", model=moved, k=1)[0].file == "scene02.png"


def test_input_errors(tmp_path, model_dir, flat_index, images):
    with pytest.raises(InputError, match="image folder not found"):
        build_index(tmp_path / "nope", model_dir, tmp_path / "i1", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        build_index(tmp_path / "empty", model_dir, tmp_path / "i2", progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="none of the 1 image file"):
        build_index(bad, model_dir, tmp_path / "i3", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        build_index(images, model_dir, tmp_path / "full", progress=False)
    with pytest.raises(InputError, match="not an image index"):
        ImageIndex.open(tmp_path)
    with pytest.raises(InputError, match="one of them"):
        search_index(flat_index, "q", image=images / "scene02.png")
    with pytest.raises(InputError, match="exactly one"):
        _cli("search", flat_index)
    with pytest.raises(InputError, match="k must be"):
        search_index(flat_index, "a red circle", k=0)
    with pytest.raises(InputError, match="nothing.png: image file not found"):
        search_index(flat_index, image=tmp_path / "nothing.png")
    with pytest.raises(ConfigError, match="HNSW indexes only"):
        search_index(flat_index, "a red circle", ef_search=10)


def test_scikit_image_sample_photos(tmp_path, model_dir):
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed in this environment")
    from PIL import Image

    root = tmp_path / "photos"
    root.mkdir()
    saved = []
    for name in ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "text"):
        try:
            arr = getattr(data, name)()  # shipped with the package (others are fetched: no network here)
        except Exception:
            continue
        Image.fromarray(arr).save(root / f"{name}.png")  # grayscale ones too: the loader makes RGB
        saved.append(name)
    assert {"chelsea", "rocket"} <= set(saved) and len(saved) >= 4
    build_index(root, model_dir, tmp_path / "index", progress=False)
    for name in ("chelsea", "rocket"):
        assert search_index(tmp_path / "index", image=root / f"{name}.png", k=3)[0].file == f"{name}.png"
