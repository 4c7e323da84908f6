"""Stage 1: pair sampling, the caption-contrastive loss, gradient caching, the trunk cache,
MNTP masking, resume after a kill, 2 processes against 1, and the exported encoder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from stage2_helpers import write_pickle_bomb

from llm2clip.checkpointing import latest_checkpoint, list_checkpoints
from llm2clip.errors import InputError
from llm2clip.finetune.config import FinetuneConfig
from llm2clip.finetune.contrastive import (
    bucketed_backward,
    caption_contrastive_loss,
    grad_cached_backward,
    length_buckets,
)
from llm2clip.finetune.data import CaptionGroup, GroupedCaptions, PairSampler, load_groups_jsonl
from llm2clip.finetune.lora import TrunkCache, add_lora
from llm2clip.finetune.mntp import mask_tokens, mntp_loss
from llm2clip.finetune.trainer import Stage1Trainer
from llm2clip.text import CaptionEncoder, LLMEncoderConfig

WORDS = "red green blue yellow black white".split()
OBJECTS = "dog cat fish bird car bus".split()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def groups_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("groups") / "groups.jsonl"
    with open(f, "w") as fh:
        for w in WORDS:
            for o in OBJECTS:
                fh.write(json.dumps({"group": f"{w}-{o}", "kinds": ["short", "short", "dense"],
                                     "captions": [f"a {w} {o}", f"the {o} is {w}",
                                                  f"one {w} {o} on the left of a tree"]})
                         + "\n")
    return f


def config(tiny_llm_dir, groups_file, out, **over):
    base = dict(encoder={"model": str(tiny_llm_dir)}, out=str(out),
                data={"cupl_train": False, "groups": [str(groups_file)]},
                contrastive={"batch_size": 8}, optim={"steps": 4, "precision": "fp32", "warmup_steps": 1},
                eval={"cupl_classes": 4, "per_class": 2}, save_every=2)
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return FinetuneConfig(**base)


# ----------------------------------------------------------------------------- data
def test_pair_sampler(groups_file):
    data = load_groups_jsonl(groups_file)
    s = PairSampler(data, seed=3)
    batch = s.batch(5, 16)
    assert batch == PairSampler(data, seed=3).batch(5, 16)  # a pure function of (seed, step)
    assert batch != s.batch(6, 16)
    assert len({p.group for p in batch}) == 16
    for p in batch:
        g = s.groups[p.group]
        assert p.query in g.captions and p.positive in g.captions and p.query != p.positive
        assert p.negative_group != p.group and p.negative in s.groups[p.negative_group].captions
        assert p.direction in ("short->dense", "dense->short")
        kind_of = dict(zip(g.captions, g.kinds))
        assert p.direction == f"{kind_of[p.query]}->{kind_of[p.positive]}"
        neg_kind = dict(zip(s.groups[p.negative_group].captions, s.groups[p.negative_group].kinds))[p.negative]
        assert neg_kind == kind_of[p.positive]  # the hard negative has the positive's kind


def test_group_file_errors(tmp_path):
    f = tmp_path / "g.jsonl"
    dup = '{"group": 1, "captions": ["a"]}\n{"group": 1, "captions": ["b", "c"]}\n'
    for body, msg in [(dup, ":2: duplicate group"),
                      ('{"group": 1, "captions": []}\n', ":1: 'captions' must be"),
                      ('{"group": 1, "captions": ["a", "b"], "kinds": ["short"]}\n', ":1: 'kinds' must list"),
                      ('nope\n', ":1: not valid JSON")]:
        f.write_text(body)
        with pytest.raises(InputError, match=msg):
            load_groups_jsonl(f)
    with pytest.raises(InputError, match="at least 2 groups"):
        PairSampler(GroupedCaptions([CaptionGroup("a", ["x", "y"])]))


# ----------------------------------------------------------------------------- loss
def reference_loss(q, d, pos, qg, dg, scale, mask):
    """Per-query loop: -log softmax over the allowed candidates."""
    total = 0.0
    for i in range(q.shape[0]):
        s = scale * F.cosine_similarity(q[i][None], d)
        allowed = [j for j in range(d.shape[0]) if not mask or j == pos[i] or dg[j] != qg[i]]
        total += -(s[pos[i]] - torch.logsumexp(s[allowed], 0))
    return total / q.shape[0]


def test_contrastive_loss_masks_same_group_and_matches_reference():
    torch.manual_seed(0)
    q, d = torch.randn(4, 6), torch.randn(8, 6)
    pos = torch.arange(4)
    qg = torch.tensor([0, 1, 2, 3])
    dg = torch.tensor([0, 1, 2, 3, 1, 0, 5, 0])  # negatives 4, 5, 7 share groups with queries 1, 0, 0
    for mask in (True, False):
        got = caption_contrastive_loss(q, d, pos, qg, dg, scale=50.0, mask_same_group=mask)
        torch.testing.assert_close(got, reference_loss(q, d, pos, qg, dg, 50.0, mask))
    masked = caption_contrastive_loss(q, d, pos, qg, dg, mask_same_group=True)
    assert masked != caption_contrastive_loss(q, d, pos, qg, dg, mask_same_group=False)
    # symmetric: the average with the positive->query direction over all queries
    sym = caption_contrastive_loss(q, d, pos, qg, dg, symmetric=True)
    back = reference_loss(d[pos], q, torch.arange(4), qg, qg, 50.0, True)
    torch.testing.assert_close(sym, (masked + back) / 2)


# ----------------------------------------------------------------------- grad caching
def _lora_encoder(tiny_llm_dir, dropout=0.1, top=None):
    torch.manual_seed(0)
    enc = CaptionEncoder.from_config(LLMEncoderConfig(model=str(tiny_llm_dir)))
    enc.model = add_lora(enc.model, 4, 8, dropout, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], top)
    with torch.no_grad():
        for n, p in enc.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    enc.model.train()
    return enc


def test_lora_wrapping_raises_no_deprecation_noise(tiny_llm_dir):
    """peft reads transformers' deprecated is_gradient_checkpointing: a FutureWarning per stage 1, not ours."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _lora_encoder(tiny_llm_dir)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


CAPS = [f"a {w} {o} on the left" for w in WORDS[:3] for o in OBJECTS[:4]]  # 12 captions


def _loss_on(emb):
    q, d = emb[:4], emb[4:]
    return caption_contrastive_loss(q, d, torch.arange(4), torch.arange(4), torch.arange(8) % 6)


def _grads(enc):
    return {n: p.grad.clone() for n, p in enc.model.named_parameters() if p.requires_grad}


def _check_same(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-5, rtol=1e-4)


def test_grad_cache_equals_plain_large_batch(tiny_llm_dir):
    enc = _lora_encoder(tiny_llm_dir, dropout=0.0)
    items = enc.tokenize(CAPS)
    embed = lambda chunk: enc.forward(enc.collate(chunk))
    plain = grad_cached_backward(embed, [items], _loss_on)
    g_plain = _grads(enc)
    enc.model.zero_grad()
    cached = grad_cached_backward(embed, [items[i : i + 5] for i in range(0, 12, 5)], _loss_on)
    torch.testing.assert_close(plain, cached)
    _check_same(g_plain, _grads(enc))


def test_length_buckets():
    lengths = [3, 3, 4, 5, 9, 10, 11, 40, 41]
    b = length_buckets(lengths, 1.25)
    assert [i for part in b for i in part] == list(range(len(lengths)))  # every index once, in order
    assert all(lengths[p[-1]] <= 1.25 * lengths[p[0]] for p in b)
    assert b == [[0, 1], [2, 3], [4, 5, 6], [7, 8]]
    assert length_buckets(lengths, None) == [list(range(9))]
    assert all(len(p) <= 2 for p in length_buckets(lengths, None, max_size=2))
    with pytest.raises(ValueError):
        length_buckets([4, 3])


def test_length_bucketed_forwards_equal_one_padded_forward(tiny_llm_dir):
    # mixed lengths: one padded forward against one forward per length bucket (graphs kept)
    enc = _lora_encoder(tiny_llm_dir, dropout=0.0)
    caps = [c if i % 3 else c + " " + " ".join(WORDS * 4) for i, c in enumerate(CAPS)]
    items = enc.tokenize(caps)
    order = sorted(range(12), key=lambda i: len(items[i].ids))
    buckets = length_buckets([len(items[i].ids) for i in order], 1.25)
    assert len(buckets) > 1
    embed = lambda chunk: enc.forward(enc.collate(chunk))
    inverse = torch.empty(12, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(12)
    loss_fn = lambda emb_sorted: _loss_on(emb_sorted[inverse])
    plain = bucketed_backward(embed, [[items[i] for i in order]], loss_fn)
    g_plain = _grads(enc)
    enc.model.zero_grad()
    split = bucketed_backward(embed, [[items[order[j]] for j in b] for b in buckets], loss_fn)
    torch.testing.assert_close(plain, split)
    _check_same(g_plain, _grads(enc))


def test_grad_cache_replays_dropout(tiny_llm_dir):
    # With dropout, the gradient must be that of the loss on the first pass's masks: the same
    # chunks embedded with a graph under the same RNG sequence give it directly.
    enc = _lora_encoder(tiny_llm_dir, dropout=0.3)
    items = enc.tokenize(CAPS)
    chunks = [items[i : i + 5] for i in range(0, 12, 5)]
    embed = lambda chunk: enc.forward(enc.collate(chunk))
    torch.manual_seed(7)
    direct = _loss_on(torch.cat([embed(c) for c in chunks]))
    direct.backward()
    g_direct = _grads(enc)
    enc.model.zero_grad()
    torch.manual_seed(7)
    cached = grad_cached_backward(embed, chunks, _loss_on)
    torch.testing.assert_close(direct.detach(), cached)
    _check_same(g_direct, _grads(enc))


def test_trunk_cache_equals_the_full_model(tiny_llm_dir):
    enc = _lora_encoder(tiny_llm_dir, dropout=0.0, top=1)
    items = enc.tokenize(CAPS)
    batch = enc.collate(items)
    full = enc.forward(batch)
    _loss_on(full).backward()
    g_full = _grads(enc)
    enc.model.zero_grad()
    trunk = TrunkCache(enc, top_layers=1)
    cached = trunk.forward(items, batch)
    _loss_on(cached).backward()
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    _check_same(g_full, _grads(enc))
    assert all("layers.1." in n for n in g_full)  # LoRA on the top layer only
    # the bottom layer really is skipped, and the cached states really are what the top layer reads
    calls = []
    body = enc.model.get_base_model()
    hook = body.layers[0].register_forward_hook(lambda *a: calls.append(1))
    trunk.forward(items, batch)
    assert calls == []
    enc.forward(batch)
    assert calls == [1]
    hook.remove()
    for k in trunk.store:
        trunk.store[k] = trunk.store[k] + 1.0
    assert (trunk.forward(items, batch) - full).abs().max() > 1e-2


# ------------------------------------------------------------------------------- MNTP
def test_mntp_masking_statistics_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 100))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    inputs, labels = mask_tokens(ids, special, mask_id=5, vocab_size=1000, generator=g, probability=0.2)
    sel = labels != -100
    assert not sel[:, 0].any()
    assert abs(sel.float().mean().item() - 0.2 * 99 / 100) < 0.01
    assert (labels[sel] == ids[sel]).all() and (inputs[~sel] == ids[~sel]).all()
    masked = (inputs == 5) & sel
    kept = (inputs == ids) & sel
    assert abs(masked.sum() / sel.sum() - 0.8) < 0.02
    assert abs(kept.sum() / sel.sum() - 0.1) < 0.02  # random picks rarely hit the original


def test_mntp_prediction_comes_from_the_previous_position(tiny_llm_dir):
    enc = CaptionEncoder.from_config(LLMEncoderConfig(model=str(tiny_llm_dir)), with_lm_head=True)
    ids = torch.randint(10, 60, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 4], labels[1, 7] = ids[0, 4], ids[1, 7]
    tm = torch.ones_like(ids, dtype=torch.bool)
    loss, info = mntp_loss(enc.lm, ids, labels, tm)
    from llm2clip.text.attention import attention_inputs

    logits = enc.lm(input_ids=ids, **attention_inputs(tm, bidirectional=True, dtype=torch.float32)).logits
    ref = (F.cross_entropy(logits[0, 3][None], ids[0, 4][None])
           + F.cross_entropy(logits[1, 6][None], ids[1, 7][None])) / 2
    torch.testing.assert_close(loss, ref)
    assert info["selected"] == 2


# --------------------------------------------------------------------------- training
def lora_state(out):
    ck = latest_checkpoint(Path(out) / "checkpoints")
    return torch.load(ck / "train_state.pt", weights_only=True)["lora"]


def test_training_embeddings_equal_encode_time_embeddings(tiny_llm_dir, groups_file, tmp_path):
    cfg = config(tiny_llm_dir, groups_file, tmp_path / "run", lora={"top_layers": 1},
                 contrastive={"chunk_size": 5})
    tr = Stage1Trainer(cfg, progress=False)
    summary = tr.run()
    assert summary["step"] == 4 and 0 <= summary["cra_R@1"] <= 1
    # (the trainer's encoder was merged in export; rebuild the training path from the adapter)
    enc = CaptionEncoder.from_pretrained(tmp_path / "run" / "encoder")
    base = CaptionEncoder.from_config(LLMEncoderConfig(model=str(tiny_llm_dir)))
    assert enc.identity()["weight_hash"] != base.identity()["weight_hash"]
    train_path = CaptionEncoder.from_config(LLMEncoderConfig(model=str(tiny_llm_dir),
                                                             adapters=[str(tmp_path / "run" / "adapter")]))
    torch.testing.assert_close(enc.encode(CAPS), train_path.encode(CAPS), atol=1e-5, rtol=1e-5)
    tr2 = Stage1Trainer(config(tiny_llm_dir, groups_file, tmp_path / "fresh", lora={"top_layers": 1}), progress=False)
    tr2.load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    tr2.peft.eval()
    with torch.no_grad():
        trained = tr2.embed_items(tr2.encoder.tokenize(CAPS))
    torch.testing.assert_close(trained, enc.encode(CAPS), atol=1e-5, rtol=1e-5)
    # a finished run is skipped
    assert Stage1Trainer(cfg, progress=False).run() == json.loads((tmp_path / "run" / "summary.json").read_text())


def test_mntp_then_contrastive_really_changes_weights(tiny_llm_dir, groups_file, tmp_path):
    m = config(tiny_llm_dir, groups_file, tmp_path / "mntp", objective="mntp", mntp={"block_size": 8, "batch_size": 4},
               optim={"lr": 1e-2})
    Stage1Trainer(m, progress=False).run()
    metrics = [json.loads(ln) for ln in (tmp_path / "mntp" / "metrics.jsonl").read_text().splitlines()]
    assert "perplexity" in metrics[-1] and "masked_accuracy" in metrics[-1]
    c = config(tiny_llm_dir, groups_file, tmp_path / "cc",
               encoder={"model": str(tiny_llm_dir), "adapters": [str(tmp_path / "mntp" / "adapter")]})
    tr = Stage1Trainer(c, progress=False)
    base = CaptionEncoder.from_config(LLMEncoderConfig(model=str(tiny_llm_dir)))
    assert tr.base_identity["weight_hash"] != base.identity()["weight_hash"]  # the MNTP adapter merged
    tr.run()
    final = CaptionEncoder.from_pretrained(tmp_path / "cc" / "encoder")
    assert final.identity()["adapters"] == ["adapter", "cc/adapter"]
    assert final.identity()["weight_hash"] not in (base.identity()["weight_hash"], tr.base_identity["weight_hash"])


def _write_yaml(cfg: FinetuneConfig, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return path


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def test_resume_after_kill_equals_uninterrupted(tiny_llm_dir, groups_file, tmp_path):
    over = dict(optim={"steps": 8}, save_every=1, lora={"dropout": 0.1}, contrastive={"chunk_size": 6})
    full = config(tiny_llm_dir, groups_file, tmp_path / "full", **over)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run: bitwise equality needs the same kernels' reductions
    try:
        Stage1Trainer(full, progress=False).run()
    finally:
        torch.set_num_threads(threads)
    killed = config(tiny_llm_dir, groups_file, tmp_path / "killed", **over)
    y = _write_yaml(killed, tmp_path / "killed.yaml")
    cmd = [sys.executable, "-m", "llm2clip", "finetune-text", str(y)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ck.glob("step_0000000[3-7]/train_state.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "encoder").exists()
    steps_done = latest_checkpoint(ck).name
    assert subprocess.run(cmd, env=_env(), capture_output=True).returncode == 0
    a, b = lora_state(tmp_path / "full"), lora_state(tmp_path / "killed")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), (n, steps_done)


def test_two_processes_equal_one(tiny_llm_dir, groups_file, tmp_path):
    over = dict(optim={"steps": 2}, lora={"dropout": 0.0}, contrastive={"batch_size": 8, "chunk_size": 5},
                save_every=1)
    one = config(tiny_llm_dir, groups_file, tmp_path / "one", **over)
    Stage1Trainer(one, progress=False).run()
    two = config(tiny_llm_dir, groups_file, tmp_path / "two", **over)
    y = _write_yaml(two, tmp_path / "two.yaml")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        "-m", "llm2clip", "finetune-text", str(y)], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1[:2], m2[:2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a, b = lora_state(tmp_path / "one"), lora_state(tmp_path / "two")
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-4)


def test_config_errors(tiny_llm_dir, groups_file, tmp_path):
    from llm2clip.config import load_config
    from llm2clip.errors import ConfigError

    f = tmp_path / "bad.yaml"
    f.write_text(f"encoder:\n  model: {tiny_llm_dir}\nout: x\nobjective: simcse\nlora:\n  r: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, FinetuneConfig)
    assert "bad.yaml:4: objective" in str(e.value) and "bad.yaml:6: lora.r" in str(e.value)
    # bf16_linears rounds weights: refused before training, not at the final save
    with pytest.raises(ValueError, match="encoder.bf16_linears 'mlp': stage 1 trains and saves"):
        config(tiny_llm_dir, groups_file, tmp_path / "d", encoder={"bf16_linears": "mlp"})
    with pytest.raises(ConfigError, match="larger than the number of groups"):
        Stage1Trainer(config(tiny_llm_dir, groups_file, tmp_path / "big", contrastive={"batch_size": 64}),
                      progress=False).train_step()


def test_plain_text_is_mixed_in_as_unsupervised_pairs(tiny_llm_dir, groups_file, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red dog on the left\n\nthe blue car is big\n")
    tr = Stage1Trainer(config(tiny_llm_dir, groups_file, tmp_path / "mix", data={"text": [str(corpus)]}),
                       progress=False)
    text_groups = [g for g in tr.sampler.groups if g.group.startswith("text:")]
    assert [g.captions for g in text_groups] == [["a red dog on the left"] * 2, ["the blue car is big"] * 2]
    assert len(tr.sampler.groups) == 36 + 2


# ------------------------------------------------------------------------- resume rule
def test_finetune_text_resumes_by_default(monkeypatch, tmp_path):
    import argparse

    from llm2clip.finetune import cli, trainer

    seen = []

    class FakeTrainer:
        def __init__(self, cfg, progress=None):
            pass

        def run(self, resume=True):
            seen.append(resume)
            return {}

    monkeypatch.setattr(trainer, "Stage1Trainer", FakeTrainer)
    y = tmp_path / "c.yaml"
    y.write_text("encoder:\n  model: x\n  device: cpu\nout: run\n")
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    for argv in (["finetune-text", str(y)], ["finetune-text", str(y), "--no-resume"]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    assert seen == [True, False]


def test_starting_over_clears_the_earlier_run(tiny_llm_dir, groups_file, tmp_path):
    """--no-resume on an unfinished folder: step 0, and the old run's checkpoints and metrics are gone (a
    stale step-4 checkpoint would otherwise outrank the new ones and be resumed later)."""
    out = tmp_path / "run"
    Stage1Trainer(config(tiny_llm_dir, groups_file, out), progress=False).run()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004"]
    for p in ("encoder", "adapter"):  # as if killed before the export
        shutil.rmtree(out / p)
    (out / "summary.json").unlink()
    short = config(tiny_llm_dir, groups_file, out, optim={"steps": 2})
    assert Stage1Trainer(short, progress=False).run(resume=False)["step"] == 2
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # the final evaluation is logged as its own row


def test_a_checkpoint_holding_pickled_objects_is_refused_unread(tiny_llm_dir, groups_file, tmp_path):
    out = tmp_path / "run"
    ck = out / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    write_pickle_bomb(ck / "train_state.pt", marker)
    with pytest.raises(InputError, match=r"step_00000002/train_state\.pt: refused"):
        Stage1Trainer(config(tiny_llm_dir, groups_file, out), progress=False).run()
    assert not marker.exists()


def test_frozen_weights_in_bf16_halve_their_memory_and_keep_lora_in_fp32(tiny_llm_dir, groups_file, tmp_path):
    """optim.frozen_dtype bfloat16: the base LLM is stored in bf16 (half the bytes), the LoRA weights that
    train stay fp32, training runs and exports an encoder; it needs bf16 precision."""
    def frozen_bytes(tr):
        return sum(p.numel() * p.element_size() for p in tr.peft.parameters() if not p.requires_grad)

    fp32 = Stage1Trainer(config(tiny_llm_dir, groups_file, tmp_path / "a", lora={"top_layers": 1},
                                optim={"precision": "bf16"}), progress=False)
    half = Stage1Trainer(config(tiny_llm_dir, groups_file, tmp_path / "b", lora={"top_layers": 1},
                                optim={"precision": "bf16", "frozen_dtype": "bfloat16"}), progress=False)
    assert frozen_bytes(half) * 2 == frozen_bytes(fp32)
    assert {p.dtype for p in half.params} == {torch.float32}
    assert {p.dtype for p in half.peft.parameters() if not p.requires_grad} == {torch.bfloat16}
    summary = half.run()
    assert summary["step"] == 4 and 0 <= summary["cra_R@1"] <= 1
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    b = [t for k, t in lora.items() if "lora_B" in k]  # zero at initialisation: trained if not
    assert b and all(t.dtype == torch.float32 for t in b) and any(t.abs().sum() > 0 for t in b)
    enc = CaptionEncoder.from_pretrained(tmp_path / "b" / "encoder")
    assert torch.isfinite(enc.encode(CAPS)).all()
    with pytest.raises(ValueError, match="frozen_dtype bfloat16 needs optim.precision bf16"):
        config(tiny_llm_dir, groups_file, tmp_path / "c", optim={"frozen_dtype": "bfloat16"})
