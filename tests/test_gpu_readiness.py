"""What would break on a GPU, caught on the CPU.

A tensor on the ``meta`` device mixed with CPU tensors fails as CUDA mixed with CPU does, so the losses run
with the model's outputs on ``meta`` and the batcher's index tensors on the CPU, as the trainers make them.
"""

from __future__ import annotations

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
