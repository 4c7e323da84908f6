"""Stage-2 torchrun plumbing over llm2clip.distributed: the device pick and the rank record the trainer
carries. Single-process runs never touch torch.distributed (docs/METHOD.md 7.7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed as _dist
from ..distributed import barrier  # noqa: F401  (re-exported for the trainer)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if pref == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(pref)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); gloo on CPU, nccl on GPU (llm2clip.distributed)."""
    local = _dist.local_rank()
    device = pick_device(device_pref, local)
    _dist.init_from_env(device)
    return DistInfo(_dist.rank(), _dist.world_size(), local, device)


def finish_and_exit(code: int) -> None:
    """End a worker: barrier, destroy the group, then os._exit, also in single-process runs (docs/ASSETS.md)."""
    _dist.finish(code, always_exit=True)
