"""Packed caption batches give every caption the embedding it has when encoded alone."""

from __future__ import annotations

import pytest
import torch

from llm2clip.text import CaptionEncoder, LLMEncoderConfig
from llm2clip.text.packing import pack, packed_attention_mask, plan_rows, pool_packed
from llm2clip.text.pooling import POOLING_MODES

CAPTIONS = [
    "a red dog on the left of a blue car .",
    "two cat",
    "a small green circle above a large yellow square , near the bottom of the photo next to a tree",
    "fish",
    "the bird is near the house",
    "a shiny striped car",
    "three dark orange stars at the top",
]


def make(path, **kw) -> CaptionEncoder:
    return CaptionEncoder.from_config(LLMEncoderConfig(model=str(path), template="tokenizer",
                                                       instruction="find a photo", **kw))


def test_plan_rows_fits_every_caption_once():
    lengths = [30, 5, 12, 40, 7, 7, 90, 3]
    rows = plan_rows(lengths, 48)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    for r in rows:
        assert sum(lengths[i] for i in r) <= max(48, max(lengths[i] for i in r))
    assert [6] in rows  # longer than a row: a row of its own


def test_mask_and_positions_restart_per_caption():
    Item = type("T", (), {})
    items = []
    for n, ps, pe in [(3, 1, 3), (2, 0, 2), (4, 0, 4)]:
        t = Item()
        t.ids, t.pool_start, t.pool_end = list(range(10, 10 + n)), ps, pe
        items.append(t)
    b = pack(items, [[0, 1], [2]], pad_id=0)
    assert b.input_ids.shape == (2, 5)
    assert b.position_ids[0].tolist() == [0, 1, 2, 0, 1] and b.position_ids[1].tolist() == [0, 1, 2, 3, 0]
    assert b.segment.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]
    m = packed_attention_mask(b.segment, bidirectional=True, dtype=torch.float32)
    seen = m[:, 0] == 0
    assert seen[0, 0].tolist() == [True, True, True, False, False]
    assert seen[0, 3].tolist() == [False, False, False, True, True]
    assert seen[1, 4].tolist() == [False, False, False, False, True]  # padding sees only itself
    causal = packed_attention_mask(b.segment, bidirectional=False, dtype=torch.float32)[:, 0] == 0
    assert causal[0, 1].tolist() == [True, True, False, False, False]
    # pooling against an independent per-caption computation
    h = torch.randn(2, 5, 3)
    flat = h.reshape(10, 3)
    spans = [(1, 3), (3, 5), (5, 9)]  # pooled flat positions of captions 0, 1, 2
    mean = pool_packed(h, b, "mean")
    for k, (s, e) in enumerate(spans):
        torch.testing.assert_close(mean[k], flat[s:e].mean(0))
    w = pool_packed(h, b, "weighted_mean")
    torch.testing.assert_close(w[2], (flat[5:9] * torch.arange(1.0, 5)[:, None]).sum(0) / 10)
    torch.testing.assert_close(pool_packed(h, b, "last_token"), flat[[2, 4, 8]])
    torch.testing.assert_close(pool_packed(h, b, "first_token"), flat[[0, 3, 5]])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_packed_equals_alone_for_every_family(tiny_family_dirs, family, bidirectional):
    enc = make(tiny_family_dirs[family], bidirectional=bidirectional)
    for mode in POOLING_MODES:
        enc.config.pooling = mode
        enc.config.batching = "padded"
        alone = torch.cat([enc.encode([c], batch_size=1) for c in CAPTIONS])
        enc.config.batching, enc.config.pack_tokens = "packed", 40  # several captions a row, several rows
        packed = enc.encode(CAPTIONS, batch_size=4)
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5, msg=f"{family} {mode}")


def test_packed_embedding_does_not_depend_on_its_companions(tiny_llm_dir):
    enc = make(tiny_llm_dir, batching="packed", pack_tokens=64)
    target = CAPTIONS[2]
    alone = enc.encode([target])[0]
    short = enc.encode([target, *CAPTIONS[:2]])[0]
    crowd = [*CAPTIONS[3:], target, *CAPTIONS[:2]] * 3
    long = enc.encode(crowd)[len(CAPTIONS[3:])]
    torch.testing.assert_close(short, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(long, alone, atol=1e-6, rtol=0)
