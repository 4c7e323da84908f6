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


def save_model(model, path: str | Path, state_dict: dict | None = None) -> Path:
    """``model.save(path)``, or the same files from a full state dict gathered off a sharded (FSDP) model."""
    if state_dict is None:
        return model.save(path)
    import json

    from safetensors.torch import save_file

    from ..model import MODEL_MANIFEST, MODEL_WEIGHTS

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / MODEL_WEIGHTS), metadata={"format": "pt"})
    (path / MODEL_MANIFEST).write_text(json.dumps(model.manifest(), indent=2))
    return path


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, scaler, data_state: dict,
                    config: dict, keep: int = 2, full_state: tuple[dict, dict] | None = None) -> Path:
    """``full_state``: (model, optimizer) state gathered from a sharded model (train.fsdp.gather_full_state)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp, full_state[0] if full_state else None)
    optim = full_state[1] if full_state else optimizer.state_dict()
    torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
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


def load_weights_and_optimizer(model, optimizer, ckpt: Path, optimizer_state: dict, sharded: bool,
                               device: torch.device) -> None:
    """Model weights and optimizer state of checkpoint ``ckpt``; ``sharded``: into an FSDP-sharded model."""
    from safetensors.torch import load_file, load_model

    from ..model import MODEL_WEIGHTS

    if sharded:
        from .fsdp import load_full_state

        load_full_state(model, optimizer, load_file(str(ckpt / MODEL_WEIGHTS)), optimizer_state)
    else:
        load_model(model, str(ckpt / MODEL_WEIGHTS), device=str(device))
        optimizer.load_state_dict(optimizer_state)


def load_train_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
