"""Helpers of the stage-2 tests: tiny configs and process-group workers (importable by spawned children)."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run_config(run_dir, **over) -> dict:
    cfg = {
        "run_dir": str(run_dir),
        "seed": 0,
        "model": {"embed_dim": 32,
                  "vision": {"kind": "small_vit", "image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
                  "text": {"kind": "adapter", "depth": 1}},
        "data": {"train": {"kind": "scenes", "count": 48, "render_size": 16},
                 "val": {"kind": "scenes", "count": 16, "offset": 1000000, "render_size": 16},
                 "features": {"encoder": {"kind": "bow", "dim": 24}}},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"batch_size": 8, "steps": 4, "log_every": 1, "threads": 1, "device": "cpu"},
    }
    for dotted, value in over.items():
        node = cfg
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return cfg


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _finish() -> None:
    # ASSETS.md: without barrier + destroy + os._exit, ~7 % of gloo workers abort at exit.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


def loss_worker(rank: int, world: int, port: int, inputs: dict, out_dir: str, cases: list) -> None:
    """For each (kind, local_loss, gather_with_grad) case, rank ``rank`` encodes its slice of the global
    batch with shared linear maps, computes the distributed loss, backpropagates, averages gradients as
    DDP does, and saves them."""
    from llm2clip.losses import build_loss

    _init(rank, world, port)
    try:
        b = inputs["x_img"].shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        for c, (kind, local_loss, gather_with_grad) in enumerate(cases):
            w_img = inputs["w_img"].clone().requires_grad_(True)
            w_txt = inputs["w_txt"].clone().requires_grad_(True)
            scale = inputs["scale"].clone().requires_grad_(True)
            img = torch.nn.functional.normalize(inputs["x_img"][sl] @ w_img, dim=-1)
            txt = torch.nn.functional.normalize(inputs["x_txt"][sl] @ w_txt, dim=-1)
            bias = inputs["bias"].clone().requires_grad_(True) if kind == "siglip" else None
            loss = build_loss(kind, local_loss, gather_with_grad)(img, txt, scale, bias)
            loss.backward()
            grads = [w_img.grad, w_txt.grad, scale.grad] + ([bias.grad] if bias is not None else [])
            for g in grads:  # DDP averages gradients over ranks
                torch.distributed.all_reduce(g)
                g /= world
            lt = loss.detach().clone()
            torch.distributed.all_reduce(lt)
            torch.save({"loss": lt / world, "grads": grads}, os.path.join(out_dir, f"case{c}_rank{rank}.pt"))
    finally:
        _finish()


def fit_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    """A stage-2 run on rank ``rank`` of a gloo group."""
    from llm2clip.config import parse_config
    from llm2clip.train.config import RunConfig
    from llm2clip.train.distributed import DistInfo
    from llm2clip.train.loop import fit

    _init(rank, world, port)
    try:
        cfg = parse_config(cfg_dict, RunConfig)
        fit(cfg, progress=False, dist_info=DistInfo(rank, world, 0, torch.device("cpu")))
    finally:
        _finish()
