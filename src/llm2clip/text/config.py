"""Configs of the text encoders: the LLM caption encoder and the baselines it is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from ..config import StrictModel

Pooling = Literal["mean", "weighted_mean", "last_token", "first_token"]
Template = Literal["none", "tokenizer", "llama3"]
DType = Literal["float32", "bfloat16", "float16"]
BF16Linears = Literal["none", "mlp", "all"]


def _model_path(p: str, base: Path) -> str:
    """A model field is a path (relative to the config's folder) when it starts with '.' or names something
    there; otherwise an alias or hub id, kept as written."""
    q = Path(p).expanduser()
    return str(base / q) if not q.is_absolute() and (p.startswith(".") or (base / q).exists()) else p


class LLMEncoderConfig(StrictModel):
    """A decoder LLM used as a caption encoder (docs/METHOD.md 1.1, 2 and 6).

    The template and instruction are explicit: nothing is inferred from the model's name.
    """

    kind: Literal["llm"] = "llm"
    model: str = Field(description="an alias (smollm2-135m-instruct), a local HF directory, a .gguf file, or a hub id")
    gguf_file: str | None = Field(None, description="GGUF file name inside `model` when `model` is a directory")
    adapters: list[str] = Field(default_factory=list, description="LoRA adapter directories merged in order")
    bidirectional: bool = True
    pooling: Pooling = "mean"
    template: Template = Field("none", description="none, tokenizer (its own chat template) or llama3 (user turn)")
    instruction: str | None = Field(None, description="put before the caption as '<instruction>; '")
    pool_template_suffix: bool = Field(
        True, description="also pool the template's closing tokens (e.g. <|eot_id|>), as the released encoders do"
    )
    max_length: int = Field(512, ge=8)
    dtype: DType = "float32"
    bf16_linears: BF16Linears = Field(
        "none", description=(
            "with dtype float32, run these linear layers with bf16 weights and matmuls; everything else (embeddings, "
            "norms, residual stream, attention, pooling) stays fp32. mlp: the MLP projections only (SmolLM2-135M on "
            "CuPL, minimum cosine to fp32: 0.9999 causal, 0.977 bidirectional; benchmarks/CAPTION_ENCODER.md); all: "
            "every linear, the attention projections too (0.997 causal: bf16 queries and keys move outlier tokens)")
    )
    batch_size: int = Field(32, ge=1)
    batching: Literal["exact", "padded", "packed"] = Field(
        "exact", description=(
            "exact: each forward holds captions of one token length, so nothing is padded and a caption's "
            "embedding is the one it has alone, bit for bit in bf16 too; padded: length-sorted batches padded to "
            "their longest caption (an embedding then moves with its companions, to about 1e-4 in bf16); packed: "
            "rows of several captions with a block-diagonal mask (equal to alone up to float rounding)")
    )
    pack_tokens: int = Field(512, ge=8, description="tokens per row when batching is packed")
    device: str = "cpu"
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="auto: SDPA where the family supports it, else eager (Gemma 2)"
    )

    @model_validator(mode="after")
    def _bf16_linears_over_fp32(self):
        if self.bf16_linears != "none" and self.dtype != "float32":
            raise ValueError(f"bf16_linears {self.bf16_linears!r} needs dtype float32 (it casts some linears of an "
                             f"fp32 model), not {self.dtype}")
        return self

    @field_validator("instruction")
    @classmethod
    def _strip_instruction(cls, v: str | None) -> str | None:
        return v.strip() or None if isinstance(v, str) else v

    def resolve_paths(self, base: Path) -> None:
        self.model = _model_path(self.model, base)
        self.adapters = [_model_path(a, base) for a in self.adapters]


class SentenceEncoderConfig(StrictModel):
    """A BERT-style sentence encoder with mean pooling (all-MiniLM-L6-v2): the non-LLM baseline."""

    kind: Literal["sentence"] = "sentence"
    model: str = "all-minilm-l6-v2"

    def resolve_paths(self, base: Path) -> None:
        self.model = _model_path(self.model, base)
    max_length: int = Field(256, ge=8)
    batch_size: int = Field(64, ge=1)
    device: str = "cpu"


class RandomEncoderConfig(StrictModel):
    """Random vectors: the chance floor of every caption metric."""

    kind: Literal["random"] = "random"
    dim: int = Field(576, ge=1)
    seed: int = 0


TextEncoderConfig = Annotated[
    LLMEncoderConfig | SentenceEncoderConfig | RandomEncoderConfig, Field(discriminator="kind")
]
