"""Stages with files between them, a manifest of what was made from what, and a progress line.

Each stage has a key: the settings it depends on plus the keys of the stages it reads from. The
run folder's ``manifest.json`` records, per stage, the key it finished with, its wall time and its
result. A rerun skips a finished stage whose key is unchanged, redoes (after clearing its outputs)
one whose key changed, and lets an unfinished stage resume from what it left on disk (each stage's
own checkpoints or shards).

Pooled stages run in spawned worker processes that die with the main process: the kernel kills them
when it exits (Linux: PR_SET_PDEATHSIG) and a watchdog thread checks for a new parent elsewhere; Ctrl-C
and SIGTERM stop the main process, which stops its workers before it exits.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import datetime as _dt
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..fileio import check_output_folder, read_json, remove_temp_files, write_json_atomic

PIPELINE_MANIFEST = "manifest.json"


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fmt_duration(s: float) -> str:
    s = int(round(max(s, 0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class Stage:
    name: str  # e.g. "embed/smollm2-cc"; also names its folder under the run folder
    key: dict  # what its output is made from (besides its dependencies' outputs)
    fn: Callable  # module-level, so that it can run in a worker process
    args: tuple = ()
    deps: list[str] = field(default_factory=list)
    estimate_s: float = 10.0  # a prior for the time-left display, rescaled as stages finish
    pooled: bool = False  # may run beside other pooled stages, each in its own process
    progress: Callable[[], tuple[int, int]] | None = None  # (done, total) units of a running pooled stage
    clear: bool = True  # remove its folder when its key changed
    legacy_key: dict | None = None  # the key as an earlier key format wrote it: a stage done under it is adopted


class Runner:
    def __init__(self, run_dir: Path, stages: list[Stage], parallel: int = 1, config: dict | None = None,
                 out=None):
        self.run_dir = Path(run_dir)
        self.stages = stages
        self.parallel = max(1, parallel)
        self.out = out
        self.path = self.run_dir / PIPELINE_MANIFEST
        check_output_folder(self.run_dir, ConfigError)
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()) and not self.path.is_file():
            # a run clears and rewrites stage folders: it may own only an empty folder or one of its runs
            raise ConfigError(f"{self.run_dir}: not empty and not an llm2clip run folder (no {PIPELINE_MANIFEST}); "
                              "choose an empty or new folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.run_dir)  # left by a killed write of the manifest
        self.manifest = self._read_manifest() if self.path.is_file() else {}
        self.manifest.setdefault("stages", {})
        if config is not None:
            self.manifest["config"] = config
        self.keys: dict[str, str] = {}
        for st in stages:
            missing = [d for d in st.deps if d not in self.keys]
            if missing:
                raise ValueError(f"stage {st.name} depends on {missing}, which come later or not at all")
            self.keys[st.name] = self._hash(st.key, {d: self.keys[d] for d in st.deps})
        self.t0 = time.perf_counter()
        self.spent_est = 0.0  # estimates of the stages run so far (for the rescaling)
        self.spent_real = 0.0
        self._lock = threading.Lock()
        self._adopt_legacy()

    def _hash(self, key: dict, deps: dict) -> str:
        # paths inside the run folder enter the keys relative to it, so a moved run folder stays valid
        text = json.dumps(key, sort_keys=True, default=str)
        for h in (str(self.run_dir.absolute()), str(self.run_dir)):
            text = text.replace(h, "$RUN")
        return stable_hash({"key": text, "deps": deps})

    def _adopt_legacy(self) -> None:
        """A stage recorded under the earlier key format (every setting in its key) with today's settings takes
        today's key, so the upgrade that changed the format neither redoes finished work nor clears an
        interrupted stage's checkpoints (its status stays: it resumes). Settings added since that run count as
        the same when they are at their defaults (absent from today's key)."""
        old_keys: dict[str, str] = {}  # the earlier-format keys of adopted stages: what their dependants hashed
        changed = False
        for st in self.stages:
            rec = self.record(st.name)
            if st.legacy_key is None or not rec:
                continue
            if rec.get("key") == self.keys[st.name]:  # today's key (adopted by an earlier run, or new)
                if "key_before" in rec:
                    old_keys[st.name] = rec["key_before"]
                continue
            if any(d not in old_keys for d in st.deps):
                continue
            then = _without_new_defaults(st.legacy_key, rec.get("inputs"), st.key)
            if rec.get("key") == self._hash(then, {d: old_keys[d] for d in st.deps}):
                old_keys[st.name] = rec["key"]
                rec.update(key=self.keys[st.name], inputs=st.key, key_before=rec["key"])
                changed = True
        if changed:
            self._save()

    def _read_manifest(self) -> dict:
        # written atomically: only an outside hand truncates it
        hint = f"restore it, or move {self.run_dir} away and run again"
        data = read_json(self.path, "run manifest", hint)
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise ConfigError(f"{self.path}: not a run manifest (a JSON object with 'stages'); {hint}")
        return data

    # --------------------------------------------------------------------------- bookkeeping
    def record(self, name: str) -> dict | None:
        return self.manifest["stages"].get(name)

    def result(self, name: str) -> dict:
        rec = self.record(name)
        if not rec or rec.get("status") != "done":
            raise KeyError(f"stage {name} has not finished")
        return rec.get("result") or {}

    def is_done(self, st: Stage) -> bool:
        rec = self.record(st.name)
        return bool(rec and rec.get("status") == "done" and rec.get("key") == self.keys[st.name])

    def _save(self) -> None:
        with self._lock:
            write_json_atomic(self.path, self.manifest)

    def _begin(self, st: Stage) -> None:
        rec = self.record(st.name)
        if rec and rec.get("key") != self.keys[st.name] and st.clear:
            shutil.rmtree(self.run_dir / st.name, ignore_errors=True)  # made from other inputs: start over
        new = {"key": self.keys[st.name], "inputs": st.key, "status": "running", "started": _now()}
        if rec and rec.get("key") == new["key"] and "key_before" in rec:  # resumed after adoption: keep the chain
            new["key_before"] = rec["key_before"]
        self.manifest["stages"][st.name] = new
        self._save()

    def _finish(self, st: Stage, result: dict, seconds: float) -> None:
        self.manifest["stages"][st.name].update(status="done", result=result, seconds=round(seconds, 1),
                                                finished=_now())
        self._save()
        self.spent_est += st.estimate_s
        self.spent_real += seconds

    def _left(self, pending: list[Stage]) -> float:
        # the priors are rescaled by how this machine did so far, damped by a minute of prior weight
        scale = (self.spent_real + 60.0) / (self.spent_est + 60.0)
        return scale * sum(s.estimate_s for s in pending)

    def _say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    def _header(self, i: int, n: int, what: str, pending: list[Stage]) -> None:
        el = time.perf_counter() - self.t0
        self._say(f"[run {i}/{n}] {what} · elapsed {fmt_duration(el)} · about {fmt_duration(self._left(pending))} left")

    # --------------------------------------------------------------------------------- run
    def run(self) -> dict:
        todo = [s for s in self.stages if not self.is_done(s)]
        cached = [s.name for s in self.stages if self.is_done(s)]
        if cached:
            self._say(f"[run] finished before, skipped: {', '.join(cached)}")
        n = len(self.stages)
        i = len(cached)
        while todo:
            st = todo[0]
            if st.pooled and self.parallel > 1:
                group = []
                while todo and todo[0].pooled:
                    group.append(todo.pop(0))
                self._run_pool(group, i, n, todo)
                i += len(group)
                continue
            todo.pop(0)
            i += 1
            self._header(i, n, st.name, [st, *todo])
            self._begin(st)
            t = time.perf_counter()
            result = st.fn(*st.args) or {}
            self._finish(st, result, time.perf_counter() - t)
        total = time.perf_counter() - self.t0
        self.manifest["last_run_s"] = round(total, 1)
        self._save()
        self._say(f"[run] done in {fmt_duration(total)}")
        return self.manifest

    def _run_pool(self, group: list[Stage], i: int, n: int, rest: list[Stage]) -> None:
        """Pooled stages in worker processes, ``parallel`` at a time, each started (in list order) once the
        stages it depends on have finished; one bar over their progress, read from their files."""
        from tqdm.auto import tqdm

        names = ", ".join(s.name for s in group)
        self._header(i + 1, n, f"{len(group)} stages, {self.parallel} at a time: {names}", [*group, *rest])
        in_group = {s.name for s in group}
        finished: set[str] = set()
        waiting, running = list(group), {}
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch threads
        units = lambda s: s.progress() if s.progress else (0, 1)
        total = sum(units(s)[1] for s in group)
        bar = tqdm(total=total, unit="step", desc="stages", file=self.out, dynamic_ncols=True, mininterval=2)
        pool = cf.ProcessPoolExecutor(max_workers=self.parallel, mp_context=ctx, initializer=_worker_init,
                                      initargs=(os.getpid(),))
        failed: BaseException | None = None
        try:
            while (waiting or running) and failed is None:
                while len(running) < self.parallel:
                    st = next((s for s in waiting if all(d in finished or d not in in_group for d in s.deps)), None)
                    if st is None:
                        break
                    waiting.remove(st)
                    self._begin(st)
                    running[pool.submit(_timed, st.fn, st.args)] = st
                if not running:
                    raise RuntimeError(f"stages {[s.name for s in waiting]} wait for stages that never run")
                done, _ = cf.wait(running, timeout=2.0, return_when=cf.FIRST_COMPLETED)
                for f in done:  # record every stage that finished before raising a worker's error
                    st = running.pop(f)
                    try:
                        result, seconds = f.result()
                    except BaseException as err:
                        failed = failed or err
                        continue
                    self._finish(st, result, seconds)
                    finished.add(st.name)
                    bar.write(f"[run] {st.name} done in {fmt_duration(seconds)}")
                bar.n = sum(units(s)[1] if s.name in finished else units(s)[0] for s in group)
                bar.set_postfix_str(", ".join(s.name.split("/")[-1] for s in running.values())[:60])
                bar.refresh()
        except BaseException as err:  # e.g. Ctrl-C in the main process
            failed = failed or err
        finally:
            bar.close()
            if failed is not None:  # stop now: the stages still running resume from their own files next time
                procs = list((getattr(pool, "_processes", None) or {}).values())
                for proc in procs:
                    proc.terminate()
                for proc in procs:  # gone before this process is: none writes into the run folder afterwards
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
                        proc.join(5)
                pool.shutdown(wait=False, cancel_futures=True)
            else:
                pool.shutdown()
        if failed is not None:
            raise failed


def _without_new_defaults(full, recorded, explicit):
    """``full`` (every setting today) less the settings that ``recorded`` (a stage's inputs as an earlier version
    wrote them) lacks and ``explicit`` (today's key: the non-default settings) lacks too: added since, at their
    defaults."""
    if isinstance(full, dict) and isinstance(recorded, dict):
        ex = explicit if isinstance(explicit, dict) else {}
        return {k: _without_new_defaults(v, recorded[k], ex.get(k)) if k in recorded else v
                for k, v in full.items() if k in recorded or k in ex}
    if isinstance(full, list) and isinstance(recorded, list) and len(full) == len(recorded):
        ex = explicit if isinstance(explicit, list) and len(explicit) == len(full) else [None] * len(full)
        return [_without_new_defaults(a, b, c) for a, b, c in zip(full, recorded, ex)]
    return full


PR_SET_PDEATHSIG = 1


def _worker_init(parent: int) -> None:
    """In each pool worker: die with the main process, and leave Ctrl-C to it (it stops the workers); no
    per-model loading bars from transformers under the run's progress line (read when transformers is imported)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the main process died before the line above
        os._exit(1)

    def watch() -> None:  # where there is no PR_SET_PDEATHSIG: an orphan gets a new parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="llm2clip-parent-watch", daemon=True).start()


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) in the main thread for the block, so that cleanups run (the pool's
    workers are stopped) instead of the process vanishing at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print(f"[run] stopped by signal {signum}: run the same command again to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _timed(fn, args):
    t = time.perf_counter()
    res = fn(*args) or {}
    return res, time.perf_counter() - t


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
