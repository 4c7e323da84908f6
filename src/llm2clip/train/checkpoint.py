"""Training checkpoints: the model (safetensors + manifest) and everything needed to resume exactly.

Layout: ``<run_dir>/checkpoints/step_00000100/{model.safetensors, llm2clip_model.json, train_state.pt}``.
A checkpoint is written to a temporary folder and renamed, so a kill mid-write leaves the previous one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

STATE_FILE = "train_state.pt"


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, scaler, data_state: dict,
                    config: dict, keep: int = 2) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "data": data_state,
                "rng": rng_state(), "config": config}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def resolve_resume(run_dir: str | Path, resume: str | bool | None) -> Path | None:
    """None/False: fresh start. True or 'latest': the newest checkpoint of the run, or none yet. A path: that one."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise ConfigError(f"--resume: {p}: not a checkpoint folder (no {STATE_FILE})")
    return p


def load_train_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
