"""Helpers of the stage-2 tests: tiny configs and process-group workers (importable by spawned children)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch


class SimulatedCrash(RuntimeError):
    """Raised by ``CrashAt``: a run killed between checkpoints."""


class CrashAt:
    """A ``fit`` callback that kills the run at the end of step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step: int) -> None:
        if step >= self.step:
            raise SimulatedCrash(f"stopped at step {step}")


class _Bomb:
    """Unpickling it calls ``open(marker, "w")``: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_bomb(path, marker) -> None:
    """A training-state file of the expected layout that also carries a pickled object (``_Bomb``)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "llm2clip-train-state", "version": 1, "stage": "stage2", "step": 2,
                "payload": _Bomb(marker)}, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run_config(run_dir, **over) -> dict:
    cfg = {
        "run_dir": str(run_dir),
        "seed": 0,
        "model": {"embed_dim": 32,
                  "vision": {"kind": "small_vit", "image_size": 16, "patch_size": 4, "width": 32, "layers": 2,
                             "heads": 2},
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


def run_cfg(run_dir, **over):
    """A validated tiny RunConfig."""
    from llm2clip.config import parse_config
    from llm2clip.train.config import RunConfig

    return parse_config(tiny_run_config(run_dir, **over), RunConfig)


def model_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, float((a[k] - b[k]).abs().max()))


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _finish() -> None:
    # docs/ASSETS.md: without barrier + destroy + os._exit, ~7 % of gloo workers abort at exit.
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


def write_scene_manifest(folder, count: int, render_size: int = 16, corrupt=(), offset: int = 0):
    """Generated scenes as PNG files plus a JSONL manifest (short and dense captions with text); the images
    whose index is in ``corrupt`` are garbage bytes. Returns the manifest path."""
    import json
    from pathlib import Path

    from llm2clip.data.scenes import SceneSet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = SceneSet(count, offset=offset, render_size=render_size)
    rows = []
    for i in range(count):
        name = f"scene{i:04d}.png"
        if i in corrupt:
            (folder / name).write_bytes(b"not a png")
        else:
            scenes.image(i).save(folder / name)
        caps = [{"id": scenes.caption_id(i, k), "kind": k, "text": t} for k, t in scenes[i].captions().items()]
        rows.append({"image": name, "captions": caps})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit_worker_resumable(rank: int, world: int, port: int, cfg_dict: dict, resume=None, crash_at=None) -> None:
    """``fit_worker`` with ``resume`` and a crash at step ``crash_at`` (which ends the worker quietly)."""
    from llm2clip.config import parse_config
    from llm2clip.train.config import RunConfig
    from llm2clip.train.distributed import DistInfo
    from llm2clip.train.loop import fit

    _init(rank, world, port)
    try:
        cfg = parse_config(cfg_dict, RunConfig)
        try:
            fit(cfg, resume=resume, progress=False, dist_info=DistInfo(rank, world, 0, torch.device("cpu")),
                callbacks=[CrashAt(crash_at)] if crash_at is not None else ())
        except SimulatedCrash:
            pass
    except BaseException:  # a nonzero exit makes mp.spawn raise; no barrier, the peer may be gone
        import traceback

        traceback.print_exc()
        os._exit(1)
    _finish()


def rng_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Each rank seeds its own generators, the states of all ranks go into one checkpoint file (rank 0
    writes it), then each rank draws, restores its own state from the file and draws again."""
    from llm2clip.checkpointing import all_rng_states, restore_rng

    _init(rank, world, port)
    torch.manual_seed(100 + rank)
    states = all_rng_states()
    path = Path(out_dir) / "rng.pt"
    if rank == 0:
        torch.save({"rng": states}, path)
    torch.distributed.barrier()
    first = torch.rand(4)
    restore_rng(torch.load(path, weights_only=True)["rng"], rank, world)
    torch.save({"first": first, "again": torch.rand(4)}, Path(out_dir) / f"draw{rank}.pt")
    _finish()


def search_cli(*argv) -> int:
    """`llm2clip index` / `index add` / `search` in-process, with errors raised rather than turned into exit codes."""
    import argparse

    from llm2clip.search.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def bow_store(cfg, path, dim: int = 24):
    """A feature store of bag-of-words vectors over every caption of a run config's train and val sources."""
    from llm2clip.data.images import BagOfWordsConfig, BagOfWordsEncoder, caption_texts
    from llm2clip.features.store import write_store
    from llm2clip.train.loop import build_source

    caps = {}
    for src in (cfg.data.train, cfg.data.val):
        caps.update(caption_texts(build_source(src)[0]))
    enc = BagOfWordsEncoder(BagOfWordsConfig(dim=dim))
    return write_store(path, list(caps), enc.encode(list(caps.values())).numpy(), identity=enc.identity())


def another_model(model_dir, dest):
    """A copy of the saved model at ``model_dir`` with other weights (its head's bias moved): another identity."""
    import shutil

    import torch

    from llm2clip.model import LLM2CLIP

    other = shutil.copytree(model_dir, dest)
    m = LLM2CLIP.load(other)
    with torch.no_grad():
        m.head.bias.add_(0.1)
    m.save(other)
    return other
