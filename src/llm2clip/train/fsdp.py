"""``train.strategy: fsdp``: parameters, gradients and optimizer state sharded over ranks (FSDP2, ``fully_shard``).

Units: every block of the vision tower and of the text side, then the rest of each tower, and the
head. The LLM2CLIP module itself is not wrapped, so ``encode_image`` / ``encode_text`` (evaluation)
run through the units' own hooks without registering extra forward methods. ``fully_shard`` cannot
shard 0-dim parameters (the logit scale and bias): they stay replicated, and their gradients are
averaged by ``reduce_replicated_grads``, as DDP would.

Checkpoints are sharded (``save_sharded``): ``torch.distributed.checkpoint`` (DCP) writes each rank's
own shards of the model and optimizer into the step folder's ``dcp/``, with no gather; ``load_sharded``
reads them into a model sharded over any number of ranks, or into a plain one (one process, DDP),
so an FSDP run resumes on another world size. DCP reads its ``.metadata`` with pickle, so that file is
first checked to hold only DCP's own record types (``check_metadata``), as the rest of a checkpoint is
read weights-only. Only the final model export gathers the weights (``gather_full_model``), to write
one ordinary safetensors file; ``load_full_state`` still resumes from a DDP run's full checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError

DCP_DIR = "dcp"  # in a step folder: the sharded model and optimizer state

_BLOCK_LISTS = ("blocks", "resblocks", "layers")  # block containers across towers (see optim.py)


def _blocks(part: nn.Module) -> list[nn.Module]:
    out = []
    for name, mod in part.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS:
            out.extend(mod)
    return out


def shard_model(model: nn.Module, device: torch.device) -> None:
    """Apply ``fully_shard`` in place (call after ``model.to(device)`` and before building the optimizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for part in (model.visual, model.text):
        for blk in reversed(_blocks(part)):  # inner units first, should a block hold another block list
            fully_shard(blk, mesh=mesh, ignored_params={p for p in blk.parameters() if p.ndim == 0})
        fully_shard(part, mesh=mesh, ignored_params={p for p in part.parameters() if p.ndim == 0})
    fully_shard(model.head, mesh=mesh)
    from torch.distributed.tensor import DTensor

    model._replicated_params = [p for p in model.parameters() if not isinstance(p, DTensor)]


def reduce_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the parameters ``shard_model`` left replicated (no-op otherwise)."""
    params = [p for p in getattr(model, "_replicated_params", ()) if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i : i + n].view_as(p.grad))
        i += n


def _names(model: nn.Module, optimizer) -> list[str]:
    """Parameter names in the optimizer's own order (the index order of ``optimizer.state_dict()``)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def index_to_fqn(model, optimizer, osd: dict) -> dict:
    names = _names(model, optimizer)
    return {"state": {names[int(k)]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


def gather_full_model(model) -> dict:
    """The full model state on rank 0's CPU (empty elsewhere), for the final export. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, msd: dict, osd: dict) -> None:
    """Load a full model and optimizer state (index layout) into the sharded model on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, optimizer, index_to_fqn(model, optimizer, osd), options=opts)


def _dcp_state(model, optimizer) -> dict:
    """The model's and optimizer's state as this rank holds it (its DTensor shards under FSDP), keyed by name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


@contextlib.contextmanager
def quiet_dcp():
    """One process saves or loads DCP on purpose: no warning that torch.distributed is not set up."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(model, optimizer, folder: str | Path) -> None:
    """Every rank writes its own shards into ``folder`` (collective under torch.distributed)."""
    import torch.distributed.checkpoint as dcp

    with quiet_dcp():
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(folder), no_dist=not dist.is_initialized())


def require_weights(folder: str | Path, model_state) -> None:
    """Every weight of ``model_state`` is in the DCP folder (a partial load would leave the rest at their
    initial values without a word)."""
    saved = check_metadata(folder).state_dict_metadata
    missing = [k for k in model_state if f"model.{k}" not in saved]
    if missing:
        raise InputError(f"{folder}: the checkpoint lacks {len(missing)} weight(s) of this model, e.g. {missing[0]}")


def load_sharded(model, optimizer, folder: str | Path) -> None:
    """Load a ``save_sharded`` folder, written by any number of ranks, into this (sharded or plain) model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer)  # the layout to fill: DCP reshards the saved chunks into it
    require_weights(folder, state["model"])
    # a parameter that never had a gradient has no optimizer state in the checkpoint: keep its fresh one
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=True),
                 no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# what DCP's .metadata may name: its record classes and torch's plain value types, nothing that acts
_SAFE = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
         ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = None
        if "." not in name:
            if module == "torch.distributed.checkpoint.metadata":
                obj = getattr(importlib.import_module(module), name, None)
                obj = obj if isinstance(obj, type) and obj.__module__ == module else None
            elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                obj = getattr(torch, name)
            elif (module, name) in _SAFE:
                obj = super().find_class(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return obj


def check_metadata(folder: str | Path):
    """Refuse a DCP folder whose ``.metadata`` pickle names anything beyond DCP's records (it could run code)."""
    f = Path(folder) / ".metadata"
    if not f.is_file():
        raise InputError(f"{folder}: not a sharded checkpoint (no .metadata)")
    try:
        with open(f, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as err:
        raise InputError(f"{f}: refused: the file names {err}, not only checkpoint metadata, and loading it "
                         "could run code") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise InputError(f"{f}: cannot read this checkpoint metadata ({err})") from None
