"""The caption encoder: bidirectionality, padding invariance, pooling, templates, errors."""

import math

import pytest
import torch
from tiny import make_encoder as make

from llm2clip.errors import ConfigError, InputError
from llm2clip.text import CaptionEncoder
from llm2clip.text.attention import attention_inputs
from llm2clip.text.pooling import pool

CAPTIONS = [
    "a red dog on the left of a blue car .",
    "two cat",
    "a small green circle above a large yellow square , near the bottom",
    "fish",
]




def token_states(enc, ids, bidirectional=None):
    """Last hidden states of one unpadded token sequence."""
    b = enc.collate([type("T", (), {"ids": ids, "pool_start": 0, "pool_end": len(ids)})()])
    if bidirectional is not None:
        enc.config.bidirectional = bidirectional
    with torch.no_grad():
        return enc.hidden_states(b)[0]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_later_token_changes_earlier_output_only_when_bidirectional(tiny_llm_dir, bidirectional):
    enc = make(tiny_llm_dir, bidirectional=bidirectional)
    ids = enc.tokenize(["a red dog on the left"])[0].ids
    other = list(ids)
    other[-1] = enc.tokenizer.convert_tokens_to_ids("cat")
    h1, h2 = token_states(enc, ids), token_states(enc, other)
    first_changed = (h1[0] - h2[0]).abs().max().item()
    if bidirectional:
        assert first_changed > 1e-4
    else:
        assert first_changed < 1e-6
    assert (h1[-1] - h2[-1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_never_changes_the_embedding(tiny_family_dirs, family, bidirectional):
    enc = make(tiny_family_dirs[family], bidirectional=bidirectional, template="tokenizer", instruction="find a photo")
    items = enc.tokenize(CAPTIONS)
    alone = [enc.forward(enc.collate([it])) for it in items]
    with torch.no_grad():
        left = enc.forward(enc.collate(items, "left"))
        right = enc.forward(enc.collate(items, "right"))
    for i in range(len(items)):
        torch.testing.assert_close(left[i], alone[i][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(right[i], alone[i][0], atol=1e-5, rtol=1e-5)
    # encode() sorts by length and batches; the result comes back in input order
    torch.testing.assert_close(enc.encode(CAPTIONS, batch_size=3), torch.stack([a[0] for a in alone]), atol=1e-5,
                               rtol=1e-5)


def _reference_llama(model, ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain PyTorch Llama forward of one unpadded sequence, independent of transformers' code."""
    cfg = model.config
    sd = {k: v.float() for k, v in model.state_dict().items()}
    T, H, KV = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    x = sd["embed_tokens.weight"][ids]
    bias = torch.zeros(T, T) if not causal else torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(T, H, d).transpose(0, 1)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(T, KV, d).transpose(0, 1)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(T, KV, d).transpose(0, 1)
        k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        a = torch.softmax(rot(q) @ rot(k).transpose(1, 2) / math.sqrt(d) + bias, -1) @ v
        x = x + a.transpose(0, 1).reshape(T, H * d) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
        x = x + g @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["norm.weight"])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_equals_independent_plain_pytorch_llama(tiny_llm_dir, bidirectional):
    enc = make(tiny_llm_dir, bidirectional=bidirectional, attn_implementation="eager")
    items = enc.tokenize(CAPTIONS)
    batch = enc.collate(items)  # left padded: the reference sees each caption alone, unpadded
    with torch.no_grad():
        hidden = enc.hidden_states(batch)
    for b, it in enumerate(items):
        ref = _reference_llama(enc.model, torch.tensor(it.ids), causal=not bidirectional)
        torch.testing.assert_close(hidden[b, -len(it.ids):], ref, atol=1e-4, rtol=1e-4)


def test_sdpa_and_eager_agree(tiny_llm_dir):
    a = make(tiny_llm_dir, attn_implementation="sdpa").encode(CAPTIONS)
    b = make(tiny_llm_dir, attn_implementation="eager").encode(CAPTIONS)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_mask_hides_padding_keys_only():
    tm = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = attention_inputs(tm, bidirectional=True, dtype=torch.float32)
    m = out["attention_mask"]
    assert m.shape == (2, 1, 4, 4)
    assert (m[0, 0, 2:, :2] < -1e30).all() and (m[0, 0, 2:, 2:] == 0).all()
    assert (m[1] == 0).all()
    assert out["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    causal = attention_inputs(tm, bidirectional=False, dtype=torch.float32)["attention_mask"]
    assert causal[1, 0, 0, 1] < -1e30 and causal[1, 0, 1, 0] == 0


def test_pooling_modes_against_manual():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 3)
    tok = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pm = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(pool(h, pm, tok, "mean")[0], h[0, 2:].mean(0))
    torch.testing.assert_close(pool(h, pm, tok, "mean")[1], h[1, 1:3].mean(0))
    w = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(pool(h, pm, tok, "weighted_mean")[0], (h[0, 2:] * w[:, None]).sum(0) / 6)
    torch.testing.assert_close(pool(h, pm, tok, "last_token"), h[:, -1])
    torch.testing.assert_close(pool(h, pm, tok, "first_token"), torch.stack([h[0, 1], h[1, 0]]))


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last_token", "first_token"])
def test_every_pooling_mode_is_padding_invariant(tiny_llm_dir, pooling):
    enc = make(tiny_llm_dir, pooling=pooling)
    batched = enc.encode(CAPTIONS, batch_size=4)
    alone = torch.cat([enc.encode([c]) for c in CAPTIONS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def tokens(enc, caption):
    it = enc.tokenize([caption])[0]
    toks = enc.tokenizer.convert_ids_to_tokens(it.ids)
    return toks, toks[it.pool_start : it.pool_end]


def test_exact_token_sequences_per_template(tiny_llm_dir):
    toks, pooled = tokens(make(tiny_llm_dir), "a red dog")
    assert toks == ["<s>", "a", "red", "dog"] and pooled == ["a", "red", "dog"]

    toks, pooled = tokens(make(tiny_llm_dir, template="tokenizer", instruction=" find a photo "), "a red dog")
    assert toks == ["<s>", "<|user|>", "<unk>", "a", "photo", ";", "a", "red", "dog", "<|end|>"]
    assert pooled == ["a", "red", "dog", "<|end|>"]

    enc = make(tiny_llm_dir, template="tokenizer", pool_template_suffix=False)
    assert tokens(enc, "a red dog")[1] == ["a", "red", "dog"]


def test_llama3_user_turn_template(tiny_llm_dir):
    from llm2clip.text.template import LLAMA3_USER_HEAD, LLAMA3_USER_TAIL

    enc = make(tiny_llm_dir, template="llama3")
    assert enc.prompt.prefix_text == "<|start_header_id|>user<|end_header_id|>\n\n" == LLAMA3_USER_HEAD
    assert enc.prompt.suffix_text == "<|eot_id|>" == LLAMA3_USER_TAIL
    assert enc.identity()["template"] == "llama3"


def test_truncation_is_counted_and_keeps_the_template(tiny_llm_dir):
    enc = make(tiny_llm_dir, template="tokenizer", max_length=8)
    long = " ".join(["red"] * 20)
    it = enc.tokenize([long])[0]
    toks = enc.tokenizer.convert_ids_to_tokens(it.ids)
    assert len(it.ids) == 8 and toks[-1] == "<|end|>" and it.truncated
    enc.encode([long, "a dog", long])
    assert enc.truncated_count == 2
    with pytest.raises(ConfigError, match="max_length"):
        make(tiny_llm_dir, template="tokenizer", instruction="red " * 10, max_length=8)


@pytest.mark.parametrize("bad, msg", [(["a dog", ""], "caption 1: empty"),
                                      (["a dog", 3], "caption 1: expected a string"),
                                      (["a dog", "   "], "caption 1: empty")])
def test_bad_captions_name_their_index(tiny_llm_dir, bad, msg):
    with pytest.raises(InputError, match=msg):
        make(tiny_llm_dir).encode(bad)


def test_zero_token_caption_is_an_error_not_nan(tiny_llm_dir, tmp_path):

    # A tokenizer without <unk> fallback that drops unknown characters would give zero tokens;
    # emulate with a tokenizer call that returns no ids.
    enc = make(tiny_llm_dir)
    real = enc.tokenizer.__call__

    def drop_all(texts, **kw):
        out = real(texts, **kw)
        out["input_ids"] = [ids if t.strip() != "fish" else [] for t, ids in zip(texts, out["input_ids"])]
        return out

    enc.tokenizer = type("Tok", (), {"__call__": staticmethod(drop_all)})()
    with pytest.raises(InputError, match="caption 1: encodes to zero tokens"):
        enc.tokenize(["a dog", "fish"])


def test_bf16_is_close_to_fp32(tiny_llm_dir):
    a = make(tiny_llm_dir).encode(CAPTIONS)
    b = make(tiny_llm_dir, dtype="bfloat16").encode(CAPTIONS)
    assert b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert (cos > 0.99).all()


def test_save_and_reload_gives_identical_embeddings(tiny_llm_dir, tmp_path):
    enc = make(tiny_llm_dir, template="tokenizer", instruction="find a photo", pooling="weighted_mean")
    enc.save(tmp_path / "enc")
    again = CaptionEncoder.from_pretrained(tmp_path / "enc")
    assert again.config.pooling == "weighted_mean" and again.config.instruction == "find a photo"
    assert again.identity() == enc.identity()
    torch.testing.assert_close(again.encode(CAPTIONS), enc.encode(CAPTIONS))


def _lora_adapter(model_dir, out, on_causal_lm: bool, nonzero: bool = True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    base = (AutoModelForCausalLM if on_causal_lm else AutoModel).from_pretrained(model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if nonzero:
        torch.manual_seed(1)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)
    peft.save_pretrained(out)
    return out


def test_lora_adapter_merges_and_changes_embeddings(tiny_llm_dir, tmp_path):
    plain = make(tiny_llm_dir)
    adapter = _lora_adapter(tiny_llm_dir, tmp_path / "lora", on_causal_lm=False)
    merged = make(tiny_llm_dir, adapters=[str(adapter)])
    assert merged.identity()["weight_hash"] != plain.identity()["weight_hash"]
    assert merged.identity()["adapters"] == ["lora"]
    assert (merged.encode(CAPTIONS) - plain.encode(CAPTIONS)).abs().max() > 1e-3


def test_lora_adapter_with_mismatched_keys_is_an_error(tiny_llm_dir, tmp_path):
    # Trained on the LM-head model (keys model.layers...), merged into the body: the official
    # stage-1 bug where PEFT warns and silently merges nothing.
    adapter = _lora_adapter(tiny_llm_dir, tmp_path / "lora-lm", on_causal_lm=True)
    with pytest.raises(ConfigError, match="changed no weight"):
        make(tiny_llm_dir, adapters=[str(adapter)])


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ConfigError, match="model path not found"):
        make("./does/not/exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        make(tmp_path / "empty")
    with pytest.raises(ConfigError, match="GGUF file not found"):
        make(tmp_path / "x.gguf")


# ----------------------------------------------------------------------------- loading dtype, weight hash
def _old_weight_hash(module) -> str:
    """The hash as it was before half-precision models were hashed chunk by chunk (fp32 models must keep it)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_bf16_encoder_is_loaded_in_bf16_and_keeps_its_fp32_identity(tiny_llm_dir, tmp_path, monkeypatch):
    # An 8B encoder loaded in fp32 then cast holds 32 GB per process: the weights must arrive in bf16, and
    # the identity (which stores and models pin, whatever the dtype) must still be the fp32 weights' hash.
    from llm2clip.text import loading

    loads = []
    real_load = loading.load_base_model

    def load(*a, **kw):
        loads.append(kw.get("dtype"))
        return real_load(*a, **kw)

    monkeypatch.setattr(loading, "load_base_model", load)
    fp32 = make(tiny_llm_dir)
    bf16 = make(tiny_llm_dir, dtype="bfloat16")  # the tiny model's files are fp32: bf16 loses bits
    assert loads == [torch.float32, torch.bfloat16]
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.identity()["weight_hash"] == fp32.identity()["weight_hash"]
    # a sharded checkpoint (index + several files), as the 8B ships, hashes the same
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_llm_dir).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    bf16.tokenizer.save_pretrained(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert make(tmp_path / "sharded", dtype="bfloat16").identity()["weight_hash"] == fp32.identity()["weight_hash"]
    # with adapters the merge is done in fp32 (its hash is the fp32 merge's), then cast
    adapter = str(_lora_adapter(tiny_llm_dir, tmp_path / "lora", on_causal_lm=False))
    loads.clear()
    merged = make(tiny_llm_dir, dtype="bfloat16", adapters=[adapter])
    assert loads == [torch.float32] and next(merged.model.parameters()).dtype == torch.bfloat16
    assert merged.identity()["weight_hash"] == make(tiny_llm_dir, adapters=[adapter]).identity()["weight_hash"]


def test_weight_hash_of_fp32_is_unchanged_and_bf16_hashes_as_its_fp32_values():
    from llm2clip.text.loading import weight_hash

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.Embedding(5, 3))
    m.register_buffer("steps", torch.arange(4))
    assert weight_hash(m) == _old_weight_hash(m)
    half = m.to(torch.bfloat16)
    up = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.Embedding(5, 3))
    up.register_buffer("steps", torch.arange(4))
    up.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.state_dict().items()})
    assert weight_hash(half) == weight_hash(up) == _old_weight_hash(up)
    with torch.no_grad():
        half[0].weight[0, 0] += 1
    assert weight_hash(half) != weight_hash(up)


def test_weight_hash_never_copies_a_whole_tensor(monkeypatch, tmp_path):
    # Every tensor the hash makes is watched: none may be an fp32 (or any) copy larger than one chunk.
    from torch.utils._python_dispatch import TorchDispatchMode

    from llm2clip.text import loading

    monkeypatch.setattr(loading, "HASH_CHUNK", 1000)
    biggest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                    biggest.append(t.untyped_storage().nbytes())
            return out

    from safetensors.torch import save_file

    fp32 = torch.nn.Linear(300, 200)  # 60,000 values: 60 chunks
    save_file(fp32.state_dict(), str(tmp_path / "model.safetensors"))
    model = torch.nn.Linear(300, 200).to(torch.bfloat16)
    owned = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    with Watch():
        digest = loading.weight_hash(model)
        from_files = loading.source_weight_hash(model, tmp_path)  # read from fp32 files, rows at a time
    assert max(biggest) <= 1000 * 4  # one chunk in fp32
    assert from_files == loading.weight_hash(fp32)
    monkeypatch.setattr(loading, "HASH_CHUNK", 1 << 22)
    assert loading.weight_hash(model) == digest  # chunking does not change the hash
    assert loading.source_weight_hash(model, tmp_path) == from_files


@pytest.mark.parametrize("path", ["configs/x/../enc", "runs/own/stage1/encoder", "./enc", "~/enc"])
def test_a_missing_local_model_path_is_not_taken_for_a_hub_id(path):
    from llm2clip.text.loading import resolve_source

    with pytest.raises(ConfigError, match="model path not found"):
        resolve_source(path)
    assert resolve_source("owner/name").path == "owner/name"  # a hub id is passed on to the hub
