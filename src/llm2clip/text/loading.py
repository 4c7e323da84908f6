"""Loading a decoder LLM for caption encoding: HF directory, hub id, or GGUF file; LoRA merging.

A GGUF file is dequantized once and cached as safetensors with its tokenizer, so later loads
take a fraction of a second instead of ~20 s.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..assets import cache_dir, resolve_model_alias
from ..errors import ConfigError
from ..fileio import building_dir
from ..hashing import file_sha256 as _file_digest

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LLMSource:
    """Where the weights of an LLM come from, after aliases and GGUF caching are resolved."""

    path: str  # a local directory or a hub id
    origin: str  # what the user named



def convert_gguf(gguf_path: Path, out_root: Path | None = None) -> Path:
    """Dequantize a GGUF model into a cached safetensors directory (done once per file content)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConfigError(f"{gguf_path}: GGUF file not found")
    digest = _file_digest(gguf_path)[:16]
    out = (out_root or cache_dir() / "gguf") / f"{gguf_path.stem}-{digest}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, out)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantized already; the GGUF quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with building_dir(out, keep_existing=True) as tmp:  # a concurrent conversion may win; it is kept
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "llm2clip_source.json").write_text(json.dumps({"gguf": gguf_path.name, "sha256_16": digest}))
    return out


def resolve_source(model: str, gguf_file: str | None = None) -> LLMSource:
    resolved = resolve_model_alias(model)
    p = Path(resolved).expanduser()
    if p.suffix == ".gguf":
        return LLMSource(str(convert_gguf(p)), model)
    if gguf_file:
        return LLMSource(str(convert_gguf(p / gguf_file)), model)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p}: not a Hugging Face model directory (no config.json)")
        return LLMSource(str(p), model)
    if resolved.startswith((".", "/", "~")):
        raise ConfigError(f"{resolved}: model path not found")
    return LLMSource(resolved, model)  # a hub id: loads where a hub or its cache is reachable


# Elements converted at a time when hashing a half-precision tensor (16 MiB in fp32): the 8B encoder's
# largest tensor (the embeddings, 0.5 B values) is never copied whole.
HASH_CHUNK = 1 << 22


def weight_hash(module: torch.nn.Module) -> str:
    """A content hash of every parameter and buffer (names, dtypes, shapes and values).

    bf16 and fp16 values are hashed as the float32 values they equal exactly, a chunk at a time, so a
    model loaded in bf16 from bf16 weights hashes as it did loaded in fp32, and hashing never holds more
    than one chunk beside the model. fp32 and integer tensors are hashed in place, without a copy.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        as_dtype = torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype
        h.update(f"{name}:{as_dtype}:{tuple(t.shape)};".encode())
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), HASH_CHUNK):
            part = flat[i:i + HASH_CHUNK].to(device="cpu", dtype=as_dtype).contiguous()
            h.update(part.view(torch.uint8).numpy())
    return h.hexdigest()


def _adapter_has_nonzero_b(adapter_dir: Path) -> bool:
    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        return True  # .bin adapters: cannot cheaply tell, assume trained
    with safe_open(str(f), "pt") as sf:
        return any("lora_B" in k and sf.get_tensor(k).abs().sum() > 0 for k in sf.keys())


def merge_adapters(model: torch.nn.Module, adapters: list[str]) -> torch.nn.Module:
    """Merge LoRA adapters one after another, checking that each really changes the weights.

    The official stage-1 code merged adapters whose key prefixes did not match the model, which
    PEFT accepts with a warning and no effect (docs/METHOD.md 1.2). Here that is an error.
    """
    from peft import PeftModel

    for adapter in adapters:
        a = Path(adapter)
        if not (a / "adapter_config.json").is_file():
            raise ConfigError(f"{a}: not a LoRA adapter directory (no adapter_config.json)")
        before = weight_hash(model)
        peft_model = PeftModel.from_pretrained(model, str(a))
        model = peft_model.merge_and_unload()
        if weight_hash(model) == before and _adapter_has_nonzero_b(a):
            raise ConfigError(
                f"{a}: merging this adapter changed no weight; its keys do not match this model "
                "(was it trained on another model class or prefix?)"
            )
    return model


def load_tokenizer(source: LLMSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)


def load_base_model(source: LLMSource, *, causal_lm: bool = False, attn_implementation: str = "auto",
                    dtype: torch.dtype = torch.float32):
    """The transformer body (AutoModel) for encoding, or the LM-head model (for MNTP).

    Only SDPA and eager attention take our 4-D bidirectional mask as given; FlashAttention
    would drop it, so it is never chosen here.
    """
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    impl = None if attn_implementation == "auto" else attn_implementation
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the body-from-LM checkpoint report lists lm_head as unexpected
    try:
        model = cls.from_pretrained(source.path, dtype=dtype, attn_implementation=impl)
    except OSError as err:
        raise ConfigError(f"cannot load model '{source.origin}': {err}") from None
    finally:
        hf_logging.set_verbosity(level)
    if model.config._attn_implementation not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    return model
