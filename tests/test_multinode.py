"""Multi-node, rehearsed on one machine: two torchrun launchers (--nnodes 2 --nproc-per-node 1) meet at a
c10d rendezvous on 127.0.0.1 as two hosts of a cluster would, the rendezvous gives each its node rank, and
stage 1, embed and stage 2 each give what one process with the same global batch gives.

Every worker sees LOCAL_RANK 0, as on real nodes with one GPU each: code that took the local rank for the
global one would write twice or split the data wrong here, and these comparisons would fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from stage2_helpers import free_port, model_weights, tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red green blue yellow black white".split()
OBJECTS = "dog cat fish bird car bus".split()
DEADLINE_S = 420  # per two-node run: a hung rendezvous or collective fails the test instead of hanging it

pytestmark = pytest.mark.slow


def _env(first_on_path: Path | None = None) -> dict:
    # one thread everywhere, so the compared runs reduce in the same order
    path = [str(p) for p in (first_on_path, ROOT / "src", ROOT / "tests") if p is not None]
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(path))


# Imported by every worker whose PYTHONPATH starts with its folder: on node rank 1 the newest checkpoint is
# not listed yet, as a network filesystem's client shows a folder from its attribute cache for a while.
STALE_VIEW = """\
import os
if os.environ.get("GROUP_RANK") == "1":
    from llm2clip import checkpointing

    def latest_checkpoint(root):
        found = checkpointing.list_checkpoints(root)[:-1]
        return found[-1] if found else None

    checkpointing.latest_checkpoint = latest_checkpoint
"""


@pytest.fixture()
def stale_view(tmp_path) -> Path:
    d = tmp_path / "stale-view"
    d.mkdir()
    (d / "sitecustomize.py").write_text(STALE_VIEW)
    return d


def _descendants(pid: int) -> list[int]:
    """The launcher's workers (torchrun starts them in sessions of their own, so a group kill misses them)."""
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _stop(proc: subprocess.Popen) -> None:
    """End a launcher still running and every worker it started, by their ids."""
    if proc.poll() is not None:
        return
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def two_nodes(args: list[str], logs: Path, timeout: float = DEADLINE_S, launchers: int = 2,
              procs: list | None = None, first_on_path: Path | None = None) -> list[str]:
    """Run ``args`` (torchrun's script part) on two one-process 'nodes' joined by a c10d rendezvous on
    127.0.0.1; asserts both launchers succeed and returns their logs. Both are killed (workers included)
    on any way out. ``launchers=1`` leaves the second node out; ``procs`` receives the launchers;
    ``first_on_path`` goes first on the workers' PYTHONPATH (a sitecustomize there runs in each)."""
    port, rdzv_id = free_port(), f"multinode-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
           "--rdzv-conf", "join_timeout=120", "--max-restarts", "0", *args]
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [] if procs is None else procs, []
    try:
        for node in range(launchers):
            files.append(open(logs / f"launcher{node}.log", "w"))
            procs.append(subprocess.Popen(cmd, env=_env(first_on_path), stdout=files[-1], stderr=subprocess.STDOUT))
        end = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        for p in procs:
            _stop(p)
        for f in files:
            f.close()
    out = [(logs / f"launcher{n}.log").read_text() for n in range(launchers)]
    for p, text in zip(procs, out, strict=True):
        assert p.returncode == 0, text[-4000:]
    return out


def test_rendezvous_gives_each_launcher_its_node_rank(tmp_path):
    """The rehearsal's premise: two launchers, node ranks 0 and 1, one world of two, local rank 0 on each."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os, torch.distributed as d\nd.init_process_group('gloo')\n"
                     "print('ENV', os.environ['GROUP_RANK'], d.get_rank(), os.environ['LOCAL_RANK'],"
                     " d.get_world_size(), flush=True)\nd.barrier()\nd.destroy_process_group()\n")
    seen = sorted(line.split()[1:] for text in two_nodes([str(probe)], tmp_path / "logs", timeout=180)
                  for line in text.splitlines() if line.startswith("ENV"))
    assert seen == [["0", "0", "0", "2"], ["1", "1", "0", "2"]]


def test_a_node_that_never_joins_fails_in_time_and_is_stopped(tmp_path):
    """The guard of every test here: a rendezvous that never completes ends at the deadline, launcher killed."""
    probe = tmp_path / "probe.py"
    probe.write_text("raise SystemExit('the rendezvous should not have completed')\n")
    procs: list = []
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        two_nodes([str(probe)], tmp_path / "logs", timeout=10, launchers=1, procs=procs)
    assert time.monotonic() - t0 < 60
    assert len(procs) == 1 and procs[0].returncode is not None


# ------------------------------------------------------------------------------------------ stage 1
def _groups_file(path: Path) -> Path:
    with open(path, "w") as fh:
        for w in WORDS:
            for o in OBJECTS:
                fh.write(json.dumps({"group": f"{w}-{o}", "kinds": ["short", "short", "dense"],
                                     "captions": [f"a {w} {o}", f"the {o} is {w}",
                                                  f"one {w} {o} on the left of a tree"]}) + "\n")
    return path


def _lora(out: Path) -> dict:
    from llm2clip.checkpointing import latest_checkpoint

    return torch.load(latest_checkpoint(out / "checkpoints") / "train_state.pt", weights_only=True)["lora"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _kill_after_first_step_and_resume(args: list[str], run: Path, stale_view: Path, logs: Path) -> None:
    """Make ``run`` (2 steps, a checkpoint each) what a run killed after step 1 leaves, then resume it on two
    nodes whose node 1 does not list that checkpoint yet. Each rank choosing its own checkpoint, node 1
    would start over while node 0 resumed: a diverged or hung run. Every rank must resume rank 0's choice."""
    import shutil

    for p in ("checkpoints/step_00000002", "encoder", "adapter", "summary.json", "model"):
        p = run / p
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    two_nodes(args, logs, timeout=240, first_on_path=stale_view)


def test_stage1_on_two_nodes_equals_one_process(tiny_llm_dir, tmp_path, stale_view):
    from llm2clip.finetune.config import FinetuneConfig
    from llm2clip.finetune.trainer import Stage1Trainer

    groups = _groups_file(tmp_path / "groups.jsonl")

    def cfg(out: Path) -> dict:
        return dict(encoder={"model": str(tiny_llm_dir)}, out=str(out), save_every=1,
                    data={"cupl_train": False, "groups": [str(groups)]},
                    contrastive={"batch_size": 8, "chunk_size": 5}, lora={"dropout": 0.0},
                    optim={"steps": 2, "precision": "fp32", "warmup_steps": 1},
                    eval={"cupl_classes": 4, "per_class": 2})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    try:
        Stage1Trainer(FinetuneConfig(**cfg(tmp_path / "one")), progress=False).run()
    finally:
        torch.set_num_threads(threads)
    y = tmp_path / "two.yaml"
    y.write_text(yaml.safe_dump(cfg(tmp_path / "two")))
    two_nodes(["-m", "llm2clip", "finetune-text", str(y)], tmp_path / "logs")
    steps = [[r for r in _metrics(tmp_path / n) if "loss" in r] for n in ("one", "two")]
    assert len(steps[0]) == 2
    for a, b in zip(*steps, strict=True):  # the global batch's loss and gradient norm, step by step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    a, b = _lora(tmp_path / "one"), _lora(tmp_path / "two")
    assert a.keys() == b.keys()
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    print(f"stage 1 LoRA max |two nodes - one process| = {worst:.3g}")
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=1e-4)
    assert (tmp_path / "two" / "encoder").is_dir() and (tmp_path / "two" / "summary.json").is_file()

    _kill_after_first_step_and_resume(["-m", "llm2clip", "finetune-text", str(y)], tmp_path / "two", stale_view,
                                      tmp_path / "logs-resumed")
    b = _lora(tmp_path / "two")
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    print(f"stage 1 LoRA, resumed on two nodes, max |two nodes - one process| = {worst:.3g}")
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=1e-4)
    assert (tmp_path / "two" / "encoder").is_dir()


# -------------------------------------------------------------------------------------------- embed
def test_embed_on_two_nodes_writes_the_store_one_process_writes(tiny_llm_dir, tmp_path):
    from llm2clip.features import FeatureStore

    caps = [f"a {w} {o} near a {o2}" for w in WORDS for o in OBJECTS for o2 in OBJECTS[:2]]  # 72 unique
    with open(tmp_path / "caps.jsonl", "w") as fh:
        for i, c in enumerate(caps + caps[:9]):  # ids sharing a caption too
            fh.write(json.dumps({"id": f"c{i}", "caption": c}) + "\n")
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml.safe_dump({"encoder": {"kind": "llm", "model": str(tiny_llm_dir), "max_length": 64,
                                               "batch_size": 8},
                                   "captions": [str(tmp_path / "caps.jsonl")], "out": str(tmp_path / "one"),
                                   "shard_size": 15, "progress": False}))  # 5 shards: 3 on node 0, 2 on node 1
    cli = ["-m", "llm2clip.features.cli", "embed", str(cfg), "--no-progress"]
    one = subprocess.run([sys.executable, *cli], env=_env(), capture_output=True, text=True, timeout=DEADLINE_S)
    assert one.returncode == 0, one.stderr[-4000:]
    two_nodes([*cli, "--out", str(tmp_path / "two")], tmp_path / "logs")

    def files(d: Path) -> dict:
        return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}

    a, b = files(tmp_path / "one"), files(tmp_path / "two")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # byte-identical, manifest included
    store = FeatureStore.open(tmp_path / "two")
    store.verify()
    assert len(store.manifest["shards"]) == 5


# ------------------------------------------------------------------------------------------ stage 2
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_stage2_on_two_nodes_trains_like_one_process(tmp_path, strategy, stale_view):
    from llm2clip.config import parse_config
    from llm2clip.train.config import RunConfig
    from llm2clip.train.loop import fit

    over = dict(train__steps=2, train__eval_every=0, train__checkpoint_every=1, train__strategy=strategy,
                data__val=None)
    fit(parse_config(tiny_run_config(tmp_path / "one", **over), RunConfig), progress=False)
    y = tmp_path / "two.yaml"
    y.write_text(yaml.safe_dump(tiny_run_config(tmp_path / "two", **over)))
    cli = ["-m", "llm2clip", "train", str(y), "--no-progress"]
    two_nodes(cli, tmp_path / "logs")
    a, b = model_weights(tmp_path / "one"), model_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"stage 2 ({strategy}) max |two nodes - one process| = {worst:.3g}")
    assert worst <= 1e-5  # the tolerance of the two-process tests (test_train, test_shards_fsdp)
    for x, z in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"), strict=True):
        assert z["loss"] == pytest.approx(x["loss"], abs=1e-5)

    _kill_after_first_step_and_resume(cli, tmp_path / "two", stale_view, tmp_path / "logs-resumed")
    b = model_weights(tmp_path / "two")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"stage 2 ({strategy}), resumed on two nodes, max |two nodes - one process| = {worst:.3g}")
    assert worst <= 1e-5
