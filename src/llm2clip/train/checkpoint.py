"""Stage-2 checkpoints: the model (safetensors + manifest) and everything needed to resume exactly.

Layout (llm2clip.checkpointing, shared with stage 1):
``<run_dir>/checkpoints/step_00000100/{model.safetensors, llm2clip_model.json, train_state.pt}``, written
to a temp folder and renamed, read back with ``torch.load(weights_only=True)``. An FSDP run writes
``dcp/`` (every rank's shards of the model and optimizer, train.fsdp.save_sharded) in place of
model.safetensors and the state's optimizer; either kind resumes under any strategy and world size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpointing import (
    STATE_FILE,
    all_rng_states,
    clear,
    latest_checkpoint,
    load_state,
    restore_rng,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from ..checkpointing import list_checkpoints as _list
from ..errors import ConfigError
from ..fileio import write_json_atomic

STAGE = "stage2"
__all__ = ["STATE_FILE", "checkpoint_dir", "clear_checkpoints", "export_checkpoint_model", "list_checkpoints",
           "load_train_state", "load_weights_and_optimizer", "resolve_resume", "rng_state", "save_checkpoint",
           "save_model", "set_rng_state", "all_rng_states", "restore_rng"]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_model(model, path: str | Path, state_dict: dict | None = None) -> Path:
    """``model.save(path)``, or the same files from a full state dict gathered off a sharded (FSDP) model."""
    if state_dict is None:
        return model.save(path)
    from safetensors.torch import save_file

    from ..model import MODEL_MANIFEST, MODEL_WEIGHTS

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / MODEL_WEIGHTS), metadata={"format": "pt"})
    write_json_atomic(path / MODEL_MANIFEST, model.manifest())
    return path


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, scaler, data_state: dict,
                    config: dict, keep: int = 2, rng: list[dict] | None = None, sharded: bool = False) -> Path:
    """``rng``: every rank's generator states (``all_rng_states``, gathered on all ranks), else this process's.
    ``sharded``: model and optimizer into ``dcp/`` by every rank, the rest by rank 0 (a collective: every
    rank calls it)."""
    state = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
             "data": data_state, "rng": rng if rng is not None else [rng_state()], "config": config}
    if sharded:
        from ..model import MODEL_MANIFEST
        from .fsdp import DCP_DIR, save_sharded

        return write_checkpoint(checkpoint_dir(run_dir), step, {**state, "optimizer": None}, STAGE,
                                lambda tmp: write_json_atomic(tmp / MODEL_MANIFEST, model.manifest()), keep,
                                write_shared=lambda tmp: save_sharded(model, optimizer, tmp / DCP_DIR))
    state["optimizer"] = optimizer.state_dict()
    return write_checkpoint(checkpoint_dir(run_dir), step, state, STAGE, lambda tmp: save_model(model, tmp), keep)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    return _list(checkpoint_dir(run_dir))


def clear_checkpoints(run_dir: str | Path) -> int:
    return clear(checkpoint_dir(run_dir))


def resolve_resume(run_dir: str | Path, resume: str | bool | None) -> Path | None:
    """None/False: fresh start. True or 'latest': the newest checkpoint of the run, or none yet. A path: that one."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        return latest_checkpoint(checkpoint_dir(run_dir))
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise ConfigError(f"--resume: {p}: not a checkpoint folder (no {STATE_FILE})")
    return p


def load_weights_and_optimizer(model, optimizer, ckpt: Path, optimizer_state: dict, sharded: bool,
                               device: torch.device) -> None:
    """Model weights and optimizer state of checkpoint ``ckpt``; ``sharded``: into an FSDP-sharded model.
    A sharded checkpoint (``dcp/``) loads into either, resharded to this run's world size."""
    from safetensors.torch import load_file, load_model

    from ..model import MODEL_WEIGHTS
    from .fsdp import DCP_DIR, load_sharded
    from .optim import restore_kernel

    if (ckpt / DCP_DIR).is_dir():
        load_sharded(model, optimizer, ckpt / DCP_DIR)
    elif sharded:
        from .fsdp import load_full_state

        load_full_state(model, optimizer, load_file(str(ckpt / MODEL_WEIGHTS)), optimizer_state)
    else:
        load_model(model, str(ckpt / MODEL_WEIGHTS), device=str(device))
        optimizer.load_state_dict(optimizer_state)
    restore_kernel(optimizer)


def export_checkpoint_model(ckpt: str | Path, out: str | Path) -> Path:
    """The model of a checkpoint folder as an ordinary saved model (``LLM2CLIP.load`` reads it): a sharded
    (``dcp/``) checkpoint's weights read in one process, a full one's copied. For evaluating a step."""
    import json

    from ..model import LLM2CLIP, MODEL_MANIFEST, ModelConfig
    from .fsdp import DCP_DIR, quiet_dcp, require_weights

    ckpt = Path(ckpt)
    if not (ckpt / DCP_DIR).is_dir():
        return LLM2CLIP.load(ckpt).save(out)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    mf = json.loads((ckpt / MODEL_MANIFEST).read_text())
    model = LLM2CLIP(ModelConfig.model_validate(mf["config"]), mf.get("text_dim"), mf.get("text_identity"),
                     load_pretrained=False, caption_encoder_config=mf.get("caption_encoder"))
    state = {"model": model.state_dict()}  # filled in place; the optimizer's entries are not read
    require_weights(ckpt / DCP_DIR, state["model"])
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR), planner=DefaultLoadPlanner(allow_partial_load=True),
                 no_dist=True)
    return model.save(out)


def load_train_state(path: Path) -> dict:
    """Tensors and plain data only (weights_only); a file with pickled objects is refused unread."""
    return load_state(path, STAGE)
