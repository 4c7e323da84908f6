"""``train.strategy: fsdp``: parameters, gradients and optimizer state sharded over ranks (FSDP2, ``fully_shard``).

Units: every block of the vision tower and of the text side, then the rest of each tower, and the
head. The LLM2CLIP module itself is not wrapped, so ``encode_image`` / ``encode_text`` (evaluation)
run through the units' own hooks without registering extra forward methods. ``fully_shard`` cannot
shard 0-dim parameters (the logit scale and bias): they stay replicated, and their gradients are
averaged by ``reduce_replicated_grads``, as DDP would.

Checkpoints hold the full state gathered on rank 0, in the same files and optimizer layout (states
keyed by parameter index) as a DDP run: a run can resume under either strategy or world size, and
the saved model is an ordinary one. That costs a gather of the whole model to rank 0's CPU at each
checkpoint, fine for the towers of LLM2CLIP (well under 10B parameters).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

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


def fqn_to_index(model, optimizer, osd: dict) -> dict:
    if not osd:
        return osd
    index = {n: i for i, n in enumerate(_names(model, optimizer))}
    return {"state": {index[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def index_to_fqn(model, optimizer, osd: dict) -> dict:
    names = _names(model, optimizer)
    return {"state": {names[int(k)]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state in index layout), full on rank 0 and empty elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    return msd, fqn_to_index(model, optimizer, osd)


def load_full_state(model, optimizer, msd: dict, osd: dict) -> None:
    """Load a full model and optimizer state (index layout) into the sharded model on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, optimizer, index_to_fqn(model, optimizer, osd), options=opts)
