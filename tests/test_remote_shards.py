"""Webdataset shards read from URLs (fsspec, pipe:): the same batches as local shards, exact resume, and
a connection dropped mid-shard retried a bounded number of times, then the shard skipped and counted."""

import functools
import gc
import http.server
import logging
import threading

import fsspec
import numpy as np
import pytest
import torch
from stage2_helpers import CrashAt, SimulatedCrash, assert_same_tensors, model_weights, run_cfg, write_scene_manifest

from llm2clip.data.images import InMemoryFeatures, load_manifest
from llm2clip.data.shards import ShardFetcher, ShardStream, expand_shards, load_shard_records, write_shards
from llm2clip.train.loop import fit

NAMES = [f"train-{i:06d}.tar" for i in range(4)]
PATTERN = "train-{000000..000003}.tar"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; GETs of ``broken`` send the full Content-Length, then close after ``cut`` bytes."""

    broken: str | None = None
    cut = 3000
    gets: list[str] = []

    def log_message(self, *args):  # quiet test output
        pass

    def do_GET(self):
        self.gets.append(self.path)
        if self.broken is None or not self.path.endswith(self.broken):
            return super().do_GET()
        with open(self.translate_path(self.path), "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: self.cut])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve():
    pytest.importorskip("aiohttp")  # fsspec's http transport
    servers = []

    def start(folder, broken=None):
        handler = type("H", (_Handler,), {"broken": broken, "gets": []})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def shards(tmp_path):
    manifest = write_scene_manifest(tmp_path / "images", 16)
    records = load_manifest(manifest)
    write_shards(records, tmp_path / "shards", per_shard=4, progress=False)
    vecs = {c.id: np.array([i, 0], np.float32) for i, r in enumerate(records) for cs in r.captions.values() for c in cs}
    return tmp_path / "shards", InMemoryFeatures(vecs)  # a batch's texts name its records


def _stream(spec, feats, start=None, n=6, rank=0, world=1, **kw):
    s = ShardStream(expand_shards(spec), 4, world, rank, 0, lambda im: torch.zeros(1), {"dense": 1.0}, feats,
                    shuffle_shards=2, start=start, num_batches=n, **kw)
    return [([int(v) for v in b[1][:, 0]], b[2], b[3]) for b in s]


def test_http_memory_pipe_and_file_urls_give_the_local_batches_and_resume(shards, serve, tmp_path):
    folder, feats = shards
    url, handler = serve(folder)
    mem = "memory://llm2clip-test-shards"
    for n in NAMES:
        with fsspec.open(f"{mem}/{n}", "wb") as f:
            f.write((folder / n).read_bytes())
    local = _stream(str(folder / PATTERN), feats)
    assert sorted(sum((b[0] for b in local[:4]), [])) == list(range(16))  # one epoch: every sample once
    for spec in (f"{url}/{PATTERN}", [f"{mem}/{n}" for n in NAMES], [f"pipe:cat {folder / n}" for n in NAMES],
                 f"file://{folder}/{PATTERN}"):
        assert _stream(spec, feats) == local, spec
        # resumed at a saved position (mid-group, mid-epoch): the rest of the uninterrupted stream
        assert _stream(spec, feats, start=local[2][2], n=3) == local[3:], spec
    assert sorted(set(handler.gets)) == [f"/{n}" for n in NAMES]  # each shard fetched, no other request
    # two ranks of the remote list split the shards as two ranks of the local ones do
    for rank in (0, 1):
        assert _stream(f"{url}/{PATTERN}", feats, rank=rank, world=2) == _stream(str(folder), feats, rank=rank,
                                                                                 world=2)
    # validation sets read every record up front: the same records from a URL
    a, load_a = load_shard_records(expand_shards(str(folder)))
    b, load_b = load_shard_records(expand_shards(f"{url}/{PATTERN}"))
    assert [r.captions for r in a] == [r.captions for r in b]
    assert np.array_equal(np.asarray(load_a(5)), np.asarray(load_b(5)))
    # the spool goes with its fetcher
    fetcher = ShardFetcher(tmp_path / "spool")
    assert fetcher.local(f"{url}/{NAMES[0]}").read_bytes() == (folder / NAMES[0]).read_bytes()
    del fetcher, load_b
    gc.collect()
    assert not any((tmp_path / "spool").iterdir())


def test_a_dropped_connection_is_retried_then_the_shard_skipped_and_counted(shards, serve, caplog):
    folder, feats = shards
    url, handler = serve(folder, broken=NAMES[1])
    with caplog.at_level(logging.WARNING, logger="llm2clip.data.shards"):
        got = _stream(f"{url}/{PATTERN}", feats, n=4)
    assert handler.gets.count(f"/{NAMES[1]}") == 4  # 1 try + 3 retries, then given up (no hang, no crash)
    seen = sorted(sum((b[0] for b in got[:3]), []))
    assert seen == sorted(set(range(16)) - {4, 5, 6, 7})  # the first epoch holds the 12 samples of 3 shards
    counts = [b[2].get("skipped_shards", 0) for b in got]  # from the batch that met the shard on
    assert counts[-1] == 1 and counts == sorted(counts)  # counted once, though each epoch meets it
    assert any("skipped after 4 failed tries" in r.getMessage() and NAMES[1] in r.getMessage() for r in caplog.records)
    assert got[-1][2]["failed_shards"] == [1]
    # a resumed run (a new spool: the shard is tried again) carries the count on, and the same shard failing
    # again is still one shard
    resumed = _stream(f"{url}/{PATTERN}", feats, start=got[-1][2], n=3)
    assert handler.gets.count(f"/{NAMES[1]}") == 8 and resumed[-1][2]["skipped_shards"] == 1
    # a count saved without indices (an earlier version) is carried on
    old = {k: v for k, v in got[-1][2].items() if k != "failed_shards"}
    assert _stream(f"{url}/{PATTERN}", feats, start=old, n=3)[-1][2]["skipped_shards"] == 2
    # a missing shard (404) is not retried: skipped and counted at once
    got = _stream([f"{url}/{n}" for n in (NAMES[0], "missing.tar", NAMES[2])], feats, n=3)  # past an epoch
    assert handler.gets.count("/missing.tar") == 1 and got[-1][2]["skipped_shards"] == 1


def test_a_remote_run_equals_the_local_one_and_resumes_exactly(shards, serve, tmp_path):
    folder, _ = shards
    url, _ = serve(folder)
    over = dict(data__val=None, data__augment="crop", train__steps=6, train__checkpoint_every=3)
    local = {"kind": "webdataset", "shards": str(folder), "shuffle_shards": 2}
    remote = {**local, "shards": f"{url}/{PATTERN}", "retries": 1, "timeout": 10}
    fit(run_cfg(tmp_path / "local", data__train=local, **over), progress=False)
    with pytest.raises(SimulatedCrash):
        fit(run_cfg(tmp_path / "remote", data__train=remote, **over), progress=False, callbacks=[CrashAt(5)])
    fit(run_cfg(tmp_path / "remote", data__train=remote, data__workers=2, **over), resume=True, progress=False)
    assert_same_tensors(model_weights(tmp_path / "local"), model_weights(tmp_path / "remote"))
    st = {run: torch.load(tmp_path / run / "checkpoints/step_00000006/train_state.pt", weights_only=True)
          for run in ("local", "remote")}
    assert st["local"]["data"]["positions"] == st["remote"]["data"]["positions"]
    assert run_cfg(tmp_path / "x", data__train=remote).data.train.shards == remote["shards"]  # not made a path


def test_config_paths_leave_urls_and_commands_as_written(tmp_path):
    from llm2clip.train.config import WebDatasetSource

    src = WebDatasetSource(shards="https://h/a-{0..1}.tar::local/b.tar")
    src.resolve_paths(tmp_path)
    assert src.shards == f"https://h/a-{{0..1}}.tar::{tmp_path / 'local/b.tar'}"
    urls = ["s3://bucket/c.tar", "pipe:curl -s http://h/d.tar", "file:///data/e.tar"]
    src = WebDatasetSource(shards=[*urls, "f.tar"])
    src.resolve_paths(tmp_path)
    assert src.shards == [*urls, str(tmp_path / "f.tar")]


def test_a_missing_package_or_a_bug_is_an_error_not_a_skipped_shard(monkeypatch, tmp_path):
    """Only transport failures are retried and skipped: a missing extra is said once, naming it, and an error of
    another kind (a bad storage option) propagates instead of quietly dropping every remote shard."""
    import sys
    from types import SimpleNamespace

    from llm2clip.data.shards import source_fetcher
    from llm2clip.extras import MissingExtraError

    src = SimpleNamespace(retries=2, storage_options={}, timeout=5.0)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "aiohttp", None)  # as if not installed
        with pytest.raises(MissingExtraError, match=r"llm2clip\[remote\]"):
            source_fetcher(src, ["https://example.invalid/a.tar"])
    fetcher = ShardFetcher(folder=tmp_path, retries=2)
    calls = []

    def bug(url, out):  # e.g. a storage option of the wrong type, deep in fsspec
        calls.append(url)
        raise TypeError("unexpected keyword argument")

    monkeypatch.setattr(fetcher, "_copy", bug)
    with pytest.raises(TypeError):
        fetcher.local("memory://bad/a.tar")
    assert calls == ["memory://bad/a.tar"] and fetcher.failed() == 0  # not retried, not skipped
