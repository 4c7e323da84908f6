"""The stage-2 run config (YAML), validated by the project's config layer.

Relative paths in a config file are relative to its folder (llm2clip.config); each config's
``resolve_paths`` fixes its own fields and calls those of the configs inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..config import StrictModel
from ..config import resolve_path as _rel
from ..data.images import BagOfWordsConfig
from ..model import ModelConfig
from ..text.config import LLMEncoderConfig, RandomEncoderConfig, SentenceEncoderConfig
from ..tracking import LoggingConfig


class ScenesSource(StrictModel):
    """Generated scenes (llm2clip.data.scenes): held-out sets use another `offset`."""

    kind: Literal["scenes"] = "scenes"
    count: int = Field(2000, ge=1)
    seed: int = 0
    offset: int = Field(0, ge=0)
    min_objects: int = Field(2, ge=1, le=9)
    max_objects: int = Field(5, ge=1, le=9)
    render_size: int = Field(64, ge=8)

    def resolve_paths(self, base: Path) -> None:
        pass


class ManifestSource(StrictModel):
    """A JSONL or CSV manifest of images and caption ids (see llm2clip.data.images.load_manifest)."""

    kind: Literal["manifest"] = "manifest"
    path: str
    image_root: str | None = Field(None, description="base of relative image paths (default: the manifest's "
                                   "folder); a path leading out of it is refused")
    allow_absolute_paths: bool = Field(False, description="accept absolute image paths in the manifest")

    def resolve_paths(self, base: Path) -> None:
        self.path = _rel(self.path, base)
        self.image_root = _rel(self.image_root, base)


class FashionMnistSource(StrictModel):
    """Fashion-MNIST from the Debian package, with class-level captions (CuPL descriptions as dense)."""

    kind: Literal["fashion_mnist"] = "fashion_mnist"
    split: Literal["train", "test"] = "train"
    count: int | None = Field(None, ge=1)
    root: str | None = None
    per_class: int = Field(20, ge=1)

    def resolve_paths(self, base: Path) -> None:
        self.root = _rel(self.root, base)


class WebDatasetSource(StrictModel):
    """Webdataset tar shards (llm2clip.data.shards): per sample an image and a JSON of caption ids and kinds,
    joined with the feature store by id. Streamed in a seeded order; each rank reads its own shards."""

    kind: Literal["webdataset"] = "webdataset"
    shards: str | list[str] = Field(
        description="a folder written by `llm2clip shards`, a brace pattern (shards/train-{000000..000009}.tar) "
                    "or a list of tar files and patterns; each may be a URL read through fsspec (s3://, gs://, "
                    "https://, file://, ...) or a pipe:CMD whose output is the tar")
    shuffle_shards: int = Field(4, ge=1, description="samples are shuffled together across this many shards")
    retries: int = Field(3, ge=0, description="remote shards: fetches again after a failed one, before the "
                                              "shard is skipped (logged and counted)")
    timeout: float = Field(60.0, gt=0, description="http(s) shards: seconds to connect or between reads "
                                                   "before a try fails")
    storage_options: dict = Field(default_factory=dict, description="remote shards: fsspec options "
                                            "(e.g. endpoint_url, anon)")

    def resolve_paths(self, base: Path) -> None:
        def rel(s: str) -> str:  # URLs and commands stay as written
            from ..data.shards import is_url

            return s if is_url(s) or s.startswith("file://") else _rel(s, base)

        if isinstance(self.shards, str):  # webdataset's '::' joins patterns; each resolves on its own
            self.shards = "::".join(rel(s) for s in self.shards.split("::"))
        else:
            self.shards = [rel(s) for s in self.shards]


DataSource = Annotated[ScenesSource | ManifestSource | FashionMnistSource | WebDatasetSource,
                       Field(discriminator="kind")]
CaptionEncoderConfig = Annotated[
    LLMEncoderConfig | SentenceEncoderConfig | RandomEncoderConfig | BagOfWordsConfig, Field(discriminator="kind")
]


class FeaturesConfig(StrictModel):
    """Where caption embeddings come from: a feature store on disk, or a caption encoder run once, in
    memory, over every caption of the data (small data sets only)."""

    store: str | None = None
    encoder: CaptionEncoderConfig | None = None
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.store is None) == (self.encoder is None):
            raise ValueError("give exactly one of `store` (a feature store path) or `encoder` (embed in memory)")
        return self

    def resolve_paths(self, base: Path) -> None:
        self.store = _rel(self.store, base)
        if self.encoder is not None and hasattr(self.encoder, "resolve_paths"):
            self.encoder.resolve_paths(base)


class DataConfig(StrictModel):
    train: DataSource
    val: DataSource | None = Field(None, description="held-out set for retrieval during training")
    val_max: int = Field(1000, ge=2, description="at most this many validation images")
    features: FeaturesConfig | None = Field(None, description="required with the adapter text side")
    caption_kinds: dict[str, float] = Field(default_factory=lambda: {"short": 0.5, "dense": 0.5},
                                            description="probability of each caption kind per sample")
    augment: Literal["none", "crop"] = Field("none", description="crop: RandomResizedCrop(0.9-1.0)")
    workers: int = Field(0, ge=0)
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="more unreadable images than this is an error")

    def resolve_paths(self, base: Path) -> None:
        self.train.resolve_paths(base)
        if self.val is not None:
            self.val.resolve_paths(base)
        if self.features is not None:
            self.features.resolve_paths(base)


class OptimConfig(StrictModel):
    lr: float = Field(5e-4, gt=0)
    visual_lr: float | None = Field(None, gt=0, description="default: lr")
    text_lr: float | None = Field(None, gt=0, description="default: lr (adapter or text tower)")
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float = Field(0.85, gt=0, le=1, description="vision tower, per block from the top; 1 = off")
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)


class LoopConfig(StrictModel):
    batch_size: int = Field(64, ge=2, description="global contrastive batch (all ranks, all accumulation steps)")
    steps: int = Field(1000, ge=1)
    accum_steps: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description=(
        "auto: bf16 autocast on a GPU, fp32 elsewhere (a CPU gains nothing from bf16 at these sizes)"))
    tf32: bool = Field(True, description="on a GPU, TF32 tensor cores for the fp32 matmuls that remain")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="fsdp: shard parameters, gradients and optimizer "
                                             "state over ranks (FSDP2), for towers too large to replicate")
    grad_checkpointing: bool = False
    local_loss: bool = True
    gather_with_grad: bool = True
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="0: only at the end (when data.val is set)")
    eval_k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    eval_batch_size: int = Field(256, ge=1)
    log_every: int = Field(10, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")


class RunConfig(StrictModel):
    run_dir: str = Field("runs/stage2", description="relative to the config file's folder (a --run-dir override: "
                                                   "to the working directory)")
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description=(
        "TensorBoard / wandb views of metrics.jsonl (llm2clip.tracking)"))

    @model_validator(mode="after")
    def _text_needs_features(self):
        if self.model.text.kind == "adapter" and self.data.features is None:
            raise ValueError("data.features is required when model.text is the adapter")
        if self.train.strategy == "fsdp" and self.train.precision == "fp16":
            raise ValueError("train.strategy fsdp runs with precision fp32 or bf16 (fp16 loss scaling is not "
                             "supported on sharded gradients)")
        return self

    def resolve_paths(self, base: Path) -> None:
        self.run_dir = _rel(self.run_dir, base)
        self.model.resolve_paths(base)
        self.data.resolve_paths(base)
