"""Importing the official checkpoints: tiny state dicts written with the official key layout are converted,
and our model's outputs are checked against forwards computed by hand from the raw tensors."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llm2clip.convert import convert_official_clip, convert_official_llm, resolve_vision
from llm2clip.convert.cli import add_commands
from llm2clip.convert.keymaps import official_adapter_to_ours, vision_geometry
from llm2clip.errors import ConfigError
from llm2clip.model import LLM2CLIP, TextAdapter

# tiny geometry of the official-layout checkpoints
EVA = dict(image=24, patch=4, width=32, depth=2, heads=2, pt=4)  # 6x6 grid, RoPE interpolated from 4x4
OAI = dict(image=16, patch=4, width=32, depth=2, heads=2)
EMBED, LLM_DIM = 24, 20


@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    """Tiny architectures in our registry: an EVA02-CLIP-style timm Eva behind open_clip, and an
    OpenAI-architecture open_clip ViT."""
    import open_clip
    import timm
    from timm.models import register_model
    from timm.models.eva import Eva

    if "test_tiny_eva02_clip" not in timm.list_models():

        @register_model
        def test_tiny_eva02_clip(pretrained=False, **kw):
            for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kw.pop(k, None)
            # the flags of timm's eva02_*_clip_* models, at tiny size
            args = dict(img_size=EVA["image"], patch_size=EVA["patch"], embed_dim=EVA["width"], depth=EVA["depth"],
                        num_heads=EVA["heads"], mlp_ratio=4 * 2 / 3, qkv_fused=False, swiglu_mlp=True,
                        scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                        ref_feat_shape=(EVA["pt"], EVA["pt"]))
            return Eva(**{**args, **kw})

    d = tmp_path_factory.mktemp("oc-archs")
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    (d / "test-tiny-EVA02-CLIP.json").write_text(json.dumps(
        {"embed_dim": EMBED, "vision_cfg": {"image_size": EVA["image"], "timm_model_name": "test_tiny_eva02_clip",
                                            "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
         "text_cfg": text, "custom_text": True}))
    (d / "test-tiny-ViT-oai.json").write_text(json.dumps(
        {"embed_dim": EMBED, "vision_cfg": {"image_size": OAI["image"], "layers": OAI["depth"], "width": OAI["width"],
                                            "patch_size": OAI["patch"], "head_width": OAI["width"] // OAI["heads"]},
         "text_cfg": text}))
    open_clip.add_model_config(d)
    return d


# ------------------------------------------------------------------ official-layout state dicts
def _t(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def _ln(g, prefix, dim):
    return {f"{prefix}.weight": 1 + _t(g, dim, scale=0.1), f"{prefix}.bias": _t(g, dim, scale=0.1)}


def _lin(g, prefix, dout, din, bias=True):
    out = {f"{prefix}.weight": _t(g, dout, din, scale=din ** -0.5)}
    if bias:
        out[f"{prefix}.bias"] = _t(g, dout, scale=0.05)
    return out


def eva_rope(head_dim, ft, pt):
    """EVA-CLIP's VisionRotaryEmbeddingFast tables [ft*ft, head_dim], written from its formula."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(ft) / ft * pt
    f = torch.repeat_interleave(torch.outer(t, freqs), 2, dim=-1)  # [ft, dim], pairs interleaved
    grid = torch.cat([f[:, None, :].expand(ft, ft, dim), f[None, :, :].expand(ft, ft, dim)], dim=-1)
    return grid.cos().reshape(ft * ft, head_dim), grid.sin().reshape(ft * ft, head_dim)


def official_eva_visual(g, embed=EMBED):
    W, n = EVA["width"], EVA["image"] // EVA["patch"]
    hidden = int(W * 4 * 2 / 3)
    cos, sin = eva_rope(W // EVA["heads"], n, EVA["pt"])
    sd = {"patch_embed.proj.weight": _t(g, W, 3, EVA["patch"], EVA["patch"]), "patch_embed.proj.bias": _t(g, W),
          "cls_token": _t(g, 1, 1, W), "pos_embed": _t(g, 1, n * n + 1, W),
          "rope.freqs_cos": cos, "rope.freqs_sin": sin, **_ln(g, "norm", W), **_lin(g, "head", embed, W)}
    for i in range(EVA["depth"]):
        b = f"blocks.{i}."
        sd.update({**_ln(g, b + "norm1", W), **_ln(g, b + "norm2", W), **_ln(g, b + "attn.inner_attn_ln", W),
                   **_lin(g, b + "attn.q_proj", W, W, bias=False), **_lin(g, b + "attn.k_proj", W, W, bias=False),
                   **_lin(g, b + "attn.v_proj", W, W, bias=False), b + "attn.q_bias": _t(g, W),
                   b + "attn.v_bias": _t(g, W), **_lin(g, b + "attn.proj", W, W),
                   b + "attn.rope.freqs_cos": cos, b + "attn.rope.freqs_sin": sin,
                   **_lin(g, b + "mlp.w1", hidden, W), **_lin(g, b + "mlp.w2", hidden, W),
                   **_ln(g, b + "mlp.ffn_ln", hidden), **_lin(g, b + "mlp.w3", W, hidden)})
    return sd


def official_openai_visual(g, embed=EMBED):
    W, n = OAI["width"], OAI["image"] // OAI["patch"]
    sd = {"conv1.weight": _t(g, W, 3, OAI["patch"], OAI["patch"]), "class_embedding": _t(g, W),
          "positional_embedding": _t(g, n * n + 1, W), **_ln(g, "ln_pre", W), **_ln(g, "ln_post", W),
          "proj": _t(g, W, embed, scale=W ** -0.5)}
    for i in range(OAI["depth"]):
        b = f"transformer.resblocks.{i}."
        sd.update({**_ln(g, b + "ln_1", W), **_ln(g, b + "ln_2", W), b + "attn.in_proj_weight": _t(g, 3 * W, W),
                   b + "attn.in_proj_bias": _t(g, 3 * W, scale=0.05), **_lin(g, b + "attn.out_proj", W, W),
                   **_lin(g, b + "mlp.c_fc", 4 * W, W), **_lin(g, b + "mlp.c_proj", W, 4 * W)})
    return sd


def official_adapter(g, dim=LLM_DIM, embed=EMBED, depth=4):
    sd = {}
    for i in range(depth):
        sd.update({**_ln(g, f"text_adaptor.{i}.ln", dim), **_lin(g, f"text_adaptor.{i}.fn.0", 2 * dim, dim),
                   **_lin(g, f"text_adaptor.{i}.fn.3", dim, 2 * dim)})
    sd.update({**_ln(g, f"text_adaptor.{depth}", dim), **_lin(g, f"text_adaptor.{depth + 1}", embed, dim)})
    return sd


def official_ckpt(path, visual, text, logit_scale=3.9, dtype=torch.float16):
    sd = {**{f"visual.{k}": v for k, v in visual.items()}, **{f"text.{k}": v for k, v in text.items()},
          "logit_scale": torch.tensor(logit_scale)}
    torch.save({k: v.to(dtype) for k, v in sd.items()}, path)
    return {k: v.to(dtype).float() for k, v in sd.items()}  # what the file holds, for the hand forwards


# ------------------------------------------------------------------ forwards written from the raw tensors
def adapter_by_hand(sd, x):
    p = lambda k: sd["text.text_adaptor." + k]
    depth = sum(1 for k in sd if k.startswith("text.text_adaptor.") and k.endswith(".fn.0.weight"))
    h = F.normalize(x, dim=-1)
    for i in range(depth):
        z = F.layer_norm(h, h.shape[-1:], p(f"{i}.ln.weight"), p(f"{i}.ln.bias"))
        h = h + F.linear(F.gelu(F.linear(z, p(f"{i}.fn.0.weight"), p(f"{i}.fn.0.bias"))),
                         p(f"{i}.fn.3.weight"), p(f"{i}.fn.3.bias"))
    h = F.layer_norm(h, h.shape[-1:], p(f"{depth}.weight"), p(f"{depth}.bias"))
    return F.linear(h, p(f"{depth + 1}.weight"), p(f"{depth + 1}.bias"))


def _attend(q, k, v):
    a = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return a.softmax(-1) @ v


def eva_by_hand(sd, x):
    """EVA-CLIP's EVAVisionTransformer (subln, naive SwiGLU, RoPE on patch tokens, CLS after norm) + head."""
    p = lambda k: sd["visual." + k]
    W, H, eps = EVA["width"], EVA["heads"], 1e-6
    ln = lambda t, k: F.layer_norm(t, t.shape[-1:], p(k + ".weight"), p(k + ".bias"), eps)
    t = F.conv2d(x, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=EVA["patch"])
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([p("cls_token").expand(len(x), -1, -1), t], 1) + p("pos_embed")
    # the RoPE tables from the formula: the stored ones went through fp16 with the rest of the file
    cos, sin = eva_rope(W // H, EVA["image"] // EVA["patch"], EVA["pt"])

    def rope(z):  # interleaved pairs: (a, b) -> (-b, a)
        rot = torch.stack([-z[..., 1::2], z[..., ::2]], -1).flatten(-2)
        return torch.cat([z[:, :, :1], z[:, :, 1:] * cos + rot[:, :, 1:] * sin], 2)

    B, N = t.shape[:2]
    heads = lambda z: z.view(B, N, H, W // H).transpose(1, 2)
    for i in range(EVA["depth"]):
        b = f"blocks.{i}."
        h = ln(t, b + "norm1")
        q = heads(F.linear(h, p(b + "attn.q_proj.weight"), p(b + "attn.q_bias")))
        k = heads(F.linear(h, p(b + "attn.k_proj.weight")))
        v = heads(F.linear(h, p(b + "attn.v_proj.weight"), p(b + "attn.v_bias")))
        a = _attend(rope(q), rope(k), v).transpose(1, 2).reshape(B, N, W)
        t = t + F.linear(ln(a, b + "attn.inner_attn_ln"), p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        h = ln(t, b + "norm2")
        m = F.silu(F.linear(h, p(b + "mlp.w1.weight"), p(b + "mlp.w1.bias"))) * \
            F.linear(h, p(b + "mlp.w2.weight"), p(b + "mlp.w2.bias"))
        t = t + F.linear(ln(m, b + "mlp.ffn_ln"), p(b + "mlp.w3.weight"), p(b + "mlp.w3.bias"))
    return F.linear(ln(t, "norm")[:, 0], p("head.weight"), p("head.bias"))


def openai_by_hand(sd, x):
    """OpenAI CLIP ViT (pre-LN, QuickGELU, CLS after ln_post) then ``@ proj``."""
    p = lambda k: sd["visual." + k]
    W, H = OAI["width"], OAI["heads"]
    ln = lambda t, k: F.layer_norm(t, t.shape[-1:], p(k + ".weight"), p(k + ".bias"))
    t = F.conv2d(x, p("conv1.weight"), stride=OAI["patch"]).flatten(2).transpose(1, 2)
    t = torch.cat([p("class_embedding").expand(len(x), 1, -1), t], 1) + p("positional_embedding")
    t = ln(t, "ln_pre")
    B, N = t.shape[:2]
    heads = lambda z: z.view(B, N, H, W // H).transpose(1, 2)
    for i in range(OAI["depth"]):
        b = f"transformer.resblocks.{i}."
        q, k, v = F.linear(ln(t, b + "ln_1"), p(b + "attn.in_proj_weight"), p(b + "attn.in_proj_bias")).chunk(3, -1)
        a = _attend(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(B, N, W)
        t = t + F.linear(a, p(b + "attn.out_proj.weight"), p(b + "attn.out_proj.bias"))
        m = F.linear(ln(t, b + "ln_2"), p(b + "mlp.c_fc.weight"), p(b + "mlp.c_fc.bias"))
        t = t + F.linear(m * torch.sigmoid(1.702 * m), p(b + "mlp.c_proj.weight"), p(b + "mlp.c_proj.bias"))
    return ln(t, "ln_post")[:, 0] @ p("proj")


TINY_EVA_VISION = {"kind": "open_clip", "name": "test-tiny-EVA02-CLIP"}
TINY_OAI_VISION = {"kind": "open_clip", "name": "test-tiny-ViT-oai", "quick_gelu": True}
TINY_HF_VISION = {"kind": "hf_clip", "config": dict(
    hidden_size=OAI["width"], intermediate_size=4 * OAI["width"], num_hidden_layers=OAI["depth"],
    num_attention_heads=OAI["heads"], image_size=OAI["image"], patch_size=OAI["patch"], hidden_act="quick_gelu")}


# ------------------------------------------------------------------ tests: CLIP checkpoints
def test_adapter_keymap_equals_hand_forward():
    g = torch.Generator().manual_seed(0)
    text = official_adapter(g)
    ours, shape = official_adapter_to_ours(text)
    assert (shape.in_dim, shape.out_dim, shape.depth, shape.expansion) == (LLM_DIM, EMBED, 4, 2)
    a = TextAdapter(shape.in_dim, shape.out_dim, shape.depth, shape.expansion)
    a.load_state_dict(ours, strict=True)
    x = torch.randn(5, LLM_DIM) * 3
    with torch.no_grad():
        assert torch.allclose(a(x), adapter_by_hand({"text." + k: v for k, v in text.items()}, x), atol=1e-5)


def test_eva_checkpoint_converts_to_our_model(tiny_archs, tmp_path):
    g = torch.Generator().manual_seed(1)
    raw = official_ckpt(tmp_path / "eva.pt", official_eva_visual(g), official_adapter(g), logit_scale=4.2)
    convert_official_clip(tmp_path / "eva.pt", tmp_path / "model", vision=TINY_EVA_VISION)
    m = LLM2CLIP.load(tmp_path / "model")
    assert type(m.visual.visual.trunk).__name__ == "Eva" and m.text.l2_norm
    x = torch.randn(3, 3, EVA["image"], EVA["image"], generator=g)
    e = torch.randn(3, LLM_DIM, generator=g) * 4
    with torch.no_grad():
        assert torch.allclose(m.encode_image(x, normalize=False), eva_by_hand(raw, x), atol=1e-5)
        assert torch.allclose(m.encode_text(e, normalize=False), adapter_by_hand(raw, e), atol=1e-5)
    assert math.isclose(float(m.logit_scale.detach()), float(raw["logit_scale"]), rel_tol=1e-6)
    record = json.loads((tmp_path / "model" / "llm2clip_conversion.json").read_text())
    assert record["vision_layout"] == "eva" and "visual.rope.freqs_cos" in record["dropped_keys"]
    assert "visual.blocks.0.attn.rope.freqs_sin" in record["dropped_keys"]


@pytest.mark.parametrize("vision", [TINY_OAI_VISION, TINY_HF_VISION], ids=["open_clip", "hf_clip"])
def test_openai_checkpoint_converts_to_our_model(tiny_archs, tmp_path, vision):
    g = torch.Generator().manual_seed(2)
    raw = official_ckpt(tmp_path / "oai.pt", official_openai_visual(g), official_adapter(g), dtype=torch.float32)
    convert_official_clip(tmp_path / "oai.pt", tmp_path / "model", vision=vision)
    m = LLM2CLIP.load(tmp_path / "model")
    x = torch.randn(2, 3, OAI["image"], OAI["image"], generator=g)
    with torch.no_grad():
        assert torch.allclose(m.encode_image(x, normalize=False), openai_by_hand(raw, x), atol=1e-5)
    assert torch.equal(m.head.bias, torch.zeros(EMBED))  # `x @ proj` has no bias


def test_vision_presets_are_picked_from_shapes():
    def geo(layout, width, layers, patch, image):
        n = (image // patch) ** 2 + 1
        if layout == "eva":
            sd = {"patch_embed.proj.weight": torch.empty(width, 3, patch, patch), "pos_embed": torch.empty(1, n, width)}
            sd.update({f"blocks.{i}.norm1.weight": torch.empty(1) for i in range(layers)})
        else:
            sd = {"conv1.weight": torch.empty(width, 3, patch, patch), "positional_embedding": torch.empty(n, width)}
            sd.update({f"transformer.resblocks.{i}.ln_1.weight": torch.empty(1) for i in range(layers)})
        return vision_geometry(sd)

    with torch.device("meta"):
        assert resolve_vision(None, geo("eva", 1024, 24, 14, 336)).name == "EVA02-L-14-336"
        assert resolve_vision(None, geo("eva", 768, 12, 16, 224)).name == "EVA02-B-16"
        v = resolve_vision(None, geo("openai", 1024, 24, 14, 336))
        assert v.name == "ViT-L-14-336" and v.quick_gelu
        with pytest.raises(ConfigError, match="matches no preset; pass --vision"):
            resolve_vision(None, geo("eva", 64, 3, 8, 64))
    assert resolve_vision("open_clip:ViT-B-32", geo("openai", 64, 1, 8, 16)).quick_gelu
    with pytest.raises(ConfigError, match="no preset"):
        resolve_vision("not-a-tower")


def test_mismatched_checkpoints_are_refused(tiny_archs, tmp_path, converted_llm):
    g = torch.Generator().manual_seed(3)
    # vision head and adapter disagree on the shared embedding size
    official_ckpt(tmp_path / "a.pt", official_eva_visual(g, embed=24), official_adapter(g, embed=16))
    with pytest.raises(ConfigError, match=r"vision head maps to 24-d, the text adapter to 16-d"):
        convert_official_clip(tmp_path / "a.pt", tmp_path / "a", vision=TINY_EVA_VISION)
    # adapter input vs the caption encoder's dim (the tiny LLM is 32-d)
    official_ckpt(tmp_path / "b.pt", official_eva_visual(g), official_adapter(g, dim=20))
    with pytest.raises(ConfigError, match=r"adapter takes 20-d caption embeddings .* makes 32-d"):
        convert_official_clip(tmp_path / "b.pt", tmp_path / "b", vision=TINY_EVA_VISION, caption_encoder=converted_llm)
    # EVA weights into an OpenAI-architecture tower
    with pytest.raises(ConfigError, match="need an open_clip EVA02 tower"):
        convert_official_clip(tmp_path / "b.pt", tmp_path / "c", vision=TINY_OAI_VISION)
    # RoPE tables for another head size: the architecture is wrong even though no weight shape says so
    sd = torch.load(tmp_path / "b.pt")
    for k in [k for k in sd if k.endswith(("freqs_cos", "freqs_sin"))]:
        sd[k] = torch.zeros(sd[k].shape[0], 8)
    torch.save(sd, tmp_path / "d.pt")
    with pytest.raises(ConfigError, match="8-d attention heads, the tower has 16-d heads"):
        convert_official_clip(tmp_path / "d.pt", tmp_path / "d", vision=TINY_EVA_VISION)
    # a stray key is named, not dropped
    sd = torch.load(tmp_path / "b.pt")
    sd["visual.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 2)
    torch.save(sd, tmp_path / "e.pt")
    with pytest.raises(ConfigError, match="relative_position_bias_table"):
        convert_official_clip(tmp_path / "e.pt", tmp_path / "e", vision=TINY_EVA_VISION)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # nothing half-written


def test_caption_encoder_is_pinned(tiny_archs, tmp_path, converted_llm):
    from llm2clip.text import CaptionEncoder

    g = torch.Generator().manual_seed(4)
    official_ckpt(tmp_path / "c.pt", official_eva_visual(g), official_adapter(g, dim=32))
    convert_official_clip(tmp_path / "c.pt", tmp_path / "model", vision=TINY_EVA_VISION, caption_encoder=converted_llm)
    enc = CaptionEncoder.from_pretrained(converted_llm)
    m = LLM2CLIP.load(tmp_path / "model", text_identity=enc.identity())
    assert m.text_identity == enc.identity()
    if hasattr(m, "caption_encoder_config"):  # the manifest also says how to rebuild the encoder
        assert m.caption_encoder_config["model"] == str(converted_llm.resolve())
    with pytest.raises(ConfigError, match="does not match"):
        LLM2CLIP.load(tmp_path / "model", text_identity={**enc.identity(), "pooling": "last_token"})
    m.attach_caption_encoder(enc)
    assert m.encode_text(["a red dog"]).shape == (1, EMBED)


def test_cli_convert_official_clip(tiny_archs, tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    official_ckpt(tmp_path / "eva.pt", official_eva_visual(g), official_adapter(g))
    (tmp_path / "vision.yaml").write_text("kind: open_clip\nname: test-tiny-EVA02-CLIP\n")
    parser = argparse.ArgumentParser(prog="llm2clip")
    add_commands(parser.add_subparsers(dest="command"))
    for argv in (["convert", "--help"], ["convert", "official-clip", "--help"], ["convert", "official-llm", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0
    assert "eva02-l-14-336" in capsys.readouterr().out
    args = parser.parse_args(["convert", "official-clip", str(tmp_path / "eva.pt"), "--vision",
                              str(tmp_path / "vision.yaml"), "--out", str(tmp_path / "m")])
    assert args.func(args) == 0
    assert LLM2CLIP.load(tmp_path / "m").config.vision.name == "test-tiny-EVA02-CLIP"
    with pytest.raises(ConfigError, match="not empty"):
        args.func(args)


# ------------------------------------------------------------------ tests: the caption-contrastive LLM
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def official_llm_dir(path, style: str = "bare"):
    """A tiny random Llama saved the way the released CC encoders are: a config.json whose auto_map and
    architectures name remote code (here a file that fails when imported)."""
    from tiny import tiny_config, tiny_tokenizer
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(0)
    tok = tiny_tokenizer(extra_words=("user",))
    tok.add_tokens(LLAMA3_SPECIALS, special_tokens=True)
    cfg = tiny_config("llama", vocab_size=len(tok))
    (LlamaModel if style == "bare" else LlamaForCausalLM)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    tc = json.loads((path / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    c = json.loads((path / "config.json").read_text())
    c["architectures"] = ["LlamaEncoderModel"]
    c["auto_map"] = {"AutoConfig": "configuration_llama_encoder.LlamaEncoderConfig",
                     "AutoModel": "modeling_llama_encoder.LlamaEncoderModel"}
    (path / "config.json").write_text(json.dumps(c))
    for f in ("modeling_llama_encoder.py", "configuration_llama_encoder.py"):
        (path / f).write_text("raise RuntimeError('remote code was imported')\n")
    return path


@pytest.fixture(scope="module")
def converted_llm(tmp_path_factory):
    src = official_llm_dir(tmp_path_factory.mktemp("cc-llm"))
    return convert_official_llm(src, tmp_path_factory.mktemp("enc") / "enc", name="tiny-cc", dtype="float32")


@pytest.mark.parametrize("style", ["bare", "causal"])
def test_official_llm_converts_with_the_released_settings(tmp_path, style):
    from transformers import LlamaModel

    from llm2clip.text import CaptionEncoder

    src = official_llm_dir(tmp_path / "src", style)
    out = convert_official_llm(src, tmp_path / "enc", name="tiny-cc", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["architectures"] == ["LlamaModel"]
    assert not list(out.glob("*.py"))
    manifest = json.loads((out / "llm2clip_encoder.json").read_text())["encoder"]
    assert {k: manifest[k] for k in ("bidirectional", "pooling", "template", "pool_template_suffix", "instruction",
                                     "max_length")} == {"bidirectional": True, "pooling": "mean", "template": "llama3",
                                                        "pool_template_suffix": True, "instruction": None,
                                                        "max_length": 512}
    record = json.loads((out / "llm2clip_conversion.json").read_text())
    assert record["dropped_from_config"]["architectures"] == ["LlamaEncoderModel"]

    enc = CaptionEncoder.from_pretrained(out)
    assert enc.identity()["base_model"] == "tiny-cc"
    tok = enc.tokenizer
    caption = "a red dog near two small cats"
    item = enc.tokenize([caption])[0]
    head = tok("<|start_header_id|>user<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]
    body = tok(caption, add_special_tokens=False)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert item.ids == [tok.bos_token_id, *head, *body, eot]
    assert (item.pool_start, item.pool_end) == (1 + len(head), len(item.ids))  # the caption and <|eot_id|>

    # the weights carried over: bidirectional mean over those tokens, from the source loaded by hand
    ref = LlamaModel.from_pretrained(src).eval()
    ids = torch.tensor([item.ids])
    with torch.no_grad():
        full = ref(input_ids=ids, attention_mask=torch.zeros(1, 1, len(item.ids), len(item.ids))).last_hidden_state
        causal = ref(input_ids=ids).last_hidden_state
    assert not torch.allclose(full[0, 0], causal[0, 0], atol=1e-4)  # the zero mask really is bidirectional
    want = full[0, item.pool_start:item.pool_end].mean(0)
    assert torch.allclose(enc.encode([caption])[0], want, atol=1e-5)


def test_official_llm_bf16_identity_is_what_a_reload_sees(tmp_path):
    from llm2clip.text import CaptionEncoder

    src = official_llm_dir(tmp_path / "src")
    out = convert_official_llm(src, tmp_path / "enc")  # bfloat16 by default
    manifest = json.loads((out / "llm2clip_encoder.json").read_text())
    enc = CaptionEncoder.from_pretrained(out)
    assert manifest["encoder"]["dtype"] == "bfloat16" and next(enc.model.parameters()).dtype == torch.bfloat16
    assert manifest["identity"] == enc.identity()


def test_official_llm_refusals(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        convert_official_llm(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama_encoder_custom"}))
    with pytest.raises(ConfigError, match="remote code, which is never run"):
        convert_official_llm(tmp_path, tmp_path / "out")
