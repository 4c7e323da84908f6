"""LLM2CLIP model: adapter, vision towers from the registry, text sides, save/load with identity pinning."""

import json
import math

import pytest
import torch

from llm2clip.data.images import BagOfWordsConfig, BagOfWordsEncoder
from llm2clip.errors import ConfigError
from llm2clip.model import LLM2CLIP, ModelConfig, TextAdapter
from llm2clip.train.optim import layer_id, num_blocks, param_groups
from llm2clip.vision import HFVisionConfig, OpenClipVisionConfig, build_vision_tower

SMALL = {"kind": "small_vit", "image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2}
HF_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
               patch_size=8)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """Register tiny open_clip architectures: a ViT and a timm EVA02 (random weights, no downloads)."""
    import open_clip

    d = tmp_path_factory.mktemp("oc")
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    (d / "test-tiny-ViT.json").write_text(json.dumps(
        {"embed_dim": 24, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
         "text_cfg": text}))
    (d / "test-tiny-EVA02.json").write_text(json.dumps(
        {"embed_dim": 24, "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                                         "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
         "text_cfg": text, "custom_text": True}))
    open_clip.add_model_config(d)
    return d


def test_adapter_parameter_counts_match_official():
    with torch.device("meta"):  # no 1 GB allocation
        n8b = sum(p.numel() for p in TextAdapter(4096, 1280).parameters())
        n1b = sum(p.numel() for p in TextAdapter(2048, 1280).parameters())
    assert round(n8b / 1e6, 1) == 273.8
    assert round(n1b / 1e6, 1) == 69.8


def test_adapter_is_normalised_residual_mlp():
    torch.manual_seed(0)
    a = TextAdapter(12, 5, depth=4, expansion=2)
    x = torch.randn(3, 12) * 7
    h = torch.nn.functional.normalize(x, dim=-1)
    for b in a.blocks:
        assert b.fc1.out_features == 24
        h = h + b.fc2(torch.nn.functional.gelu(b.fc1(b.norm(h))))
    assert torch.allclose(a(x), a.proj(a.norm(h)), atol=1e-6)
    assert torch.allclose(a(x), a(x * 3), atol=1e-5)  # scale of the stored vector does not matter


def test_model_shapes_logit_scale_and_clamp():
    m = LLM2CLIP(ModelConfig(vision=SMALL, embed_dim=20), text_dim=9)
    assert math.isclose(float(m.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    img, txt = m(torch.randn(2, 3, 16, 16), torch.randn(2, 9))
    assert img.shape == txt.shape == (2, 20)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(9.0)
    m.clamp_logit_scale()
    assert math.isclose(float(m.logit_scale.detach()), math.log(100), rel_tol=1e-6)
    assert m.config.embed_dim == 20 and ModelConfig(vision=SMALL).embed_dim == 1280
    sig = LLM2CLIP(ModelConfig(vision=SMALL, embed_dim=8, loss="siglip"), text_dim=9)
    assert math.isclose(float(sig.logit_scale.detach()), math.log(10), rel_tol=1e-6)
    assert float(sig.logit_bias.detach()) == -10.0


def test_adapter_dim_mismatch_is_an_error():
    with pytest.raises(ConfigError, match="in_dim"):
        LLM2CLIP(ModelConfig(vision=SMALL, text={"kind": "adapter", "in_dim": 16}), text_dim=9)
    with pytest.raises(ConfigError, match="in_dim"):
        LLM2CLIP(ModelConfig(vision=SMALL))


def test_open_clip_vit_tower_drops_projection_and_loads_local_weights(tiny_open_clip, tmp_path):
    import open_clip

    ref = open_clip.create_model("test-tiny-ViT")
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    cfg = OpenClipVisionConfig(name="test-tiny-ViT", pretrained=str(tmp_path / "w.pt"))
    tower = build_vision_tower(cfg)
    assert tower.visual.proj is None and tower.width == 32 and tower.image_size == 16
    sd = tower.visual.state_dict()
    for k, v in ref.visual.state_dict().items():
        if k != "proj":
            assert torch.equal(sd[k], v), k
    m = LLM2CLIP(ModelConfig(vision=cfg.model_dump(), embed_dim=40), text_dim=6).eval()
    x = torch.randn(2, 3, 16, 16)
    assert m.encode_image(x).shape == (2, 40)
    m.save(tmp_path / "saved")
    (tmp_path / "w.pt").unlink()  # the saved model no longer needs the pretrained file
    with torch.no_grad():
        assert torch.equal(LLM2CLIP.load(tmp_path / "saved").eval().encode_image(x), m.encode_image(x))
    with pytest.raises(ConfigError, match="not found"):
        build_vision_tower(cfg)
    with pytest.raises(ConfigError, match="unknown open_clip"):
        build_vision_tower(OpenClipVisionConfig(name="no-such-model"))


def test_open_clip_timm_eva02_tower(tiny_open_clip):
    tower = build_vision_tower(OpenClipVisionConfig(name="test-tiny-EVA02", image_size=56))
    assert tower.width == 192 and tower.image_size == 56
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 56, 56)).shape == (1, 192)


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
def test_hf_towers_random_and_from_directory(kind, tmp_path):
    tower = build_vision_tower(HFVisionConfig(kind=kind, config=HF_TINY))
    assert tower.width == 32
    tower.model.save_pretrained(tmp_path)
    again = build_vision_tower(HFVisionConfig(kind=kind, path=str(tmp_path)))
    x = torch.randn(2, 3, 16, 16)
    tower.eval(), again.eval()
    with torch.no_grad():
        assert torch.allclose(tower(x), again(x), atol=1e-6)
    m = LLM2CLIP(ModelConfig(vision={"kind": kind, "config": HF_TINY}, embed_dim=12), text_dim=6)
    assert m.encode_image(x).shape == (2, 12)


def test_clip_text_tower_baseline():
    m = LLM2CLIP(ModelConfig(vision=SMALL, embed_dim=16,
                             text={"kind": "clip", "width": 32, "heads": 2, "layers": 1}))
    tok = m.text.tokenize(["a red circle", "word " * 200])
    assert tok.shape == (2, 77)  # 77-token context: long captions are cut
    assert m.encode_text(["a red circle", "a blue square"]).shape == (2, 16)


def test_save_load_roundtrip_and_identity_pinning(tmp_path):
    enc = BagOfWordsEncoder(BagOfWordsConfig(dim=10))
    m = LLM2CLIP(ModelConfig(vision=SMALL, embed_dim=8), text_dim=10, text_identity=enc.identity())
    m.eval()
    m.save(tmp_path / "m")
    again = LLM2CLIP.load(tmp_path / "m", text_identity=enc.identity())
    x, e = torch.randn(2, 3, 16, 16), torch.randn(2, 10)
    with torch.no_grad():
        assert torch.equal(m.encode_image(x), again.encode_image(x))
        assert torch.equal(m.encode_text(e), again.encode_text(e))
    other = BagOfWordsEncoder(BagOfWordsConfig(dim=10, seed=1))
    with pytest.raises(ConfigError, match="seed"):
        LLM2CLIP.load(tmp_path / "m", text_identity=other.identity())
    with pytest.raises(ConfigError, match="caption encoder"):
        again.encode_text(["a red circle"])
    with pytest.raises(ConfigError, match="does not match"):
        again.attach_caption_encoder(other)
    again.attach_caption_encoder(enc)
    caps = ["a red circle", "two blue squares"]
    with torch.no_grad():
        assert torch.allclose(again.encode_text(caps), again.encode_text(enc.encode(caps)))
    with pytest.raises(ConfigError, match="not a saved"):
        LLM2CLIP.load(tmp_path)


def test_weight_decay_and_layer_decay_groups():
    m = LLM2CLIP(ModelConfig(vision={**SMALL, "layers": 3}, embed_dim=8), text_dim=6)
    names = [n for n, _ in m.visual.named_parameters()]
    assert num_blocks(names) == 3
    assert layer_id("pos_embed", 3) == 0 and layer_id("blocks.2.fc1.weight", 3) == 3 and layer_id("norm.weight", 3) == 4
    assert layer_id("visual.conv1.weight", 12) == 0
    assert layer_id("visual.transformer.resblocks.11.ln_1.weight", 12) == 12
    assert layer_id("model.vision_model.embeddings.patch_embedding.weight", 2) == 0
    groups = param_groups(m, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["visual.blocks.0.fc1.weight"]["lr"] == pytest.approx(0.5 ** 3)
    assert by_name["visual.pos_embed"]["lr"] == pytest.approx(0.5 ** 4)
    assert by_name["visual.norm.weight"]["lr"] == 1.0 and by_name["head.weight"]["lr"] == 1.0
    for n in ["visual.pos_embed", "visual.cls_token", "logit_scale", "visual.blocks.0.fc1.bias",
              "visual.blocks.0.norm1.weight", "text.norm.weight", "head.bias"]:
        assert by_name[n]["weight_decay"] == 0.0, n
    for n in ["visual.blocks.0.fc1.weight", "visual.patch_embed.weight", "head.weight", "text.proj.weight"]:
        assert by_name[n]["weight_decay"] == 0.05, n


def test_stage2_adamw_is_fused_where_it_applies_and_equals_the_loop():
    """The fused kernel: the per-tensor loop's update (float-level), one pass over all tensors; off for sharded
    DTensor parameters, which it does not take."""
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    from llm2clip.train.optim import build_optimizer, can_fuse

    cfg = SimpleNamespace(lr=1e-2, weight_decay=0.05, layer_decay=0.8, visual_lr=None, text_lr=None,
                          betas=(0.9, 0.98), eps=1e-6)
    torch.manual_seed(0)
    a = LLM2CLIP(ModelConfig(vision={**SMALL, "layers": 2}, embed_dim=8), text_dim=6)
    b = LLM2CLIP(ModelConfig(vision={**SMALL, "layers": 2}, embed_dim=8), text_dim=6)
    b.load_state_dict(a.state_dict())
    fused, loop = build_optimizer(a, cfg), build_optimizer(b, cfg)
    assert fused.defaults["fused"]
    loop = torch.optim.AdamW(loop.param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    for step in range(5):
        for m, opt in ((a, fused), (b, loop)):
            torch.manual_seed(step)
            opt.zero_grad()
            img, txt = m(torch.randn(4, 3, 16, 16), torch.randn(4, 6))
            (img @ txt.T).logsumexp(1).mean().backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    class Sharded(torch.Tensor):  # stands in for DTensor: a tensor subclass
        pass

    assert issubclass(DTensor, torch.Tensor) and not can_fuse([torch.Tensor._make_subclass(Sharded, torch.zeros(2))])
    assert not can_fuse([torch.zeros(2, dtype=torch.long)]) and not can_fuse([])


def test_a_checkpoint_of_the_loop_optimizer_resumes_fused_also_under_a_grad_scaler(tmp_path):
    """A checkpoint written before the fused kernel (its groups say fused: None) resumes on the fused kernel; left
    as loaded, the optimizer ran the loop while telling a GradScaler it unscales itself, and fp16 runs crashed."""
    from types import SimpleNamespace

    from safetensors.torch import save_model

    from llm2clip.model import MODEL_WEIGHTS
    from llm2clip.train.checkpoint import load_weights_and_optimizer
    from llm2clip.train.optim import build_optimizer

    cfg = SimpleNamespace(lr=1e-2, weight_decay=0.05, layer_decay=1.0, visual_lr=None, text_lr=None,
                          betas=(0.9, 0.98), eps=1e-6)
    torch.manual_seed(0)
    m = LLM2CLIP(ModelConfig(vision=SMALL, embed_dim=8), text_dim=6)
    groups = param_groups(m, cfg.lr, cfg.weight_decay)
    for g in groups:
        g.pop("names")
    old = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)  # as an earlier version built it
    img, txt = m(torch.randn(4, 3, 16, 16), torch.randn(4, 6))
    (img @ txt.T).logsumexp(1).mean().backward()
    old.step()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model(m, str(ckpt / MODEL_WEIGHTS))
    state = old.state_dict()
    assert all(g["fused"] is None for g in state["param_groups"])

    new = build_optimizer(m, cfg)
    load_weights_and_optimizer(m, new, ckpt, state, sharded=False, device=torch.device("cpu"))
    assert all(g["fused"] for g in new.param_groups)
    assert all(s["step"].dtype == torch.float32 for s in new.state.values())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    new.zero_grad()
    img, txt = m(torch.randn(4, 3, 16, 16), torch.randn(4, 6))
    scaler.scale((img @ txt.T).logsumexp(1).mean()).backward()
    scaler.step(new)  # raised "Expected grad_scale and found_inf to be None" when the loaded flags stayed
    scaler.update()
    assert all(s["step"].item() == 2 for s in new.state.values())


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = LLM2CLIP(ModelConfig(vision=SMALL, embed_dim=8, head_init_std=0.02), text_dim=6)
    x = torch.randn(4, 3, 16, 16)

    def grads():
        m.zero_grad()
        m.encode_image(x).sum().backward()
        return [p.grad.clone() for p in m.visual.parameters()]

    g0 = grads()
    m.set_grad_checkpointing(True)
    g1 = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_standardized_adapter_z_scores_the_normalised_embedding(tmp_path):
    torch.manual_seed(0)
    a = TextAdapter(6, 4, depth=2, standardize=True)
    train = torch.randn(50, 6) * 5 + torch.tensor([40.0, 0, 0, 0, 0, 0])  # one dominant shared dimension
    a.fit_standardization(train)
    n = torch.nn.functional.normalize(train, dim=-1)
    assert torch.allclose(a.in_mean, n.mean(0)) and torch.allclose(a.in_std, n.std(0))
    x = torch.randn(3, 6)
    z = (torch.nn.functional.normalize(x, dim=-1) - n.mean(0)) / n.std(0)
    plain = TextAdapter(6, 4, depth=2, l2_norm=False)
    plain.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("in_")})
    assert torch.allclose(a(x), plain(z), atol=1e-6)
    # the statistics are part of the saved model
    cfg = ModelConfig(vision=SMALL, embed_dim=4, text={"kind": "adapter", "depth": 2, "standardize": True})
    m = LLM2CLIP(cfg, text_dim=6)
    m.text.fit_standardization(train)
    m.save(tmp_path / "m")
    again = LLM2CLIP.load(tmp_path / "m")
    assert torch.equal(again.text.in_mean, m.text.in_mean) and torch.equal(again.text.in_std, m.text.in_std)
