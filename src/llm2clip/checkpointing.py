"""Training checkpoints of both stages: one folder per step, holding nothing but tensors and plain data.

Layout: ``<root>/step_00000100/`` with ``train_state.pt`` (the training state: tensors, numbers, strings,
lists, tuples and dicts only) beside whatever files the trainer adds (stage 2: the model as safetensors
and its manifest, or under FSDP a ``dcp/`` folder of every rank's shards). A checkpoint is built in a hidden
temp folder (all ranks write their shards into the same one), every file fsynced, then renamed into
place, so a kill mid-write leaves the previous checkpoint as the newest complete one.

The state is read with ``torch.load(weights_only=True)``: a file that carries a pickled object (a
downloaded "checkpoint" that would run code) is refused before anything in it runs. RNG states are
stored as tensors and ints for that reason.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .distributed import from_rank0
from .errors import ConfigError, InputError
from .fileio import building_dir, fsync_dir, remove_temp_files, write_atomic

STATE_FILE = "train_state.pt"
log = logging.getLogger(__name__)

FORMAT = "llm2clip-train-state"
VERSION = 1
_NAME = re.compile(r"step_(\d{8,})")


# ------------------------------------------------------------------------------------------- rng
def rng_state() -> dict:
    """The torch, numpy, python (and CUDA) generator states as tensors and ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    s = {"torch": torch.get_rng_state(),
         "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
         "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                    "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()  # this process's GPU only: each rank saves its own
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def all_rng_states() -> list[dict]:
    """Every rank's generator states, rank by rank (a collective in a distributed run; call it on all ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_state()]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, rng_state())  # in-process transport only; the file holds tensors and ints
    return out


def restore_rng(saved, rank: int = 0, world: int = 1) -> None:
    """Give rank ``rank`` its own saved generator states. A checkpoint of fewer ranks than this run has no
    state for the new ranks: they start from rank 0's, reseeded by rank, so no two ranks share a stream."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != world:
        log.warning("the checkpoint holds the generator states of %d rank(s), this run has %d: dropout and "
                    "augmentation draws differ from an uninterrupted run", len(states), world)
    if rank < len(states):
        set_rng_state(states[rank])
        return
    set_rng_state(states[0])
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------ discovery
def step_of(path: str | Path) -> int | None:
    m = _NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and is_checkpoint(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: str | Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; drop older ones and leftovers of killed writers."""
    root = Path(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    remove_temp_files(root)


def clear(root: str | Path) -> int:
    """Remove every checkpoint under ``root`` (a run that starts over); returns how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    remove_temp_files(root)
    n = 0
    for p in root.iterdir():
        if p.is_dir() and step_of(p) is not None:
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


# ---------------------------------------------------------------------------------------- write
def _fsync_files(folder: Path) -> None:
    for sub, _, files in os.walk(folder, topdown=False):  # sharded state sits in a subfolder
        for name in files:
            with open(Path(sub) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(sub)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def write_checkpoint(root: str | Path, step: int, state: dict, stage: str,
                     write_files: Callable[[Path], None] | None = None, keep: int | None = None,
                     write_shared: Callable[[Path], None] | None = None) -> Path:
    """Write ``state`` (plain data) and the files ``write_files(folder)`` makes as checkpoint ``step``.

    ``keep``: prune to that many checkpoints afterwards (None: keep all). ``write_shared(folder)``: files
    every rank writes into the same folder (sharded state); with it, this is a collective that every
    rank calls, and rank 0 alone writes ``state`` and ``write_files``' files.
    """
    if write_shared is not None:
        return _write_collective(root, step, state, stage, write_files, keep, write_shared)
    final = step_dir(root, step)
    full = {"format": FORMAT, "version": VERSION, "stage": stage, "step": int(step), **state}
    # built beside, swapped in whole (the same step saved again replaces the old folder)
    with building_dir(final) as tmp:
        if write_files is not None:
            write_files(tmp)
        _fsync_files(tmp)
        # the state goes last: a folder is complete once its state file is there
        write_atomic(tmp / STATE_FILE, lambda f: torch.save(full, f))
    if keep is not None:
        prune(root, keep)
    return final


def _write_collective(root, step, state, stage, write_files, keep, write_shared) -> Path:
    """Rank 0 builds the temp folder and tells every rank where it is (``("tmp", path)``); every rank writes
    its shards there and all learn whether every rank succeeded; then rank 0 adds its files and the state,
    publishes, and tells its outcome (``("ok", None)``). A failure before or after the shared part is
    told as ``("err", why)``, so that no rank waits on one that failed."""
    dist = _dist()
    final = step_dir(root, step)
    if dist is not None and dist.get_rank() != 0:
        kind, val = from_rank0(None)
        if kind == "tmp":
            _all_ranks(_into_shared, write_shared, Path(val))
            kind, val = from_rank0(None)
        if kind == "err":
            raise OSError(f"checkpoint {final}: rank 0 could not write it ({val})")
        return final

    told = []  # rank 0's messages so far: an error is told only where the other ranks wait for one

    def files(tmp: Path) -> None:
        told.append(from_rank0(("tmp", str(tmp))))
        _all_ranks(write_shared, tmp)
        told.append("shared")
        if write_files is not None:
            write_files(tmp)

    try:
        write_checkpoint(root, step, state, stage, files, keep)
    except BaseException as err:
        if len(told) != 1:  # not when the shared part failed: every rank raised there
            from_rank0(("err", f"{type(err).__name__}: {err}"))
        raise
    from_rank0(("ok", None))
    return final


def _into_shared(write_shared, folder: Path) -> None:
    """``write_shared(folder)`` on a rank other than 0: the folder rank 0 made must be visible here, else the
    ranks do not share a filesystem (node-local disks) and the parts would land where rank 0 never sees them."""
    if not folder.is_dir():
        raise OSError(f"{folder} (made by rank 0) is not visible from this rank: sharded checkpoints need a "
                      "run folder on a filesystem every node shares")
    write_shared(folder)


def _all_ranks(fn, *args) -> None:
    """``fn(*args)`` on every rank; each then raises if any rank failed (rank 0 publishes only complete folders)."""
    try:
        fn(*args)
        err = None
    except Exception as e:  # told to the other ranks, then raised on every one
        err = f"{type(e).__name__}: {e}"
    dist = _dist()
    errs = [err]
    if dist is not None:
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
    bad = [(r, e) for r, e in enumerate(errs) if e]
    if bad:
        raise OSError(f"rank {bad[0][0]} could not write its part ({bad[0][1]})")


# ----------------------------------------------------------------------------------------- read
def load_state(path: str | Path, stage: str | None = None) -> dict:
    """The training state of checkpoint folder ``path``, read as tensors and plain data only.

    Raises ConfigError when ``path`` is no checkpoint folder, InputError when its state file holds
    pickled objects (refused unread), is damaged, or has a layout this version does not know.
    """
    path = Path(path)
    f = path / STATE_FILE if path.is_dir() else path
    if not f.is_file():
        raise ConfigError(f"{path}: not a checkpoint folder (no {STATE_FILE})")
    try:
        st = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only stopped before running anything
        msg = " ".join(str(err).split())
        detail = msg.split("WeightsUnpickler error:")[-1].split(". Please")[0].split(" Check the doc")[0].strip()
        if "GLOBAL" in msg:
            raise InputError(f"{f}: refused: the file holds pickled Python objects, not only tensors and plain "
                             f"data, and loading it could run code ({detail})") from None
        raise InputError(f"{f}: cannot read this training state: damaged, or not a plain torch.save file "
                         f"({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(f"{f}: cannot read this training state ({err})") from None
    if not isinstance(st, dict) or st.get("format") != FORMAT:
        raise InputError(f"{f}: not an llm2clip training state (unknown layout; expected format {FORMAT!r})")
    if st.get("version") != VERSION:
        raise InputError(f"{f}: training-state version {st.get('version')!r}; this llm2clip reads version {VERSION}")
    if stage is not None and st.get("stage") != stage:
        raise InputError(f"{f}: a {st.get('stage')} checkpoint, not a {stage} one")
    return st
