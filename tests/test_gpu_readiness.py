"""What would break on a GPU, caught on the CPU.

A tensor on the ``meta`` device mixed with CPU tensors fails as CUDA mixed with CPU does, so the losses run
with the model's outputs on ``meta`` and the batcher's index tensors on the CPU, as the trainers make them.
"""

from __future__ import annotations

import pytest
import torch

from llm2clip.finetune import contrastive, mntp
from llm2clip.finetune.contrastive import caption_contrastive_loss, distributed_contrastive_loss, grad_cached_backward


def _batch(device="meta"):
    q, d = torch.randn(4, 8, device=device), torch.randn(8, 8, device=device)
    # index tensors as the batcher builds them: on the CPU
    return q, d, torch.arange(4), torch.arange(4), torch.arange(8) % 6


def test_contrastive_loss_takes_index_tensors_to_the_logits_device():
    for symmetric in (False, True):
        loss = caption_contrastive_loss(*_batch(), symmetric=symmetric)
        assert loss.device.type == "meta"


def test_distributed_contrastive_loss_gathers_device_tensors(monkeypatch):
    # NCCL refuses CPU tensors: every tensor reaching a gather must be on the model's device
    seen = []

    def gather(x):
        seen.append(x.device.type)
        return torch.cat([x, x])

    monkeypatch.setattr(contrastive, "world", lambda: (1, 2))
    monkeypatch.setattr(contrastive, "gather_with_grad", gather)
    monkeypatch.setattr(contrastive, "gather_no_grad", gather)
    q, d, pos, qg, dg = _batch()
    loss = distributed_contrastive_loss(q, d, pos, qg, dg, symmetric=True)
    assert loss.device.type == "meta"
    assert seen and set(seen) == {"meta"}


class _FakeCuda:
    """Stands in for torch.cuda: a generator state that every draw advances."""

    def __init__(self):
        self.state, self.restored = 0, []

    def get_rng_state_all(self):
        self.state += 1
        return [torch.tensor([self.state])]

    def set_rng_state_all(self, states):
        self.restored.append(int(states[0]))


def test_grad_cache_replays_the_gpu_generator_too(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", fake.get_rng_state_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", fake.set_rng_state_all)
    w = torch.randn(8, 8, requires_grad=True)
    chunks = [torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)]
    grad_cached_backward(lambda c: c @ w, chunks, lambda e: e.square().mean())
    # captured before each chunk's first pass (states 1, 2, 3) and after the loss (4); each chunk's
    # second pass starts from its own state, then the state after the loss is put back
    assert fake.restored == [1, 2, 3, 4]


def test_mntp_evaluation_feeds_the_model_on_its_device(monkeypatch):
    class Tok:
        pad_token_id, all_special_ids = 0, [0]

    lm = torch.nn.Linear(2, 2, device="meta")
    lm.get_output_embeddings = lambda: torch.nn.Linear(2, 50, device="meta")
    devices = []

    def fake_loss(model, input_ids, labels, token_mask, bidirectional=True):
        devices.extend(t.device.type for t in (input_ids, labels, token_mask))
        return torch.tensor(1.0), {"masked_accuracy": 0.5, "selected": 3}

    monkeypatch.setattr(mntp, "mntp_loss", fake_loss)
    out = mntp.mntp_evaluate(lm, Tok(), [[5, 6, 7, 8], [9, 10]], mask_id=3)
    assert out["tokens"] == 3 and set(devices) == {"meta"}


def test_hf_vision_tower_loads_fp32_master_weights(tmp_path):
    import transformers as tf

    from llm2clip.vision.config import HFVisionConfig
    from llm2clip.vision.towers import build_vision_tower

    cfg = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    tf.CLIPVisionModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path)  # a checkpoint stored in bf16
    tower = build_vision_tower(HFVisionConfig(kind="hf_clip", path=str(tmp_path)))
    assert {p.dtype for p in tower.parameters()} == {torch.float32}


def test_each_rank_resumes_with_its_own_generator_states(tmp_path):
    import torch.multiprocessing as mp
    from stage2_helpers import free_port, rng_worker

    mp.spawn(rng_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    d0, d1 = (torch.load(tmp_path / f"draw{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(d0["first"], d0["again"]) and torch.equal(d1["first"], d1["again"])
    assert not torch.equal(d0["first"], d1["first"])  # rank 1 did not get rank 0's stream


def test_fewer_saved_ranks_give_new_ranks_distinct_streams(caplog):
    from llm2clip.checkpointing import restore_rng, rng_state

    torch.manual_seed(5)
    saved = [rng_state()]
    draws = []
    for rank in (0, 1, 2):
        restore_rng(saved, rank, world=3)
        draws.append(torch.rand(3))
    assert "holds the generator states of 1 rank(s), this run has 3" in caplog.text
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    torch.manual_seed(5)
    assert torch.equal(draws[0], torch.rand(3))


def test_a_failing_rank_prints_its_error_and_exits_without_waiting(monkeypatch, tmp_path, capsys):
    # a barrier after a failure hangs until the timeout when the other ranks are still training; each
    # rank must print its traceback and leave at once (torchrun then stops the others)
    import argparse

    from llm2clip.train import cli, distributed, loop

    calls = []

    def boom(*a, **k):
        raise RuntimeError("out of memory on this rank")

    class Exit(Exception):
        pass

    def fake_exit(code):
        calls.append(("exit", code))
        raise Exit

    monkeypatch.setattr(loop, "fit", boom)
    monkeypatch.setattr(distributed, "init_distributed", lambda device: distributed.DistInfo(rank=1, world=2))
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: calls.append(("barrier",)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("run_dir: out\nmodel: {vision: {kind: small_vit, image_size: 16, patch_size: 4, width: 32, "
                   "layers: 1, heads: 2}, text: {kind: adapter, depth: 1}}\n"
                   "data: {train: {kind: scenes, count: 8}, features: {store: none}}\n")
    args = argparse.Namespace(config=cfg, run_dir=None, steps=None, device=None, resume="latest", no_progress=True)
    with pytest.raises(Exit):
        cli.run_train(args)
    assert calls == [("exit", 1)]  # no barrier before leaving
    assert "out of memory on this rank" in capsys.readouterr().err


def test_gpu_defaults_bf16_tf32_and_pinned_batches_leave_a_cpu_run_as_it_was(tmp_path):
    """train.precision auto is bf16 on a GPU and fp32 on a CPU; TF32 is switched on for a GPU only; batches are
    pinned for a GPU only. A CPU run records precision fp32 and touches none of the CUDA flags."""
    from stage2_helpers import run_cfg

    from llm2clip.distributed import pin_memory
    from llm2clip.train.loop import fit, resolve_precision, use_tf32

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_precision("auto", cuda) == "bf16" and resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp16", cuda) == "fp16" and resolve_precision("bf16", cpu) == "bf16"
    assert pin_memory(cuda) and not pin_memory(cpu)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # (the flags are process-wide: set them, and put them back after)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        use_tf32(cpu, True)
        use_tf32(cuda, False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        use_tf32(cuda, True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        cfg = run_cfg(tmp_path / "run", train__steps=2, data__val=None)
        assert cfg.train.precision == "auto"
        fit(cfg, progress=False)
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    import json

    manifest = json.loads((tmp_path / "run" / "model" / "llm2clip_model.json").read_text())
    assert manifest["training"]["precision"] == "fp32"
