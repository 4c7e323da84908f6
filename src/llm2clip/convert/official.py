"""Import the released LLM2CLIP checkpoints into our formats, without running any official code.

* ``convert_official_clip``: an EVA-CLIP-style ``.pt`` state dict (``visual.*``, ``text.*``,
  ``logit_scale``; docs/METHOD.md 3.1 and 5) -> a saved LLM2CLIP model (``model.safetensors`` +
  ``llm2clip_model.json``). The vision weights go into a tower of our registry (open_clip's EVA02,
  i.e. timm's Eva, for EVA-CLIP towers; open_clip's or transformers' CLIP ViT for OpenAI towers), the
  vision projection into ``head``, ``text.text_adaptor`` into our TextAdapter. Key maps: keymaps.py
  and docs/CHECKPOINTS.md. The file is read with ``torch.load(weights_only=True)``: tensors only,
  no pickled code runs.
* ``convert_official_llm``: a merged caption-contrastive LLM in a HF directory (plain Llama weights;
  its ``auto_map`` remote code is ignored, never imported) -> our caption-encoder directory with the
  released encoders' settings made explicit: bidirectional, mean pooling, the Llama-3 user turn,
  pooling the caption tokens and ``<|eot_id|>`` (docs/METHOD.md 1.3, 2 and 5).

On the adapter's L2 normalisation: the official ``TextProj`` normalises its *input*, the pooled LLM
vector (docs/METHOD.md 3.1; the 1B model card does the same before calling the adapter), and no version
of the official code normalises its output. Our converted adapter does the same (``l2_norm: true``);
``adapter_l2_norm=False`` is only an option, for checkpoints trained on raw vectors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import StrictModel, load_config, parse_config
from ..errors import ConfigError
from ..fileio import prepare_output_dir, publish_dir, temp_dir
from ..vision import VisionConfig
from .keymaps import (
    VisionGeometry,
    _preview,
    eva_visual_to_timm,
    official_adapter_to_ours,
    openai_visual_split,
    openai_vit_to_hf_clip,
    vision_geometry,
)

log = logging.getLogger(__name__)

CONVERSION_RECORD = "llm2clip_conversion.json"

# The released towers by name: open_clip architectures (random init; every weight comes from the
# checkpoint). OpenAI towers were trained with QuickGELU.
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "eva02-l-14-336": {"kind": "open_clip", "name": "EVA02-L-14-336"},
    "eva02-l-14": {"kind": "open_clip", "name": "EVA02-L-14"},
    "eva02-b-16": {"kind": "open_clip", "name": "EVA02-B-16"},
    "openai-l-14-336": {"kind": "open_clip", "name": "ViT-L-14-336", "quick_gelu": True},
    "openai-l-14": {"kind": "open_clip", "name": "ViT-L-14", "quick_gelu": True},
    "openai-b-16": {"kind": "open_clip", "name": "ViT-B-16", "quick_gelu": True},
}
# (layout, width, layers, patch, image size) of each preset, for picking one from a checkpoint
_PRESET_GEOMETRY = {
    ("eva", 1024, 24, 14, 336): "eva02-l-14-336",
    ("eva", 1024, 24, 14, 224): "eva02-l-14",
    ("eva", 768, 12, 16, 224): "eva02-b-16",
    ("openai", 1024, 24, 14, 336): "openai-l-14-336",
    ("openai", 1024, 24, 14, 224): "openai-l-14",
    ("openai", 768, 12, 16, 224): "openai-b-16",
}


# ------------------------------------------------------------------------------ reading
def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: a ``.pt``/``.bin`` (tensors only) or ``.safetensors`` file; a wrapping
    ``{"state_dict" | "module" | "model": ...}`` and a ``module.`` prefix (DDP/DeepSpeed) are removed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled objects other than tensors: refused, never executed
            raise ConfigError(f"{path}: not a plain tensor checkpoint (loaded with weights_only=True): {err}") from None
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{path}: expected a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def split_official(sd: dict[str, torch.Tensor]):
    """(visual, text, logit_scale) of an official CustomCLIP state dict, prefixes stripped."""
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    text = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    other = sorted(k for k in sd if not k.startswith(("visual.", "text.")) and k != "logit_scale")
    if other:
        raise ConfigError(f"unexpected keys outside visual.*, text.* and logit_scale: {other[:8]}")
    if not visual:
        raise ConfigError("no visual.* weights: not an LLM2CLIP (EVA-CLIP CustomCLIP) checkpoint")
    if not text:
        raise ConfigError("no text.* weights: this checkpoint has no LLM2CLIP text adapter")
    return visual, text, sd.get("logit_scale")


# ------------------------------------------------------------------------------ vision config
class _VisionOnly(StrictModel):
    vision: VisionConfig


def resolve_vision(spec, geometry: VisionGeometry | None = None) -> VisionConfig:
    """A vision config from: None (the preset matching the checkpoint's shapes), a preset name,
    ``open_clip:NAME``, a YAML/JSON file (a vision mapping, or one under ``vision:``), a dict, or a
    VisionConfig."""
    if spec is None:
        if geometry is None:
            raise ConfigError("no vision config given")
        key = (geometry.layout, geometry.width, geometry.layers, geometry.patch_size, geometry.image_size)
        if key not in _PRESET_GEOMETRY:
            raise ConfigError(
                f"the checkpoint's {geometry.layout} tower (width {geometry.width}, {geometry.layers} layers, patch "
                f"{geometry.patch_size}, {geometry.image_size} px) matches no preset; pass --vision "
                f"({', '.join(VISION_PRESETS)}, open_clip:NAME, or a YAML file)")
        spec = _PRESET_GEOMETRY[key]
        log.info("vision tower: preset %s (from the checkpoint's shapes)", spec)
    if isinstance(spec, str):
        if spec in VISION_PRESETS:
            return parse_config({"vision": VISION_PRESETS[spec]}, _VisionOnly).vision
        if spec.startswith("open_clip:"):
            quick = geometry is not None and geometry.layout == "openai"  # OpenAI weights: QuickGELU
            return parse_config({"vision": {"kind": "open_clip", "name": spec.split(":", 1)[1], "quick_gelu": quick}},
                                _VisionOnly, "--vision").vision
        p = Path(spec)
        if p.suffix in (".yaml", ".yml", ".json") and p.is_file():
            data = yaml.safe_load(p.read_text())
            if isinstance(data, dict) and "vision" in data:
                return load_config(p, _VisionOnly).vision
            vision = parse_config({"vision": data}, _VisionOnly, str(p)).vision
            vision.resolve_paths(p.parent)
            return vision
        raise ConfigError(f"--vision: {spec!r} is no preset ({', '.join(VISION_PRESETS)}), no open_clip:NAME "
                          "and no YAML/JSON file")
    if isinstance(spec, dict):
        return parse_config({"vision": spec}, _VisionOnly, "vision").vision
    return spec


# ------------------------------------------------------------------------------ CLIP checkpoint
def read_caption_encoder(path: str | Path) -> tuple[dict, dict]:
    """(identity, encoder config as JSON) of a saved caption-encoder directory."""
    from ..text.config import LLMEncoderConfig
    from ..text.encoder import ENCODER_MANIFEST

    path = Path(path)
    mf = path / ENCODER_MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{path}: no {ENCODER_MANIFEST}; not a caption-encoder directory "
                          "(make one with `llm2clip convert official-llm`)")
    data = json.loads(mf.read_text())
    cfg = LLMEncoderConfig(**{**data["encoder"], "model": str(path.resolve())})
    return dict(data["identity"]), cfg.model_dump(mode="json")


def load_exact(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that names every missing, unexpected or misshapen key before touching weights."""
    own = module.state_dict()
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    problems = ([f"missing in the checkpoint: {_preview(missing)}"] if missing else []) + \
               ([f"not in the model: {_preview(unexpected)}"] if unexpected else []) + \
               ([f"shape (checkpoint vs model): {'; '.join(shapes[:6])}"] if shapes else [])
    if problems:
        raise ConfigError(f"{what}: the checkpoint does not fit the model ({' | '.join(problems)})")
    module.load_state_dict(sd, strict=True)


def _tower_target(tower, geometry: VisionGeometry, tower_sd: dict[str, torch.Tensor]):
    """(module inside our tower, state dict in its names) for the official tower weights."""
    from ..vision.towers import HFTower, OpenClipTower

    if geometry.layout == "eva":
        trunk = getattr(getattr(tower, "visual", None), "trunk", None)
        if not isinstance(tower, OpenClipTower) or type(trunk).__name__ != "Eva":
            raise ConfigError(f"EVA-CLIP vision weights need an open_clip EVA02 tower (timm Eva), e.g. --vision "
                              f"eva02-l-14-336; the given vision config builds {type(tower).__name__}")
        if geometry.head_dim is not None and trunk.blocks[0].attn.head_dim != geometry.head_dim:
            raise ConfigError(f"the checkpoint's RoPE tables are for {geometry.head_dim}-d attention heads, the "
                              f"tower has {trunk.blocks[0].attn.head_dim}-d heads: wrong --vision architecture")
        return trunk, tower_sd
    if isinstance(tower, OpenClipTower) and hasattr(tower.visual, "conv1") and hasattr(tower.visual, "transformer"):
        act = type(tower.visual.transformer.resblocks[0].mlp.gelu).__name__
        if act != "QuickGELU":
            log.warning("OpenAI-CLIP towers were trained with QuickGELU; this tower uses %s (quick_gelu: true)", act)
        return tower.visual, tower_sd
    if isinstance(tower, HFTower) and type(tower.model).__name__ == "CLIPVisionModel":
        if tower.model.config.hidden_act != "quick_gelu":
            log.warning("OpenAI-CLIP towers were trained with QuickGELU; this tower's hidden_act is %s",
                        tower.model.config.hidden_act)
        inner = getattr(tower.model, "vision_model", None)  # transformers 4.x nests the transformer
        return (inner if inner is not None else tower.model), openai_vit_to_hf_clip(tower_sd)
    raise ConfigError(f"OpenAI-CLIP vision weights need an open_clip ViT (e.g. --vision openai-l-14-336) or an "
                      f"hf_clip tower; the given vision config builds {type(tower).__name__}")


def _fresh_dir(out: Path, overwrite: bool) -> Path:
    """A temporary sibling of ``out`` to write into, renamed onto ``out`` by ``_finish_dir`` when complete.
    ``overwrite`` replaces only a folder llm2clip wrote, never the working or home folder (fileio)."""
    prepare_output_dir(out, overwrite, flag="--force", error=ConfigError)
    return temp_dir(out)


def _finish_dir(tmp: Path, out: Path) -> Path:
    return publish_dir(tmp, out)


def convert_official_clip(ckpt: str | Path, out: str | Path, vision=None, caption_encoder: str | Path | None = None,
                          adapter_l2_norm: bool = True, overwrite: bool = False):
    """Convert an official LLM2CLIP ``.pt`` into a saved LLM2CLIP model at ``out``; returns the model.

    ``vision``: see resolve_vision (None picks the preset matching the checkpoint's shapes).
    ``caption_encoder``: our caption-encoder directory that produced the adapter's inputs (e.g. from
    convert_official_llm); its identity is pinned in the model and its dim must equal the adapter's.
    """
    from ..model import LLM2CLIP, AdapterConfig, ModelConfig

    ckpt, out = Path(ckpt), Path(out)
    sd = load_state_dict(ckpt)
    visual, text, logit_scale = split_official(sd)
    geometry = vision_geometry(visual)
    if geometry.layout == "eva":
        tower_sd, head, dropped = eva_visual_to_timm(visual)
    else:
        (tower_sd, head), dropped = openai_visual_split(visual), []
    adapter_sd, shape = official_adapter_to_ours(text)
    head_out, head_in = (int(s) for s in head["weight"].shape)
    if head_out != shape.out_dim:
        raise ConfigError(f"embed dims differ: the vision head maps to {head_out}-d, the text adapter to "
                          f"{shape.out_dim}-d; these towers do not form one model")
    if head_in != geometry.width:
        raise ConfigError(f"the vision head takes {head_in}-d features but the tower is {geometry.width} wide")
    identity = encoder_cfg = None
    if caption_encoder is not None:
        identity, encoder_cfg = read_caption_encoder(caption_encoder)
        if int(identity.get("dim", -1)) != shape.in_dim:
            raise ConfigError(f"the text adapter takes {shape.in_dim}-d caption embeddings but the caption encoder "
                              f"{caption_encoder} makes {identity.get('dim')}-d ones: they are not a pair")
    else:
        log.warning("no caption encoder given: the converted model does not pin which LLM feeds its adapter "
                    "(%d-d embeddings)", shape.in_dim)
    vcfg = resolve_vision(vision, geometry)
    cfg = ModelConfig(vision=vcfg, embed_dim=shape.out_dim,
                      text=AdapterConfig(in_dim=shape.in_dim, depth=shape.depth, expansion=shape.expansion,
                                         l2_norm=adapter_l2_norm))
    model = LLM2CLIP(cfg, text_dim=shape.in_dim, text_identity=identity, load_pretrained=False)
    if model.visual.width != head_in:
        raise ConfigError(f"the vision config builds a {model.visual.width}-wide tower; the checkpoint's tower is "
                          f"{head_in} wide")
    module, target_sd = _tower_target(model.visual, geometry, tower_sd)
    load_exact(module, target_sd, "vision tower")
    load_exact(model.head, head, "vision head")
    load_exact(model.text, adapter_sd, "text adapter")
    with torch.no_grad():
        if logit_scale is not None:
            model.logit_scale.fill_(float(logit_scale.reshape(-1)[0]))
        else:
            log.warning("the checkpoint has no logit_scale; keeping ln(1/0.07)")
    if encoder_cfg is not None and hasattr(model, "caption_encoder_config"):
        model.caption_encoder_config = encoder_cfg  # lets the saved model rebuild its caption encoder
    model.eval()
    tmp = _fresh_dir(out, overwrite)
    try:
        model.save(tmp)
        record = {"kind": "official-clip", "source": str(ckpt.resolve()), "source_bytes": ckpt.stat().st_size,
                  "vision_layout": geometry.layout, "vision": vcfg.model_dump(mode="json"),
                  "adapter": {**shape.__dict__, "l2_norm": adapter_l2_norm},
                  "dropped_keys": sorted("visual." + k for k in dropped),
                  "logit_scale": float(model.logit_scale.detach()),
                  "caption_encoder": str(Path(caption_encoder).resolve()) if caption_encoder else None}
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2))
        _finish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model


# ------------------------------------------------------------------------------ caption-contrastive LLM
# The released CC encoders (docs/METHOD.md 2 and 5): LLM2Vec(pooling_mode="mean", max_length=512,
# skip_instruction=True) over "<|start_header_id|>user<|end_header_id|>\n\n{caption}<|eot_id|>" with
# BOS, bidirectional attention, no instruction; the pooled tokens are the caption's and <|eot_id|>.
OFFICIAL_LLM_SETTINGS = dict(bidirectional=True, pooling="mean", template="llama3", pool_template_suffix=True,
                             instruction=None, max_length=512)
_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "chat_template*", "*.model")


def _files(src: Path, patterns) -> list[Path]:
    return sorted({f for p in patterns for f in src.glob(p) if f.is_file()})


def convert_official_llm(src: str | Path, out: str | Path, name: str | None = None, dtype: str = "bfloat16",
                         max_length: int = 512, overwrite: bool = False) -> Path:
    """Convert a merged caption-contrastive LLM (HF directory) into our caption-encoder directory.

    ``auto_map`` and the custom ``architectures`` of its config.json are dropped (recorded in
    llm2clip_conversion.json); the weights load into transformers' own class for its model_type, so
    no remote code is imported. ``name`` is the base-model name in the encoder's identity (default:
    the directory's name). ``dtype``: the weights' and the encoder's dtype (the official encoders ran
    in bfloat16).
    """
    from transformers import CONFIG_MAPPING, MODEL_MAPPING

    from ..text.config import LLMEncoderConfig
    from ..text.encoder import ENCODER_MANIFEST, CaptionEncoder

    src, out = Path(src), Path(out)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{src}: no config.json; not a Hugging Face model directory")
    config = json.loads(cfg_file.read_text())
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{cfg_file}: model_type {model_type!r} is not a transformers architecture; "
                          "converting it would need its remote code, which is never run")
    base_cls = MODEL_MAPPING[CONFIG_MAPPING[model_type]].__name__
    dropped = {k: config.pop(k) for k in ("auto_map", "architectures") if k in config}
    config["architectures"] = [base_cls]
    weights = _files(src, _WEIGHT_FILES)
    if not any(f.suffix in (".safetensors", ".bin") for f in weights):
        raise ConfigError(f"{src}: no weight files (*.safetensors or pytorch_model*.bin)")
    tmp = _fresh_dir(out, overwrite)
    stage = temp_dir(out)
    try:
        (stage / "config.json").write_text(json.dumps(config, indent=2))
        for f in weights:  # linked, not copied: the stage only fixes config.json
            os.symlink(f.resolve(), stage / f.name)
        for f in _files(src, _TOKENIZER_FILES):
            if f.name == "tokenizer_config.json":
                tc = json.loads(f.read_text())
                if "auto_map" in tc:
                    dropped["tokenizer_auto_map"] = tc.pop("auto_map")
                (stage / f.name).write_text(json.dumps(tc, indent=2))
            else:
                shutil.copy2(f, stage / f.name)
        settings = LLMEncoderConfig(**{**OFFICIAL_LLM_SETTINGS, "model": str(stage), "dtype": dtype,
                                       "max_length": max_length})
        enc = CaptionEncoder.from_config(settings)
        enc._identity["base_model"] = name or src.resolve().name  # not the temporary stage's path
        enc.save(tmp)
        del enc
        if dtype != "float32":
            # A reload hashes the saved (cast) weights; pin that hash, or the directory's own manifest
            # would disagree with every encoder loaded from it.
            identity = CaptionEncoder.from_pretrained(tmp).identity()
            mf = tmp / ENCODER_MANIFEST
            data = json.loads(mf.read_text())
            data["identity"] = identity
            mf.write_text(json.dumps(data, indent=2))
        record = {"kind": "official-llm", "source": str(src.resolve()), "model_type": model_type,
                  "loaded_as": base_cls, "dropped_from_config": dropped, "settings": settings.model_dump(
                      mode="json", exclude={"model", "adapters", "gguf_file", "device"})}
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2))
        _finish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
