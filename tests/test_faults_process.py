"""Faults of processes and of the command line (issue 17): two writers of one folder, killed main processes,
a stage killed before its summary, files where folders belong, truncated records, a full disk, zero values.

The kill tests start real `llm2clip run smoke --parallel 2` processes and signal them."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llm2clip import fileio
from llm2clip.cli import main
from llm2clip.pipeline import build_stages, load_pipeline_config
from llm2clip.pipeline.runner import PIPELINE_MANIFEST

LINUX = sys.platform.startswith("linux")
needs_linux = pytest.mark.skipif(not LINUX, reason="reads /proc; PR_SET_PDEATHSIG")


# ------------------------------------------------------------------------------------------ processes
def _llm2clip(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # its own session: the test can clean up whatever is left without touching pytest's process group; SIGINT
    # as in a terminal (a test run started in the background inherits it ignored, and so would the child)
    return subprocess.Popen([sys.executable, "-m", "llm2clip", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _run_smoke(run_dir: Path) -> subprocess.Popen:
    return _llm2clip("run", "smoke", "--parallel", "2", "--run-dir", str(run_dir))


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return kids + [g for k in kids for g in _descendants(k)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_workers(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> list[int]:
    """The main process's descendants once two pool workers run a stage (stage 1 writes its metrics)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        workers = [p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if len(workers) >= 2 and any((run_dir / "stage1").glob("*/metrics.jsonl")):
            return _descendants(proc.pid)
        time.sleep(0.1)
    raise AssertionError("the pool workers never started")


def _wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _clean_up(procs: list[subprocess.Popen], pids: list[int]) -> None:
    for pid in pids:  # orphans of a failed test, by their ids (first: they hold the output pipes open)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


@pytest.mark.slow
@needs_linux
@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_killing_the_main_process_takes_its_workers_along(tmp_path, how):
    run_dir = tmp_path / "run"
    proc, pids = _run_smoke(run_dir), []
    try:
        pids = _wait_for_workers(proc, run_dir)
        if how == "SIGKILL":
            proc.kill()
        else:  # a terminal's Ctrl-C: SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
        assert _wait_gone(pids) == [], "the stage workers outlived their main process"
        if how == "Ctrl-C":
            assert code == 130 and "interrupted: run the same command again to resume" in proc.communicate()[1]
            assert not fileio.lock_path(run_dir).exists()
        with fileio.folder_lock(run_dir):  # its lock died with it: no stale lock
            pass
    finally:
        _clean_up([proc], pids)


@pytest.mark.slow
@needs_linux
def test_a_second_run_on_the_folder_fails_at_once_and_sigterm_stops_the_first_with_its_workers(tmp_path):
    run_dir = tmp_path / "run"
    procs, pids = [_run_smoke(run_dir), _run_smoke(run_dir)], []  # started at the same instant
    try:
        end = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.1)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.communicate()[1]
        assert loser.returncode == 2, err
        assert f"in use by another llm2clip run process (PID {winner.pid})" in err and "Traceback" not in err
        pids = _wait_for_workers(winner, run_dir)
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(60) == 128 + signal.SIGTERM
        assert "stopped by signal 15" in winner.communicate()[1]
        assert _wait_gone(pids) == [], "SIGTERM left stage workers running"
        assert not fileio.lock_path(run_dir).exists()  # released on the way out
    finally:
        _clean_up(procs, pids)


def test_a_live_holder_is_named_and_a_killed_one_leaves_no_lock(tmp_path):
    out = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llm2clip.fileio import lock_folder; "
                               f"lock_folder({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(fileio.FolderInUseError, match=f"PID {holder.pid}"):
            fileio.lock_folder(out)
        from llm2clip.jobs import Job

        with pytest.raises(fileio.FolderInUseError, match=f"llm2clip embed process \\(PID {holder.pid}\\)"):
            Job(out, "embed", "manifest.json")  # the embed and index jobs claim their folder the same way
    finally:
        holder.kill()
        holder.wait()
    with fileio.folder_lock(out):  # the kernel dropped the dead holder's lock
        assert fileio.lock_path(out).read_text() == f"{os.getpid()}\n"
        fileio.lock_folder(out)  # the holder itself may take it again
    assert not fileio.lock_path(out).exists()


def test_a_finished_job_lets_its_folder_go(tmp_path):
    from llm2clip.jobs import Job

    out = tmp_path / "job"
    job = Job(out, "demo", "manifest.json")
    assert fileio.lock_path(out).read_text() == f"{os.getpid()}\n"
    job.open({"a": 1})
    job.complete(b"{}")
    assert not fileio.lock_path(out).exists()
    assert Job(out, "demo", "manifest.json").is_complete()  # a check of a finished job keeps no lock
    assert not fileio.lock_path(out).exists()


# ------------------------------------------------------------------------------ a stage's whole record
def test_stage1_killed_between_encoder_and_summary_is_finished_on_rerun(tmp_path):
    cfg = load_pipeline_config("smoke")
    cfg.run_dir = str(tmp_path / "run")
    stages = {s.name: s for s in build_stages(cfg)}
    stages["data"].fn(*stages["data"].args)
    st1 = stages["stage1/llm-cc"]
    first = st1.fn(*st1.args)
    out = Path(cfg.run_dir) / "stage1" / "llm-cc"
    (out / "summary.json").unlink()  # the state a kill right after saving encoder/ leaves
    again = st1.fn(*st1.args)
    assert again["step"] == first["step"] == cfg.stage1.optim.steps
    assert again["train_s"] >= first["train_s"] * 0.999 and again["trunk_s"] is not None
    assert json.loads((out / "summary.json").read_text())["step"] == cfg.stage1.optim.steps
    # the same through `finetune-text` alone (the trainer's own rule, not the pipeline's)
    from llm2clip.config import parse_config
    from llm2clip.finetune.config import FinetuneConfig
    from llm2clip.finetune.trainer import Stage1Trainer

    (out / "summary.json").unlink()
    alone = Stage1Trainer(parse_config(st1.args[0], FinetuneConfig, "stage1"), progress=False).run()
    assert alone["step"] == cfg.stage1.optim.steps and (out / "encoder").is_dir()


# ------------------------------------------------------------------------------- clear errors
def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llm2clip: error: "), err
    return err


def test_run_dir_or_its_parent_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "exists and is not a folder" in _error(capsys, "run", "smoke", "--run-dir", str(f))
    assert f"{f}: is a file" in _error(capsys, "run", "smoke", "--run-dir", str(f / "run"))


def test_truncated_run_manifest(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / PIPELINE_MANIFEST).write_text('{"stages": {"data": {"key": "ab')
    err = _error(capsys, "run", "smoke", "--run-dir", str(run_dir))
    assert f"{run_dir / PIPELINE_MANIFEST}: not a valid run manifest (Unterminated string" in err


@pytest.mark.parametrize("argv, flag", [
    (["run", "smoke", "--parallel", "0"], "--parallel 0"),
    (["run", "smoke", "--parallel", "-2"], "--parallel -2"),
    (["run", "smoke", "--threads", "0"], "--threads 0"),
    (["quickstart", "--preset", "smoke", "--threads", "-1"], "--threads -1"),
])
def test_zero_and_negative_run_flags_are_refused_like_the_config_fields(tmp_path, capsys, argv, flag):
    err = _error(capsys, *argv, "--run-dir", str(tmp_path / "run"))
    assert f"{flag}: Input should be greater than or equal to 1" in err
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("argv", [["-k", "0"], ["--classes", "0"], ["--per-class", "-1"]])
def test_eval_text_zero_counts_are_refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["eval-text", "-e", "random:dim=8", *argv])
    assert e.value.code == 2 and f"argument {argv[0]}: " in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--max-batch", "0"], ["--batch-wait-ms", "-1"], ["--threads", "0"],
                                  ["--max-body-mb", "0"], ["--max-image-pixels", "0"], ["--port", "x"]])
def test_serve_flags_out_of_range_are_refused(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path / "index"), *argv])
    assert e.value.code == 2 and f"argument {argv[0]}: " in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_train_steps_zero_or_negative_is_refused(tmp_path, capsys, steps):
    from stage2_helpers import tiny_run_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_config(tmp_path / "r")))
    err = _error(capsys, "train", str(cfg), "--steps", steps)
    assert f"--steps {steps}: Input should be greater than or equal to 1 (as the config's train.steps)" in err


def test_main_turns_os_validation_and_json_errors_into_one_line_and_debug_keeps_the_traceback(monkeypatch, capsys):
    import argparse

    from pydantic import BaseModel

    from llm2clip import cli

    class M(BaseModel):
        n: int

    def fail_with(err):
        def add(sub):
            p = sub.add_parser("boom")
            p.set_defaults(func=lambda args: (_ for _ in ()).throw(err))
        return add

    errors = {
        "perm": (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "/x/y: Permission denied"),
        "full": (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (free some space"),
        "valid": (None, "M: n: Input should be a valid integer"),
        "json": (json.JSONDecodeError("Expecting value", "{", 1), "invalid JSON: Expecting value"),
    }
    for name, (err, want) in errors.items():
        if name == "valid":
            try:
                M(n="x")
            except ValueError as e:
                err = e
        monkeypatch.setattr(cli, "COMMANDS", [fail_with(err)])
        assert want in _error(capsys, "boom"), name
        with pytest.raises(type(err)):
            main(["--debug", "boom"])
    monkeypatch.setattr(cli, "COMMANDS", [fail_with(RuntimeError("a bug"))])
    with pytest.raises(RuntimeError):  # not the user's to fix: the traceback stays
        main(["boom"])
    assert isinstance(cli.build_parser(), argparse.ArgumentParser)


# ---------------------------------------------------------------------------------------- disk full
def _disk_full_at(monkeypatch, name_part: str, times: int = 1) -> list:
    """ENOSPC when a file whose name holds ``name_part`` is synced, ``times`` times."""
    real, hits = fileio._sync_file, []

    def sync(path):
        if name_part in path.name and len(hits) < times:
            hits.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(fileio, "_sync_file", sync)
    return hits


def test_disk_full_in_a_run_names_the_file_and_the_bytes(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _disk_full_at(monkeypatch, "stage1_groups.jsonl")
    err = _error(capsys, "run", "smoke", "--run-dir", str(run_dir))
    assert f"{run_dir / 'data' / 'stage1_groups.jsonl'}: no space left on the device: it needs " in err
    assert "bytes free there" in err and "finished parts are kept" in err
    assert not list((run_dir / "data").glob(f"*{fileio.TMP_MARK}*"))
    m = json.loads((run_dir / PIPELINE_MANIFEST).read_text())
    assert m["stages"]["data"]["status"] == "running"  # not recorded as done: the rerun redoes it
    assert not fileio.lock_path(run_dir).exists()


def test_disk_full_in_embed_keeps_the_finished_shards_and_resumes(tmp_path, monkeypatch, capsys):
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": f"c{i}", "caption": f"caption number {i}"}) + "\n" for i in range(10)))
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml.safe_dump({"encoder": {"kind": "random", "dim": 8}, "captions": [str(caps)],
                                   "out": str(tmp_path / "store"), "shard_size": 4, "progress": False}))
    hits = _disk_full_at(monkeypatch, "shard-00001")
    err = _error(capsys, "embed", str(cfg))
    assert str(hits[0].name).startswith(".") and "no space left on the device: it needs " in err
    store = tmp_path / "store"
    shard0 = next(p for p in store.iterdir() if p.name.startswith("shard-00000") and p.suffix == ".npy")
    before = shard0.stat().st_mtime_ns
    assert main(["embed", str(cfg)]) == 0
    assert shard0.stat().st_mtime_ns == before  # resumed: the finished shard was not written again
    assert (store / "manifest.json").is_file() and not fileio.lock_path(store).exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from stage2_helpers import run_cfg

    from llm2clip.train.loop import fit

    run = tmp_path_factory.mktemp("model") / "run"
    fit(run_cfg(run, train__steps=2, data__val=None), progress=False)
    return run / "model"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from llm2clip.data.scenes import SceneSet

    root = tmp_path_factory.mktemp("images")
    scenes = SceneSet(12, seed=3, render_size=16)
    for i in range(12):
        scenes.image(i).save(root / f"s{i:02d}.png")
    return root


def test_index_out_is_a_file(tmp_path, model_dir, images, capsys):
    f = tmp_path / "index"
    f.write_text("x")
    err = _error(capsys, "index", str(images), "--model", str(model_dir), "--out", str(f), "--no-progress")
    assert f"{f}: exists and is not a folder" in err


def test_disk_full_in_index_keeps_the_finished_chunks_and_resumes(tmp_path, model_dir, images, monkeypatch, capsys):
    out = tmp_path / "index"
    argv = ["index", str(images), "--model", str(model_dir), "--out", str(out), "--chunk-size", "4", "--no-progress"]
    _disk_full_at(monkeypatch, "00001")
    err = _error(capsys, *argv)
    assert "00001" in err and "no space left on the device: it needs " in err
    done = {p: p.stat().st_mtime_ns for p in out.rglob("*0000*") if p.is_file()}
    assert done  # the first chunk stays
    assert main(argv) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in done.items() if p.exists())
    assert (out / "manifest.json").is_file()


def test_a_filesystem_without_flock_is_a_warning_not_a_holder(tmp_path, monkeypatch, caplog):
    """flock failing for another reason than a holder (ENOSYS/ENOLCK on some network filesystems) leaves the
    folder unlocked with a warning, instead of reporting a process that does not exist."""
    import errno
    import fcntl
    import logging

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING):
        assert fileio.lock_folder(tmp_path / "out") is None
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text
