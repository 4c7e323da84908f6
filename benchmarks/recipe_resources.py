"""Memory and disk the paper's recipe needs, computed from the architectures (nothing is trained or timed).

    python benchmarks/recipe_resources.py [--images-millions 15] [--captions-per-image 2]

Parameters are counted on models built on the meta device (no memory): Llama-3-8B from its config, open_clip's
ViT-L/14-336 vision tower, and our text adapter at the official layout (4 blocks, 4096-d input, expansion 2,
1280-d output). Bytes are parameters x bytes per value; AdamW training state is fp32 weights, gradients and two
moments (16 bytes a parameter). Activations depend on batch size, sequence length and checkpointing and are not
included: what is printed is a floor, labelled as computed.
"""

from __future__ import annotations

import argparse

import torch

GB = 1e9


def llama3_8b_params() -> int:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        body = LlamaModel(cfg)  # the caption encoder is the body: no LM head
    return sum(p.numel() for p in body.parameters())


def vit_l14_336_params() -> int:
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model("ViT-L-14-336", pretrained=None, device="meta")
    return sum(p.numel() for p in model.visual.parameters())


def adapter_params(in_dim: int = 4096, out_dim: int = 1280) -> int:
    from llm2clip.model import TextAdapter

    with torch.device("meta"):
        adapter = TextAdapter(in_dim, out_dim, depth=4, expansion=2, dropout=0.0, l2_norm=True, standardize=False)
    return sum(p.numel() for p in adapter.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images-millions", type=float, default=15.0, help="training images (millions)")
    ap.add_argument("--captions-per-image", type=int, default=2, help="stored captions per image (short + dense)")
    args = ap.parse_args(argv)
    llm, vit, adapter = llama3_8b_params(), vit_l14_336_params(), adapter_params()
    captions = args.images_millions * 1e6 * args.captions_per_image
    print("Computed from the architectures, not measured; activations not included.\n")
    print("| what | parameters | memory or disk (computed) |")
    print("|---|---:|---:|")
    print(f"| embedding pass: Llama-3-8B caption encoder, bf16 weights | {llm / 1e9:.2f} B | {llm * 2 / GB:.1f} GB |")
    head = 128256 * 4096  # MNTP predicts tokens: the LM head (untied in Llama-3-8B) is loaded too
    print(f"| stage 1: the same LLM with its LM head (MNTP), bf16, + LoRA | {(llm + head) / 1e9:.2f} B | "
          f"{(llm + head) * 2 / GB:.1f} GB + LoRA state (< 0.1 GB) |")
    store = captions * 4096 * 2
    print(f"| feature store: {captions / 1e6:.0f} M captions x 4096-d in bf16 | - | {store / GB:.0f} GB |")
    print(f"| stage 2: ViT-L/14-336 vision tower | {vit / 1e6:.1f} M | {vit * 16 / GB:.1f} GB (AdamW, fp32) |")
    print(f"| stage 2: text adapter, 4096-d in, 4 blocks | {adapter / 1e6:.1f} M | {adapter * 16 / GB:.1f} GB "
          "(AdamW, fp32) |")
    print(f"| stage 2: both, trained together | {(vit + adapter) / 1e6:.1f} M | {(vit + adapter) * 16 / GB:.1f} GB "
          "+ activations |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
