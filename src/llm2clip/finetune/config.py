"""The stage-1 config: `llm2clip finetune-text CONFIG`. Relative paths in the file (out, data, eval
groups, the encoder's local model and adapters) are relative to its folder (llm2clip.config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import StrictModel, resolve_path
from ..text.config import LLMEncoderConfig
from ..tracking import LoggingConfig

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    top_layers: int | None = Field(None, ge=1, description="LoRA on the top N layers only (None: every layer)")


class DataSettings(StrictModel):
    cupl_train: bool = Field(True, description="the CuPL training classes as caption groups")
    cupl_per_class: int | None = Field(20, ge=2, description="descriptions per CuPL class (None: all)")
    groups: list[str] = Field(default_factory=list, description="JSONL files of caption groups")
    text: list[str] = Field(default_factory=list, description=(
        "plain-text corpora (one document per line): MNTP's text; in contrastive runs, mixed in as "
        "unsupervised SimCSE pairs (a document and itself under dropout)"))
    heldout_text_fraction: float = Field(0.05, ge=0, lt=1, description="MNTP: share of blocks held out for eval")

    def resolve_paths(self, base: Path) -> None:
        self.groups = [resolve_path(p, base) for p in self.groups]
        self.text = [resolve_path(p, base) for p in self.text]


class ContrastiveSettings(StrictModel):
    batch_size: int = Field(64, ge=2, description="pairs per step, over all processes")
    chunk_size: int | None = Field(None, ge=1, description=(
        "gradient caching: sequences per forward (None: all at once)"))
    bucket_ratio: float | None = Field(1.25, ge=1, description=(
        "one forward per length bucket (longest at most this times the shortest), so short captions "
        "are not padded to the dense ones' length (None: one padded forward)"))
    scale: float = Field(50.0, gt=0, description="logit scale (1 / temperature)")
    hard_negatives: bool = True
    mask_same_group: bool = True
    symmetric: bool = False
    query_instruction: str | None = Field(None, description="instruction on queries only (documents get the encoder's)")
    cache_trunk: bool = Field(True, description="with lora.top_layers, compute the frozen layers once per caption")


class MNTPSettings(StrictModel):
    mask_probability: float = Field(0.2, gt=0, lt=1)
    mask_token: str = "_"
    block_size: int = Field(128, ge=8)
    batch_size: int = Field(8, ge=1)


class OptimSettings(StrictModel):
    steps: int = Field(200, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "bf16"
    frozen_dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "storage of the frozen LLM weights (LoRA stays fp32): bfloat16 halves the memory of a large LLM (an 8B "
        "one: 16 GB instead of 32) and keeps the residual stream in bf16, which moves embeddings (needs "
        "precision bf16)"))
    grad_checkpointing: bool = False
    seed: int = 42


class EvalSettings(StrictModel):
    every: int = Field(0, ge=0, description="CRA every N steps (0: only at the end)")
    final: bool = Field(True, description="CRA at the end (a caller that evaluates the encoder itself can skip it)")
    cupl_classes: int = Field(200, ge=2)
    per_class: int = Field(5, ge=2)
    mask_class_names: bool = False
    groups: list[str] = Field(default_factory=list, description=(
        "JSONL caption groups of held-out images with kinds: each group's first `query_kind` caption "
        "queries the distinct `doc_kind` captions (e.g. dense -> short)"))
    query_kind: str = "dense"
    doc_kind: str = "short"

    def resolve_paths(self, base: Path) -> None:
        self.groups = [resolve_path(p, base) for p in self.groups]


class FinetuneConfig(StrictModel):
    objective: Literal["contrastive", "mntp"] = "contrastive"
    encoder: LLMEncoderConfig
    out: str = Field(description="run folder (relative to the config file's folder): checkpoints, metrics.jsonl, "
                                 "adapter/, encoder/")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    contrastive: ContrastiveSettings = Field(default_factory=ContrastiveSettings)
    mntp: MNTPSettings = Field(default_factory=MNTPSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    save_every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    log_every: int = Field(1, ge=1)
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description=(
        "TensorBoard / wandb views of metrics.jsonl (llm2clip.tracking)"))

    @model_validator(mode="after")
    def _check(self):
        if self.optim.frozen_dtype == "bfloat16" and self.optim.precision != "bf16":
            raise ValueError("optim.frozen_dtype bfloat16 needs optim.precision bf16 (bf16 weights in fp32 matmuls)")
        if self.encoder.bf16_linears != "none":  # its weights are rounded: the fine-tuned encoder could not be saved
            raise ValueError(f"encoder.bf16_linears {self.encoder.bf16_linears!r}: stage 1 trains and saves the "
                             "encoder in full precision; use none here (bf16_linears is for embedding and queries)")
        if self.objective == "mntp" and not (self.data.text or self.data.cupl_train or self.data.groups):
            raise ValueError("mntp needs text: data.text, data.groups or data.cupl_train")
        return self

    def resolve_paths(self, base: Path) -> None:
        self.out = resolve_path(self.out, base)
        self.encoder.resolve_paths(base)
        self.data.resolve_paths(base)
        self.eval.resolve_paths(base)
