"""Exporting our models: the vision tower as a Hugging Face CLIPVisionModel, and ONNX graphs checked with
onnxruntime against PyTorch."""

import argparse
import json

import pytest
import torch
from test_convert import TINY_EVA_VISION, TINY_HF_VISION, TINY_OAI_VISION, tiny_archs  # noqa: F401

from llm2clip.convert import export_hf_vision, export_onnx
from llm2clip.convert.cli import add_commands
from llm2clip.errors import ConfigError
from llm2clip.model import LLM2CLIP, ModelConfig

SMALL = {"kind": "small_vit", "image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2}


def saved_model(path, vision, seed=0, text_dim=20):
    """A model with every weight random (LayerNorms too, so a misplaced one shows), saved at ``path``."""
    torch.manual_seed(seed)
    m = LLM2CLIP(ModelConfig(vision=vision, embed_dim=24, text={"kind": "adapter", "depth": 2}), text_dim=text_dim)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save(path)
    return LLM2CLIP.load(path)


@pytest.fixture(scope="module")
def no_ln_pre_vit(tiny_archs):  # noqa: F811
    import open_clip

    (tiny_archs / "test-tiny-ViT-nolnpre.json").write_text(json.dumps(
        {"embed_dim": 24, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 4,
                                         "head_width": 16, "no_ln_pre": True},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(tiny_archs)
    return {"kind": "open_clip", "name": "test-tiny-ViT-nolnpre"}


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_vit_exports_as_hf_clip_vision_model(tiny_archs, tmp_path, quick_gelu):  # noqa: F811
    from safetensors import safe_open
    from transformers import CLIPImageProcessor, CLIPVisionModel

    m = saved_model(tmp_path / "model", {**TINY_OAI_VISION, "quick_gelu": quick_gelu})
    out = export_hf_vision(tmp_path / "model", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPVisionModel"] and cfg["hidden_act"] == ("quick_gelu" if quick_gelu else "gelu")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())  # the hub layout transformers 4.x reads
    hf = CLIPVisionModel.from_pretrained(out).eval()

    visual = m.visual.visual
    seen = {}
    visual.ln_pre.register_forward_hook(lambda mod, i, o: seen.__setitem__("pre", o))
    visual.transformer.resblocks[-2].register_forward_hook(lambda mod, i, o: seen.__setitem__("penult", o))
    visual.transformer.register_forward_hook(lambda mod, i, o: seen.__setitem__("last", o))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        pooled = m.visual(x)
        got = hf(pixel_values=x, output_hidden_states=True)
    assert torch.allclose(got.pooler_output, pooled, atol=1e-5)
    assert torch.allclose(got.last_hidden_state, seen["last"], atol=1e-5)
    assert torch.allclose(got.hidden_states[0], seen["pre"], atol=1e-5)
    assert torch.allclose(got.hidden_states[-2], seen["penult"], atol=1e-5)  # the layer LLaVA feeds its projector

    proc = CLIPImageProcessor.from_pretrained(out)
    assert proc.crop_size == {"height": 16, "width": 16} and proc.size["shortest_edge"] == 16
    assert list(proc.image_mean) == pytest.approx(list(m.visual.mean))
    from safetensors.torch import load_file

    head = load_file(str(out / "llm2clip_head.safetensors"))
    assert torch.equal(head["weight"], m.head.weight.detach()) and torch.equal(head["bias"], m.head.bias.detach())


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
def test_hf_towers_export_as_they_are(tmp_path, kind):
    import transformers

    m = saved_model(tmp_path / "model", {**TINY_HF_VISION, "kind": kind,
                                         "config": {**TINY_HF_VISION["config"], "hidden_act": "gelu_pytorch_tanh"}})
    export_hf_vision(m, tmp_path / "hf")
    cls = transformers.CLIPVisionModel if kind == "hf_clip" else transformers.SiglipVisionModel
    hf, info = cls.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(hf.eval()(pixel_values=x).pooler_output, m.visual(x), atol=1e-6)


def test_towers_clip_cannot_express_are_refused(tiny_archs, no_ln_pre_vit, tmp_path):  # noqa: F811
    cases = [(SMALL, "small_vit tower cannot be expressed.*pre_layrnorm"),
             (TINY_EVA_VISION, "timm tower .*Eva.* cannot be expressed"),
             (no_ln_pre_vit, "no ln_pre")]
    for i, (vision, msg) in enumerate(cases):
        m = saved_model(tmp_path / f"m{i}", vision)
        with pytest.raises(ConfigError, match=msg):
            export_hf_vision(m, tmp_path / f"hf{i}")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("hf", ".hf"))]


def _run_onnx(path, name, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


@pytest.mark.parametrize("vision", [SMALL, TINY_OAI_VISION, TINY_HF_VISION, TINY_EVA_VISION],
                         ids=["small_vit", "open_clip", "hf_clip", "eva02"])
def test_onnx_export_matches_pytorch(tiny_archs, tmp_path, vision):  # noqa: F811
    import onnx

    m = saved_model(tmp_path / "model", vision)
    record = export_onnx(tmp_path / "model", tmp_path / "onnx")
    assert set(record["graphs"]) == {"vision", "text_adapter"}
    assert json.loads((tmp_path / "onnx" / "llm2clip_onnx.json").read_text())["embed_dim"] == 24
    for f, name in (("vision.onnx", "images"), ("text_adapter.onnx", "caption_embeddings")):
        g = onnx.load(str(tmp_path / "onnx" / f))
        dim0 = g.graph.input[0].type.tensor_type.shape.dim[0]
        assert g.graph.input[0].name == name and dim0.dim_param and not dim0.HasField("dim_value")  # dynamic batch
    s = m.visual.image_size
    for b in (1, 5):  # neither is the traced batch size (2)
        x = torch.randn(b, 3, s, s)
        e = torch.randn(b, 20) * 3
        with torch.no_grad():
            want_img, want_txt = m.encode_image(x), m.encode_text(e)
        assert torch.allclose(_run_onnx(tmp_path / "onnx" / "vision.onnx", "images", x), want_img, atol=1e-5)
        assert torch.allclose(_run_onnx(tmp_path / "onnx" / "text_adapter.onnx", "caption_embeddings", e), want_txt,
                              atol=1e-5)


def test_export_loads_a_run_folder_through_llm2clip_load(tmp_path):
    """Export loads models with the package's one loader: a run folder means its model/, recorded as the source."""
    m = saved_model(tmp_path / "run" / "model", SMALL)
    record = export_onnx(tmp_path / "run", tmp_path / "onnx", verify=False)
    assert record["source"] == str((tmp_path / "run" / "model").resolve())
    saved = json.loads((tmp_path / "onnx" / "llm2clip_onnx.json").read_text())
    assert saved["logit_scale"] == pytest.approx(float(m.logit_scale.exp()))


def test_cli_export(tiny_archs, tmp_path, capsys):  # noqa: F811
    parser = argparse.ArgumentParser(prog="llm2clip")
    add_commands(parser.add_subparsers(dest="command"))
    for argv in (["export", "--help"], ["export", "hf-vision", "--help"], ["export", "onnx", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0
    assert "CLIPVisionModel" in capsys.readouterr().out
    saved_model(tmp_path / "model", TINY_OAI_VISION)
    args = parser.parse_args(["export", "hf-vision", str(tmp_path / "model"), "--out", str(tmp_path / "hf")])
    assert args.func(args) == 0 and (tmp_path / "hf" / "config.json").is_file()
    saved_model(tmp_path / "small", SMALL)
    args = parser.parse_args(["export", "hf-vision", str(tmp_path / "small"), "--out", str(tmp_path / "hf2")])
    with pytest.raises(ConfigError, match="small_vit"):
        args.func(args)
