"""torchrun support for every stage: the one process-group initialiser, rank/world helpers, barrier and exit.

Single-process runs never touch torch.distributed: each helper answers from torchrun's environment
(WORLD_SIZE, RANK, LOCAL_RANK) until a group exists.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

# torch's own default; stages whose other ranks wait long at a barrier pass more.
DEFAULT_TIMEOUT = timedelta(minutes=30)


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else env_rank()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else env_world()


def is_main() -> bool:
    return rank() == 0


def backend_for(device: str | torch.device) -> str:
    """nccl for a CUDA device on a machine that has one, gloo otherwise."""
    return "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"


def init_from_env(device: str | torch.device = "cpu", timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched so.

    The backend follows ``device``; with nccl this process's GPU is LOCAL_RANK, selected before the
    group forms so collectives never land on GPU 0 by accident."""
    if env_world() <= 1 or is_initialized():
        return is_initialized()
    backend = backend_for(device)
    if backend == "nccl":
        index = torch.device(device).index
        torch.cuda.set_device(local_rank() if index is None else index)
    dist.init_process_group(backend, timeout=timeout)
    return True


def from_rank0(obj):
    """Rank 0's ``obj`` on every rank (a collective; ``obj`` itself without a group). For what ranks read
    off a shared folder, such as the checkpoint to resume: on several nodes a network filesystem's client
    may list a folder from its cache for a while, and ranks resuming different checkpoints hang or diverge."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Barrier, then destroy the group (a no-op in single-process runs)."""
    if is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def finish(code: int, always_exit: bool = False) -> None:
    """End a distributed worker: ``cleanup``, then os._exit (also without a group when ``always_exit``).

    Without os._exit about 7 % of gloo runs abort at interpreter exit after
    destroy_process_group (docs/ASSETS.md); with it, none did.
    """
    if not is_initialized() and not always_exit:
        return
    cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def pin_memory(device) -> bool:
    """Page-locked batches on a GPU run, so the copy to the device overlaps the step (non_blocking)."""
    return getattr(device, "type", str(device)) == "cuda"
