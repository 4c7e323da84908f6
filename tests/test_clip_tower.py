"""The CLIP text tower run per length bucket gives open_clip's own features and gradients."""

import pytest
import torch
from open_clip.transformer import TextTransformer

from llm2clip.text.clip_tower import bucketable, clip_text_forward, split_by_length

VOCAB, CTX = 500, 77


def _tower(**kw):
    torch.manual_seed(0)
    tt = TextTransformer(context_length=CTX, vocab_size=VOCAB, width=32, heads=4, layers=2, output_dim=16, **kw)
    for p in tt.parameters():  # open_clip leaves some at zero/empty until init_parameters
        torch.nn.init.normal_(p, std=0.05)
    return tt


def _tokens(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(len(lengths), CTX, dtype=torch.long)
    for i, n in enumerate(lengths):
        t[i, : n - 1] = torch.randint(1, VOCAB - 1, (n - 1,), generator=g)
        t[i, n - 1] = VOCAB - 1  # end of text: the largest id, as in open_clip's tokenizer
    return t


MIXED = [9, 77, 8, 10, 77, 60, 9, 71, 12, 77, 3, 77]


def test_features_and_gradients_equal_open_clip():
    tt = _tower()
    tokens = _tokens(MIXED)
    ref = tt(tokens)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in tt.named_parameters()}
    tt.zero_grad()
    out = clip_text_forward(tt, tokens)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for n, p in tt.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_each_caption_independent_of_its_batch():
    tt = _tower()
    tokens = _tokens(MIXED)
    whole = clip_text_forward(tt, tokens)
    alone = torch.cat([clip_text_forward(tt, tokens[i : i + 1]) for i in range(len(MIXED))])
    torch.testing.assert_close(whole, alone, atol=1e-5, rtol=1e-5)


def test_split_runs_fewest_positions():
    lengths = torch.tensor(MIXED)
    groups = split_by_length(lengths)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(MIXED)))
    cost = sum(len(g) * int(lengths[g].max()) for g in groups)
    # brute force over every threshold split
    def positions(thr):
        parts = [[n for n in MIXED if n <= thr], [n for n in MIXED if n > thr]]
        return sum(len(p) * max(p) for p in parts if p)

    best = min(positions(thr) for thr in set(MIXED))
    assert cost == best < len(MIXED) * CTX
    assert len(split_by_length(torch.tensor([77, 77, 77]))) == 1


@pytest.mark.parametrize("kw", [{"pool_type": "last"}, {"embed_cls": True}, {"no_causal_mask": True}])
def test_other_kinds_fall_back_to_open_clip(kw):
    tt = _tower(**kw)
    assert not bucketable(tt)
    tokens = _tokens(MIXED)
    torch.testing.assert_close(clip_text_forward(tt, tokens), tt(tokens))


def test_model_clip_text_tower_uses_buckets_on_real_captions():
    """The stage-2 model's CLIP text side on scene captions (open_clip's tokenizer) equals open_clip's forward."""
    from llm2clip.data.scenes import make_scene
    from llm2clip.model import ClipTextConfig, ClipTextTower

    torch.manual_seed(0)
    tower = ClipTextTower(ClipTextConfig(context_length=77, width=32, heads=4, layers=2), out_dim=16)
    caps = [make_scene(0, i).captions()[k] for i in range(6) for k in ("short", "dense")]
    tokens = tower.tokenize(caps)
    lengths = tokens.argmax(-1) + 1
    assert lengths.min() < 20 and lengths.max() == 77  # both buckets occur
    torch.testing.assert_close(tower(tokens), tower.transformer(tokens), atol=1e-5, rtol=1e-5)
