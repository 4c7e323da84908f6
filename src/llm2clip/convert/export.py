"""Export our models for other tools.

* ``export_hf_vision``: the vision tower as a Hugging Face vision-model directory (config.json,
  model.safetensors, preprocessor_config.json), so LLaVA-style projects can swap it in for their
  CLIP tower (paper Table 7). Possible where the architecture is CLIP's: an OpenAI-CLIP-architecture
  open_clip ViT (pre-LN, learned positions, CLS pooling after ``ln_post``, no patch bias) becomes a
  ``CLIPVisionModel``; an ``hf_clip`` / ``hf_siglip`` tower is saved as it is. Other towers are refused
  with the reason (small_vit has no LayerNorm before its first block, CLIP always applies one;
  EVA02 uses RoPE and SwiGLU). Weights are written with the ``vision_model.`` prefix of the hub's
  CLIP checkpoints, which transformers 4.x and 5.x both load. The head (pooled features -> shared
  space) is not part of a CLIPVisionModel; it is saved beside it in ``llm2clip_head.safetensors``.
* ``export_onnx``: ``vision.onnx`` (images -> normalised image embeddings, tower + head) and
  ``text_adapter.onnx`` (stored caption embeddings -> normalised text embeddings), batch axis
  dynamic, each checked against PyTorch with onnxruntime on CPU at another batch size.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, Llm2ClipError
from ..fileio import write_json_atomic
from .keymaps import openai_vit_to_hf_clip
from .official import _finish_dir, _fresh_dir

log = logging.getLogger(__name__)

EXPORT_RECORD = "llm2clip_export.json"
HEAD_FILE = "llm2clip_head.safetensors"
ONNX_RECORD = "llm2clip_onnx.json"


def _as_model(model):
    """(the LLM2CLIP module, its folder or None): a folder (model or run) is loaded by llm2clip.load, on the
    CPU where the export traces and checks; the caption encoder is not needed, so it is never built."""
    if not isinstance(model, (str, Path)):
        return model.eval(), None
    from ..api import load

    lm = load(model, device="cpu", lazy_text=True)
    return lm.model, str(lm.path)


# -------------------------------------------------------------------------- HF vision model
def _open_clip_vit_as_hf(visual, embed_dim: int):
    """(CLIPVisionConfig, state dict in CLIPVisionModel names) of an open_clip VisionTransformer, or a
    ConfigError saying which part CLIP cannot express."""
    from open_clip.transformer import LayerScale, QuickGELU, ResidualAttentionBlock
    from transformers import CLIPVisionConfig

    why = []
    if getattr(visual, "attn_pool", None) is not None:
        why.append("it pools with attention (CLIP pools the CLS token)")
    if getattr(visual, "pool_type", "tok") != "tok":
        why.append(f"it pools by {visual.pool_type!r} (CLIP pools the CLS token)")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        why.append("it has no ln_pre (CLIP always applies pre_layrnorm)")
    if visual.conv1.bias is not None:
        why.append("its patch embedding has a bias (CLIP's has none)")
    blocks = list(visual.transformer.resblocks)
    acts = set()
    for b in blocks:
        if type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv"):
            why.append(f"its blocks are {type(b).__name__} (CLIP's are plain pre-LN blocks)")
            break
        if isinstance(b.ls_1, LayerScale) or isinstance(b.ls_2, LayerScale):
            why.append("it uses layer scale")
            break
        act = b.mlp.gelu
        acts.add("quick_gelu" if isinstance(act, QuickGELU) else
                 "gelu" if isinstance(act, nn.GELU) and act.approximate == "none" else type(act).__name__)
    if len(acts) > 1 or (acts and not acts <= {"gelu", "quick_gelu"}):
        why.append(f"its activation is {sorted(acts)} (CLIP: gelu or quick_gelu)")
    eps = {m.eps for m in visual.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        why.append(f"its LayerNorms use several eps {sorted(eps)}")
    size, patch = visual.image_size, visual.patch_size
    if (isinstance(size, tuple) and size[0] != size[1]) or (isinstance(patch, tuple) and patch[0] != patch[1]):
        why.append("its image or patch is not square")
    if why:
        raise ConfigError("this open_clip ViT cannot be expressed as a CLIPVisionModel: " + "; ".join(why))
    sd = {k: v for k, v in visual.state_dict().items() if k != "proj"}
    cfg = CLIPVisionConfig(
        hidden_size=int(visual.conv1.out_channels), intermediate_size=int(blocks[0].mlp.c_fc.out_features),
        num_hidden_layers=len(blocks), num_attention_heads=int(blocks[0].attn.num_heads),
        image_size=int(size[0] if isinstance(size, tuple) else size),
        patch_size=int(patch[0] if isinstance(patch, tuple) else patch),
        hidden_act=acts.pop() if acts else "gelu", layer_norm_eps=float(eps.pop()), num_channels=3,
        projection_dim=embed_dim)
    return cfg, openai_vit_to_hf_clip(sd)


def hf_vision_parts(model):
    """(HF model class name, config, state dict without the ``vision_model.`` prefix) of the tower."""
    from ..vision.towers import HFTower, OpenClipTower, SmallViT

    tower = model.visual
    if isinstance(tower, HFTower):
        sd = tower.model.state_dict()
        sd = {(k[len("vision_model."):] if k.startswith("vision_model.") else k): v for k, v in sd.items()}
        return type(tower.model).__name__, tower.model.config, sd
    if isinstance(tower, OpenClipTower) and hasattr(tower.visual, "conv1") and hasattr(tower.visual, "transformer"):
        cfg, sd = _open_clip_vit_as_hf(tower.visual, model.config.embed_dim)
        return "CLIPVisionModel", cfg, sd
    if isinstance(tower, SmallViT):
        raise ConfigError("a small_vit tower cannot be expressed as a CLIPVisionModel: CLIP applies a LayerNorm "
                          "(pre_layrnorm) to the embeddings before the first block and small_vit has none, and "
                          "small_vit's patch embedding has a bias; export it with `llm2clip export onnx` instead")
    if isinstance(tower, OpenClipTower) and hasattr(tower.visual, "trunk"):
        raise ConfigError(f"a timm tower ({type(tower.visual.trunk).__name__}, e.g. EVA02 with RoPE and SwiGLU) "
                          "cannot be expressed as a CLIPVisionModel; export it with `llm2clip export onnx` instead")
    raise ConfigError(f"a {type(tower).__name__} tower cannot be expressed as a Hugging Face vision model")


def _preprocessor(tower) -> dict:
    """Our eval transform as a CLIPImageProcessor: bicubic resize of the short side, centre crop, mean/std."""
    s = int(tower.image_size)
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": s}, "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(m) for m in tower.mean], "image_std": [float(x) for x in tower.std]}


@torch.no_grad()
def export_hf_vision(model, out: str | Path, overwrite: bool = False, verify: bool = True) -> Path:
    """Write the vision tower of ``model`` (an LLM2CLIP or a saved model directory) to ``out`` as a
    Hugging Face vision model. ``verify`` reloads it and compares pooled features with the tower's."""
    import transformers
    from safetensors.torch import save_file

    model, source = _as_model(model)
    cls_name, cfg, sd = hf_vision_parts(model)
    out = Path(out)
    tmp = _fresh_dir(out, overwrite)
    try:
        cfg = cfg.__class__.from_dict(cfg.to_dict())  # a copy: the tower's own config stays as it is
        cfg.architectures = [cls_name]
        cfg.save_pretrained(tmp)
        save_file({f"vision_model.{k}": v.detach().float().clone().contiguous() for k, v in sd.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        head = {k: v.detach().float().clone() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        write_json_atomic(tmp / "preprocessor_config.json", _preprocessor(model.visual))
        record = {"kind": "hf-vision", "source": source, "hf_class": cls_name, "embed_dim": model.config.embed_dim,
                  "vision": model.config.vision.model_dump(mode="json"), "text_identity": model.text_identity,
                  "head": f"{HEAD_FILE}: Linear(pooler_output) -> shared space (then L2-normalise)"}
        if verify:
            hf = getattr(transformers, cls_name).from_pretrained(tmp).eval()
            s = model.visual.image_size
            x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
            diff = float((hf(pixel_values=x).pooler_output - model.visual(x)).abs().max())
            if diff > 1e-4:
                raise Llm2ClipError(f"the exported {cls_name} differs from the tower by {diff:.3g} (max abs)")
            record["max_abs_diff_pooled"] = diff
        write_json_atomic(tmp / EXPORT_RECORD, record)
        return _finish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------- ONNX
class _ImageGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)


class _TextGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, caption_embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(caption_embeddings, normalize=True)


def _onnx_export(module: nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str, opset: int) -> str:
    """torch.export-based exporter (batch axis dynamic); the TorchScript one if that fails. Returns which."""
    module.eval()
    try:
        torch.onnx.export(module, (example,), str(path), input_names=[in_name], output_names=[out_name],
                          dynamic_shapes={in_name: {0: torch.export.Dim("batch")}}, opset_version=opset,
                          dynamo=True, verbose=False)
        return "dynamo"
    except Exception as err:  # some towers do not trace with torch.export; the older exporter may
        log.warning("torch.export-based ONNX export failed (%s); using the TorchScript exporter", err)
        torch.onnx.export(module, (example,), str(path), input_names=[in_name], output_names=[out_name],
                          dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}}, opset_version=opset,
                          dynamo=False)
        return "torchscript"


def _check_onnx(path: Path, module: nn.Module, x: torch.Tensor, in_name: str, atol: float) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {in_name: x.numpy()})[0])
    with torch.no_grad():
        want = module(x)
    diff = float((got - want).abs().max())
    if got.shape != want.shape or diff > atol:
        raise Llm2ClipError(f"{path.name}: onnxruntime output {tuple(got.shape)} differs from PyTorch "
                            f"{tuple(want.shape)} by {diff:.3g} (max abs)")
    return diff


def export_onnx(model, out: str | Path, opset: int = 18, overwrite: bool = False, verify: bool = True,
                atol: float = 1e-4) -> dict:
    """Write ``vision.onnx`` and (for the adapter text side) ``text_adapter.onnx`` to ``out`` with
    ``llm2clip_onnx.json`` (inputs, outputs, preprocessing, logit scale, the caption encoder's identity).
    ``verify`` runs both in onnxruntime at a batch size other than the traced one."""
    model, source = _as_model(model)
    out = Path(out)
    tmp = _fresh_dir(out, overwrite)
    g = torch.Generator().manual_seed(0)
    s = int(model.visual.image_size)
    record = {"kind": "onnx", "source": source, "opset": opset, "embed_dim": model.config.embed_dim,
              "logit_scale": float(model.logit_scale.detach().exp()), "text_identity": model.text_identity,
              "graphs": {}}
    try:
        image = _ImageGraph(model).eval()
        how = _onnx_export(image, torch.randn(2, 3, s, s, generator=g), tmp / "vision.onnx", "images", "image_embeds",
                           opset)
        record["graphs"]["vision"] = {
            "file": "vision.onnx", "exporter": how, "input": {"images": ["batch", 3, s, s]},
            "output": {"image_embeds": ["batch", model.config.embed_dim]}, "normalised": True,
            "preprocess": {"image_size": s, "resize": "bicubic short side + centre crop",
                           "mean": list(model.visual.mean), "std": list(model.visual.std)}}
        if verify:
            record["graphs"]["vision"]["max_abs_diff"] = _check_onnx(
                tmp / "vision.onnx", image, torch.randn(3, 3, s, s, generator=g), "images", atol)
        if model.uses_adapter:
            d = model.text.in_dim
            text = _TextGraph(model).eval()
            how = _onnx_export(text, torch.randn(2, d, generator=g), tmp / "text_adapter.onnx", "caption_embeddings",
                               "text_embeds", opset)
            record["graphs"]["text_adapter"] = {
                "file": "text_adapter.onnx", "exporter": how, "input": {"caption_embeddings": ["batch", d]},
                "output": {"text_embeds": ["batch", model.config.embed_dim]}, "normalised": True}
            if verify:
                record["graphs"]["text_adapter"]["max_abs_diff"] = _check_onnx(
                    tmp / "text_adapter.onnx", text, torch.randn(3, d, generator=g) * 5, "caption_embeddings", atol)
        else:
            log.warning("the text side is a CLIP text transformer, not the adapter: only vision.onnx is written")
        write_json_atomic(tmp / ONNX_RECORD, record)
        _finish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
