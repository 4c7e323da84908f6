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
    # a hub id is 'name' or 'owner/name'; anything else is a path (e.g. 'configs/x/../../runs/enc')
    if resolved.startswith((".", "/", "~")) or ".." in resolved or resolved.count("/") > 1:
        raise ConfigError(f"{resolved}: model path not found (neither a folder nor an 'owner/name' hub id)")
    return LLMSource(resolved, model)  # a hub id: loads where a hub or its cache is reachable


# Elements converted at a time when hashing (16 MiB in fp32): the 8B encoder's largest tensor (the
# embeddings, 0.5 B values) is never copied whole.
HASH_CHUNK = 1 << 22
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _hashed_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 and fp16 values equal their fp32 upcast exactly: hashed as fp32, a model's hash does not depend
    # on whether it was loaded in half precision or in fp32 from half-precision weights
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _hash_tensor(h, name: str, dtype: torch.dtype, shape, chunks) -> None:
    as_dtype = _hashed_dtype(dtype)
    h.update(f"{name}:{as_dtype}:{tuple(shape)};".encode())
    for part in chunks:
        part = part.to(device="cpu", dtype=as_dtype).contiguous().reshape(-1)
        h.update(part.view(torch.uint8).numpy())


def _flat_chunks(t: torch.Tensor):
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), HASH_CHUNK):
        yield flat[i:i + HASH_CHUNK]


def weight_hash(module: torch.nn.Module) -> str:
    """A content hash of every parameter and buffer (names, dtypes, shapes and values).

    bf16/fp16 tensors are hashed as the fp32 values they equal, a chunk at a time, and fp32 ones in place:
    hashing never holds more than one chunk beside the model, and fp32 hashes are those of earlier releases.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        _hash_tensor(h, name, t.dtype, t.shape, _flat_chunks(t))
    return h.hexdigest()


def _safetensors_index(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of a safetensors file, from its JSON header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items()}


def _file_chunks(path: Path, dtype: torch.dtype, start: int, end: int):
    # read from the file a chunk at a time: neither the tensor nor an fp32 copy of it is ever whole in memory
    step = HASH_CHUNK * torch.empty((), dtype=dtype).element_size()
    with open(path, "rb") as f:
        f.seek(start)
        for pos in range(start, end, step):
            yield torch.frombuffer(bytearray(f.read(min(step, end - pos))), dtype=dtype)


def source_weight_hash(module: torch.nn.Module, folder: str | Path) -> str | None:
    """``weight_hash`` of ``module`` as it is when loaded in fp32 from ``folder``, read from the folder's
    safetensors files a chunk at a time: a model loaded in bf16 from fp32 files keeps the identity of those
    files without an fp32 copy. A tensor absent from the files (a tied LM head, a buffer) is hashed as the
    model holds it. None when the folder has no model safetensors file or a shape or dtype differs."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"  # only the model's files: a repo may hold other copies
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    if not files:
        return None
    where = {k: (f, *entry) for f in files for k, entry in _safetensors_index(f).items()}
    prefix = getattr(module, "base_model_prefix", "") or ""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        entry = where.get(name) or where.get(f"{prefix}.{name}")
        if entry is None:
            _hash_tensor(h, name, t.dtype, t.shape, _flat_chunks(t))
            continue
        path, code, shape, start, end = entry
        dtype = _ST_DTYPES.get(code)
        if dtype is None or tuple(shape) != tuple(t.shape) or dtype.is_floating_point != t.is_floating_point():
            return None
        # what an fp32 load holds: floating values as fp32 (when the model's own dtype hashes as fp32)
        held = torch.float32 if dtype.is_floating_point and _hashed_dtype(t.dtype) == torch.float32 else dtype
        _hash_tensor(h, name, held, shape, (c.to(held) for c in _file_chunks(path, dtype, start, end)))
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


def load_weights(source: LLMSource, *, dtype: torch.dtype, causal_lm: bool = False, adapters: list[str] = (),
                 attn_implementation: str = "auto"):
    """(model, weight hash): the model in ``dtype`` with ``adapters`` merged, and the identity hash of its
    fp32 weights, which does not depend on ``dtype``.

    Without adapters, a half-precision model is loaded in that precision directly (an 8B encoder: 16 GB, not
    a 32 GB fp32 copy) and hashed from its files a chunk at a time. Adapters are merged in fp32, as the
    hash of a merge is that of the fp32 merge; the model is cast afterwards.
    """
    half = dtype != torch.float32 and not adapters
    model = load_base_model(source, causal_lm=causal_lm, attn_implementation=attn_implementation,
                            dtype=dtype if half else torch.float32)
    if adapters:
        body = model.get_decoder() if causal_lm else model
        merged = merge_adapters(body, list(adapters))
        if causal_lm:
            model.set_decoder(merged)
        else:
            model = merged
    digest = None
    if half and Path(source.path).is_dir():
        digest = source_weight_hash(model.get_decoder() if causal_lm else model, source.path)
    if digest is None:
        digest = weight_hash(model.get_decoder() if causal_lm else model)
    return model.to(dtype), digest
