"""torchrun support shared by the stages: process-group setup and a clean exit."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment; False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def finish(code: int) -> None:
    """End a distributed worker: barrier, destroy, then os._exit.

    Without os._exit about 7 % of gloo runs abort at interpreter exit after
    destroy_process_group (docs/ASSETS.md); with it, none did.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
