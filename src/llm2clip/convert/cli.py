"""`llm2clip convert ...` (import the released checkpoints) and `llm2clip export ...`; registered by llm2clip.cli."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORCE_HELP = "replace --out if llm2clip wrote it (never the working or home folder)"

CONVERT_EPILOG = """\
examples:
  llm2clip convert official-llm ~/hf/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned --out models/llama32-1b-cc
  llm2clip convert official-clip LLM2CLIP-Llama3.2-1B-EVA02-L-14-336.pt --vision eva02-l-14-336 \\
      --caption-encoder models/llama32-1b-cc --out models/llm2clip-eva02-l-336-1b

Nothing of the official code runs: .pt files are read as tensors only (weights_only), and the
LLM's remote code (config.json auto_map) is ignored. Key maps: docs/CHECKPOINTS.md.
"""

EXPORT_EPILOG = """\
examples:
  llm2clip export hf-vision runs/stage2/model --out exports/clip-vision      # CLIPVisionModel for LLaVA
  llm2clip export onnx runs/stage2/model --out exports/onnx                  # vision.onnx + text_adapter.onnx
"""


def add_commands(sub) -> None:
    conv = sub.add_parser(
        "convert", help="import the released LLM2CLIP checkpoints into our formats",
        description="Import the released LLM2CLIP checkpoints: the CLIP .pt (vision tower + adapter) into a "
                    "saved LLM2CLIP model, the caption-contrastive LLM into a caption-encoder directory.",
        epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = conv.add_subparsers(dest="convert_command", metavar="KIND", required=True)

    p = csub.add_parser(
        "official-clip", help="an official EVA-CLIP-style .pt (visual.*, text.*, logit_scale) -> LLM2CLIP model",
        description="Convert an official LLM2CLIP checkpoint (EVA-CLIP CustomCLIP state dict: an EVA02 or "
                    "OpenAI-CLIP ViT under visual.*, the TextProj adapter under text.*, logit_scale) into our "
                    "saved model (model.safetensors + llm2clip_model.json). Mismatched dims (vision head vs "
                    "adapter, adapter vs caption encoder) are refused.",
        epilog="--vision: a preset (eva02-l-14-336, eva02-l-14, eva02-b-16, openai-l-14-336, openai-l-14, "
               "openai-b-16), open_clip:NAME, or a YAML/JSON file with a vision config (kind: open_clip | hf_clip); "
               "default: the preset matching the checkpoint's shapes.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help=".pt / .bin / .safetensors file")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--vision", help="vision tower architecture (see below)")
    p.add_argument("--caption-encoder", type=Path, metavar="DIR",
                   help="our caption-encoder directory that feeds the adapter (pinned in the model; dims checked)")
    p.add_argument("--no-adapter-l2-norm", action="store_true",
                   help="do not L2-normalise caption embeddings before the adapter (default: normalise)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=run_convert_clip)

    p = csub.add_parser(
        "official-llm", help="a merged caption-contrastive LLM (HF directory) -> caption-encoder directory",
        description="Convert a released caption-contrastive LLM (e.g. microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-"
                    "CC-Finetuned, downloaded) into our caption-encoder directory with the released encoders' "
                    "settings set explicitly: bidirectional attention, mean pooling over the caption tokens and "
                    "<|eot_id|>, the Llama-3 user-turn template with BOS, no instruction, max length 512. The "
                    "config's auto_map (remote code) is dropped; transformers' own class loads the weights.")
    p.add_argument("source", type=Path, metavar="HF_DIR", help="local Hugging Face model directory")
    p.add_argument("--out", type=Path, required=True, help="output caption-encoder directory")
    p.add_argument("--name", help="base-model name recorded in the encoder identity (default: the directory name)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="weights and compute dtype (default bfloat16, as the official encoders ran)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per caption with template (default 512)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=run_convert_llm)

    exp = sub.add_parser(
        "export", help="export a saved LLM2CLIP model (HF CLIPVisionModel, ONNX)",
        description="Export a saved LLM2CLIP model for other tools.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = exp.add_subparsers(dest="export_command", metavar="FORMAT", required=True)

    p = esub.add_parser(
        "hf-vision", help="the vision tower as a Hugging Face CLIPVisionModel directory",
        description="Write the vision tower as a Hugging Face vision-model directory (config.json, "
                    "model.safetensors, preprocessor_config.json), e.g. to swap it into a LLaVA-style project. "
                    "Possible for OpenAI-CLIP-architecture open_clip ViTs and hf_clip/hf_siglip towers; other "
                    "towers (small_vit, EVA02) are refused with the reason. The head goes to "
                    "llm2clip_head.safetensors. The export is reloaded and checked against the tower.")
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help="saved LLM2CLIP model directory")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=run_export_hf)

    p = esub.add_parser(
        "onnx", help="ONNX graphs of the vision tower + head and of the text adapter",
        description="Write vision.onnx (images [batch,3,S,S] -> normalised image_embeds) and text_adapter.onnx "
                    "(caption_embeddings [batch,D] -> normalised text_embeds) with llm2clip_onnx.json; the batch "
                    "axis is dynamic. Both are run with onnxruntime (CPU) and compared with PyTorch.")
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help="saved LLM2CLIP model directory")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=run_export_onnx)


def run_convert_clip(args) -> int:
    from .official import convert_official_clip

    convert_official_clip(args.checkpoint, args.out, vision=args.vision, caption_encoder=args.caption_encoder,
                          adapter_l2_norm=not args.no_adapter_l2_norm, overwrite=args.force)
    print(f"model: {args.out}")
    return 0


def run_convert_llm(args) -> int:
    from .official import convert_official_llm

    convert_official_llm(args.source, args.out, name=args.name, dtype=args.dtype, max_length=args.max_length,
                         overwrite=args.force)
    print(f"caption encoder: {args.out}")
    return 0


def run_export_hf(args) -> int:
    from .export import export_hf_vision

    export_hf_vision(args.model, args.out, overwrite=args.force)
    print(f"hf vision model: {args.out}")
    return 0


def run_export_onnx(args) -> int:
    from .export import export_onnx

    record = export_onnx(args.model, args.out, opset=args.opset, overwrite=args.force, verify=not args.no_verify)
    print(json.dumps({k: v.get("max_abs_diff") for k, v in record["graphs"].items()}, indent=2))
    print(f"onnx: {args.out}")
    return 0
