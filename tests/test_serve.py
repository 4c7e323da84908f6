"""llm2clip serve: every endpoint in-process (FastAPI's TestClient), every kind of bad input a 4xx, text
micro-batching (fewer forwards, the same vectors), `index add` and the running server's hot reload.

The model is a tiny stage-2 run whose caption encoder is the tiny random LLM with a short max_length, so
long queries really are truncated."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from stage2_helpers import another_model, tiny_run_config
from stage2_helpers import search_cli as _cli

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("multipart", reason="the serve extra (python-multipart) is not installed")
pytest.importorskip("httpx", reason="httpx (the dev extra) is not installed")
import httpx
from fastapi.testclient import TestClient

import llm2clip
from llm2clip.config import parse_config
from llm2clip.data.scenes import SceneSet
from llm2clip.errors import ConfigError
from llm2clip.fileio import building_dir
from llm2clip.search import ImageIndex, add_to_index, build_index, search_index
from llm2clip.serve import ServeSettings, create_app
from llm2clip.train.config import RunConfig
from llm2clip.train.loop import fit

N = 12
MAX_LENGTH = 48
SHORT = "a small red circle in the top left corner on a plain navy background"
LONG = " ".join(["a large blue square and a small red circle on a plain grey background"] * 12)




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llm_dir) -> Path:
    run = tmp_path_factory.mktemp("serve-model") / "run"
    enc = {"kind": "llm", "model": str(tiny_llm_dir), "max_length": MAX_LENGTH, "batch_size": 8}
    cfg = tiny_run_config(run, train__steps=2, data__val=None, data__features={"encoder": enc})
    fit(parse_config(cfg, RunConfig), progress=False)
    return run / "model"


def _scenes(root: Path, lo: int, hi: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    scenes = SceneSet(hi, seed=11, render_size=32)
    for i in range(lo, hi):
        scenes.image(i).save(root / f"scene{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _scenes(tmp_path_factory.mktemp("serve-images") / "photos", 0, N)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, model_dir, images) -> Path:
    out = tmp_path_factory.mktemp("serve-index") / "photos.index"
    build_index(images, model_dir, out, progress=False)
    return out


@pytest.fixture(scope="module")
def lm(model_dir):
    return llm2clip.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def client(lm, index_dir):
    with TestClient(create_app(lm, index_dir, ServeSettings(batch_wait_ms=1, max_body_bytes=1 << 20))) as c:
        yield c


def _png(path: Path) -> bytes:
    return path.read_bytes()


def test_health_page_and_openapi(client, index_dir, model_dir):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["images"] == N and h["index_version"] == 1
    assert h["model"] == str(model_dir.resolve())
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/embed/text", "/v1/embed/image", "/health", "/v1/thumb/{row}"} <= set(spec["paths"])
    body = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert body["application/json"]["schema"]["additionalProperties"] is False
    assert client.get("/docs").status_code == 200


def test_text_search_equals_search_index_and_reports_truncation(client, index_dir, lm, capsys):
    for query, cut in ((SHORT, False), (LONG, True)):
        r = client.post("/v1/search", json={"text": query, "k": 5})
        assert r.status_code == 200, r.text
        got = r.json()
        want = search_index(index_dir, query, k=5, model=lm)
        assert got["query"] == "text" and got["truncated"] is cut and got["images"] == N
        assert [h["file"] for h in got["hits"]] == [h.file for h in want]
        assert np.allclose([h["score"] for h in got["hits"]], [h.score for h in want], atol=1e-5)
        assert [h["rank"] for h in got["hits"]] == [1, 2, 3, 4, 5] and got["latency_ms"] > 0
    # the command line says so too
    assert _cli("search", index_dir, LONG, "-k", "2") == 0
    assert "longer than the caption encoder's max_length (48 tokens)" in capsys.readouterr().err
    assert _cli("search", index_dir, SHORT, "-k", "2") == 0
    assert "max_length" not in capsys.readouterr().err


def test_image_upload_row_and_embeddings(client, images, lm):
    for name in ("scene03.png", "scene10.png"):
        r = client.post("/v1/search", files={"image": (name, _png(images / name), "image/png")}, data={"k": "3"})
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert r.json()["query"] == "image" and len(hits) == 3
        assert hits[0]["file"] == name and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        by_row = client.post("/v1/search", json={"row": hits[0]["row"], "k": 3}).json()  # a clicked result
        assert by_row["query"] == "row" and [h["file"] for h in by_row["hits"]] == [h["file"] for h in hits]
    r = client.post("/v1/embed/image", files={"image": ("x.png", _png(images / "scene05.png"), "image/png")})
    assert r.status_code == 200 and r.json()["dim"] == lm.embed_dim
    assert np.allclose(r.json()["embedding"], lm.encode_image([images / "scene05.png"])[0].numpy(), atol=1e-5)
    r = client.post("/v1/embed/text", json={"texts": [SHORT, LONG]})
    assert r.status_code == 200 and r.json()["truncated"] == [False, True]
    assert np.allclose(r.json()["embeddings"], lm.encode_text([SHORT, LONG]).numpy(), atol=1e-5)


def test_thumbnails_only_for_indexed_rows(client):
    from PIL import Image

    hit = client.post("/v1/search", json={"text": SHORT, "k": 1}).json()["hits"][0]
    r = client.get(f"/v1/thumb/{hit['row']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)  # never enlarged
    assert client.get("/v1/thumb/0?size=16").status_code == 200
    for bad, code in (("999", 404), ("-1", 422), ("..%2F..%2Fetc%2Fpasswd", 404), ("passwd", 422),
                      ("0?size=5000", 422)):
        r = client.get(f"/v1/thumb/{bad}")
        assert r.status_code == code and r.json()["detail"], bad


def test_thumbnails_are_decoded_a_few_at_a_time(client, monkeypatch):
    """A page of results asks for many thumbnails at once; each decodes a full original, so at most
    THUMB_DECODES run together (memory stays bounded), and all of them are served."""
    import concurrent.futures
    import threading
    import time

    from llm2clip.serve import app as app_mod

    real, lock, now, most = app_mod.SearchService._thumbnail, threading.Lock(), [0], [0]

    def slow(path, row, size):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        try:
            return real(path, row, size)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(app_mod.SearchService, "_thumbnail", staticmethod(slow))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda r: client.get(f"/v1/thumb/{r % 4}?size={16 + r}").status_code, range(24)))
    assert codes == [200] * 24 and 1 <= most[0] <= app_mod.THUMB_DECODES < 16  # (unbounded, 16 ran at once)


def _header_only_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels: a decompression bomb's shape, without its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _bad_requests(images: Path):
    png = _png(images / "scene01.png")
    img = lambda data, name="q.png": {"files": {"image": (name, data, "image/png")}}
    return [
        ("empty text", "/v1/search", {"json": {"text": ""}}, 422),
        ("blank text", "/v1/search", {"json": {"text": "   \n "}}, 422),
        ("oversized text", "/v1/search", {"json": {"text": "word " * 5000}}, 422),
        ("unknown field", "/v1/search", {"json": {"text": SHORT, "limit": 3}}, 422),
        ("text and row", "/v1/search", {"json": {"text": SHORT, "row": 1}}, 422),
        ("neither", "/v1/search", {"json": {"k": 3}}, 422),
        ("k zero", "/v1/search", {"json": {"text": SHORT, "k": 0}}, 422),
        ("k huge", "/v1/search", {"json": {"text": SHORT, "k": 10**9}}, 422),
        ("text not a string", "/v1/search", {"json": {"text": ["a"]}}, 422),
        ("row out of range", "/v1/search", {"json": {"row": 10**6}}, 404),
        ("not JSON", "/v1/search", {"content": b"{text:", "headers": {"content-type": "application/json"}}, 400),
        ("JSON list", "/v1/search", {"json": ["a"]}, 422),
        ("plain text body", "/v1/search", {"content": b"a cat", "headers": {"content-type": "text/plain"}}, 415),
        ("not an image", "/v1/search", img(b"this is not an image at all", "notes.png"), 400),
        ("empty upload", "/v1/search", img(b""), 400),
        ("truncated image", "/v1/search", img(png[: len(png) // 2]), 400),
        ("pixel bomb", "/v1/search", img(_header_only_png(50_000, 50_000)), 413),
        ("PIL's own bomb limit", "/v1/search", img(_header_only_png(200_000, 200_000)), 413),
        ("unknown form field", "/v1/search", {**img(png), "data": {"user": "x"}}, 422),
        ("form k not a number", "/v1/search", {**img(png), "data": {"k": "ten"}}, 422),
        ("form text instead of a file", "/v1/search", {"data": {"image": "cat"}}, 422),
        ("oversized body", "/v1/search", {"content": b"x" * (2 << 20), "headers": {"content-type": "text/plain"}}, 413),
        ("oversized upload", "/v1/embed/image", img(b"\x89PNG" + b"\0" * (2 << 20)), 413),
        ("oversized streamed body", "/v1/search", {"content": iter([b"x" * (1 << 19)] * 4),
                                                   "headers": {"content-type": "application/json"}}, 413),
        ("embed: no texts", "/v1/embed/text", {"json": {"texts": []}}, 422),
        ("embed: blank text", "/v1/embed/text", {"json": {"texts": ["ok", " "]}}, 422),
        ("embed: too many texts", "/v1/embed/text", {"json": {"texts": ["a cat"] * 65}}, 422),
        ("embed: oversized text", "/v1/embed/text", {"json": {"texts": ["w" * 20_001]}}, 422),
        ("embed: unknown field", "/v1/embed/text", {"json": {"texts": ["a"], "normalize": False}}, 422),
        ("embed image: not an image", "/v1/embed/image", img(b"GIF89a nonsense"), 400),
        ("embed image: no file", "/v1/embed/image", {"data": {"x": "1"}}, 422),
        ("lone surrogate", "/v1/search", {"content": b'{"text": "a \\ud800 cat"}',
                                          "headers": {"content-type": "application/json"}}, 422),
        ("embed: lone surrogate", "/v1/embed/text", {"content": b'{"texts": ["ok", "a \\ud800 cat"]}',
                                                     "headers": {"content-type": "application/json"}}, 422),
        ("an EPS upload (Pillow would run Ghostscript)", "/v1/search",
         img(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "q.eps"), 400),
    ]


def test_bad_input_is_a_4xx_with_a_message_and_the_server_lives_on(client, images):
    for name, path, kwargs, code in _bad_requests(images):
        r = client.post(path, **kwargs)
        assert r.status_code == code, (name, r.status_code, r.text[:300])
        assert r.json()["detail"], name
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/search", json={"text": SHORT}).status_code == 200


def test_an_index_of_another_model_is_refused_at_start(tmp_path, model_dir, index_dir):
    other = another_model(model_dir, tmp_path / "other")
    with pytest.raises(ConfigError, match=r"built with another model: .*model \(weights sha256 [0-9a-f]{12}\); "
                                          r".*other \(weights sha256 [0-9a-f]{12}\) differs in weights_sha256"):
        create_app(llm2clip.load(other, device="cpu"), index_dir)


async def _concurrent(app, texts: list[str]) -> list[dict]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
        rs = await asyncio.gather(*[c.post("/v1/search", json={"text": t, "k": 4}) for t in texts])
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    return [r.json() for r in rs]


def _count_forwards(lm):
    enc = lm.caption_encoder
    calls = []
    plain = enc.forward

    def counted(batch):
        calls.append(batch.input_ids.shape[0])
        return plain(batch)

    enc.forward = counted
    return calls


def test_concurrent_text_queries_share_forwards_and_give_single_query_results(lm, index_dir):
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
    texts = [f"a small {c} circle in the top left corner" + " on a grey background" * i for i, c in enumerate(colours)]
    assert len({len(t.ids) for t in lm.caption_encoder.tokenize(texts)}) == len(texts)  # padding needed
    calls = _count_forwards(lm)
    try:
        single = create_app(lm, index_dir, ServeSettings(max_batch=1, batch_wait_ms=0))
        alone = asyncio.run(_concurrent(single, texts))
        assert calls == [1] * len(texts)  # batching off: one forward per query
        assert single.state.service.stats["text_batches"] == len(texts)
        calls.clear()
        batched = create_app(lm, index_dir, ServeSettings(max_batch=32, batch_wait_ms=50))
        together = asyncio.run(_concurrent(batched, texts))
        assert len(calls) < len(texts) and sum(calls) == len(texts), calls
        assert batched.state.service.stats["text_queries"] == len(texts)
        calls.clear()  # the encoder's exact-length batching: one forward per token count
        exact = create_app(lm, index_dir, ServeSettings(max_batch=32, batch_wait_ms=50, text_batching="exact"))
        assert asyncio.run(_concurrent(exact, texts[:1] * 3 + texts[1:2] * 2)) and sorted(calls) == [2, 3]
    finally:
        del lm.caption_encoder.forward
        create_app(lm, index_dir)  # back to the default batching for the other tests
    for a, b in zip(alone, together):
        assert [h["file"] for h in a["hits"]] == [h["file"] for h in b["hits"]]
        assert np.allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-5)


@pytest.mark.parametrize("error", ["InputError", "TypeError"])
def test_a_bad_text_in_a_batch_fails_alone(lm, index_dir, monkeypatch, error):
    from llm2clip.errors import InputError

    enc = lm.caption_encoder
    plain = type(enc).tokenize

    def tokenize(captions):  # stands for any text the encoder refuses: ours, or a tokenizer's own error
        if any("POISON" in c for c in captions):
            raise InputError("caption 0: encodes to zero tokens") if error == "InputError" else TypeError("bad")
        return plain(enc, captions)

    monkeypatch.setattr(enc, "tokenize", tokenize)
    app = create_app(lm, index_dir, ServeSettings(max_batch=32, batch_wait_ms=50))

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 as a response
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            return await asyncio.gather(c.post("/v1/search", json={"text": SHORT}),
                                        c.post("/v1/search", json={"text": "POISON"}),
                                        c.post("/v1/search", json={"text": LONG}))

    ok1, bad, ok2 = asyncio.run(go())
    assert ok1.status_code == ok2.status_code == 200 and ok2.json()["truncated"]
    assert bad.status_code >= 400  # a 4xx for a text we refuse; an unexpected error stays with its own request
    if error == "InputError":
        assert bad.status_code < 500 and bad.json()["detail"]


def test_index_add_and_hot_reload(tmp_path, model_dir, lm):
    root = _scenes(tmp_path / "photos", 0, 6)
    out = tmp_path / "photos.index"
    build_index(root, model_dir, out, progress=False)
    before = ImageIndex.open(out)
    with TestClient(create_app(lm, out, ServeSettings(batch_wait_ms=0))) as c:
        assert c.get("/health").json()["images"] == 6
        _scenes(root / "new", 6, 9)  # inside the image folder: recorded relative to it
        outside = _scenes(tmp_path / "elsewhere", 9, 11)
        (root / "new" / "bad.png").write_bytes(b"not a png")
        assert _cli("index", "add", out, root, "--no-progress") == 0
        r = c.post("/v1/search", files={"image": ("q.png", _png(root / "new" / "scene07.png"), "image/png")})
        got = r.json()
        assert got["images"] == 9 and got["index_version"] == 2 and got["hits"][0]["file"] == "new/scene07.png"
        res = add_to_index(out, outside, progress=False)
        assert (res.added, res.count, res.version) == (2, 11, 3)
        hit = c.post("/v1/search", files={"image": ("q.png", _png(outside / "scene10.png"), "image/png")}).json()
        assert hit["hits"][0]["file"] == str(outside.resolve() / "scene10.png") and hit["images"] == 11
        assert c.get(f"/v1/thumb/{hit['hits'][0]['row']}").status_code == 200
        assert c.get("/health").json()["reloads"] == 2
    after = ImageIndex.open(out)
    assert after.files[:6] == before.files  # old rows keep their numbers
    assert np.allclose(after.index.reconstruct_n(0, 6), before.index.reconstruct_n(0, 6), atol=1e-6)
    assert ("new/bad.png" in dict(after.skipped())) and after.manifest["skipped"] == 1
    assert add_to_index(out, root, progress=False).added == 0  # nothing new: no new version
    assert ImageIndex.open(out).version == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the build folder was swapped in, the old one removed


def test_readers_never_see_a_half_written_version(tmp_path, model_dir, lm):
    root = _scenes(tmp_path / "photos", 0, 4)
    out = tmp_path / "idx"
    build_index(root, model_dir, out, progress=False)
    app = create_app(lm, out, ServeSettings(batch_wait_ms=0))
    service = app.state.service
    seen, errors, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                idx = service.current()
                assert idx.index.ntotal == len(idx.files) == idx.manifest["count"]
                seen.add(len(idx))
            except Exception as err:
                errors.append(repr(err))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(4, 10, 2):
            add_to_index(out, _scenes(root / f"more{i}", i, i + 2), progress=False)
    finally:
        stop.set()
        reader.join()
    assert errors == [] and seen <= {4, 6, 8, 10} and len(service.current()) == 10
    # mid-swap, for a moment there is no manifest: the server keeps the version it has
    (out / "manifest.json").rename(tmp_path / "m.json")
    assert len(service.current()) == 10
    (tmp_path / "m.json").rename(out / "manifest.json")
    # a version built by another model is not switched to (and not read again on every query)
    with building_dir(out) as tmp:
        for f in out.iterdir():
            shutil.copy(f, tmp / f.name)
        mf = json.loads((tmp / "manifest.json").read_text())
        mf["model"]["weights_sha256"] = "0" * 64
        mf["version"] = 99
        (tmp / "manifest.json").write_text(json.dumps(mf))
    reloads = service.stats["reloads"]
    assert service.current().version == 4 and service.current().version == 4
    assert service.stats["reloads"] == reloads and service._refused_stamp is not None


def test_index_add_refuses_another_model_and_bad_usage(tmp_path, model_dir, index_dir, images):
    other = another_model(model_dir, tmp_path / "other")
    with pytest.raises(ConfigError, match="built with another model"):
        add_to_index(index_dir, images, other)
    from llm2clip.errors import InputError

    with pytest.raises(InputError, match="llm2clip index add INDEX DIR"):
        _cli("index", "add", index_dir)
    with pytest.raises(InputError, match="usage"):
        _cli("index", images)  # no --model / --out


def test_a_second_index_add_on_the_same_index_fails_at_once(index_dir, images, model_dir):
    import subprocess
    import sys

    from llm2clip.fileio import FolderInUseError

    holder = subprocess.Popen([sys.executable, "-c", "import time; from llm2clip.fileio import lock_folder; "
                               f"lock_folder({str(index_dir)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=f"PID {holder.pid}"):
            add_to_index(index_dir, images, model_dir)
    finally:
        holder.kill()
        holder.wait()
