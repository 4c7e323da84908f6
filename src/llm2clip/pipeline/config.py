"""The config of `llm2clip run`: the whole method, and the text-teacher comparison, from one file.

Relative paths in the file (run_dir, the LLM's and the teachers' local models, the vision tower's weights,
fashion_mnist.root) are relative to its folder (llm2clip.config); a preset's, to the working directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from ..config import StrictModel, resolve_path
from ..finetune.config import ContrastiveSettings, LoraSettings, OptimSettings
from ..model import ClipTextConfig, ModelConfig
from ..text.config import LLMEncoderConfig, TextEncoderConfig
from ..train.config import LoopConfig, OptimConfig


class LLMTeacher(StrictModel):
    """The run's LLM (`llm`) as caption encoder: as it is, or after stage 1 (`finetuned: true`)."""

    kind: Literal["llm"] = "llm"
    finetuned: bool = False
    bidirectional: bool | None = Field(None, description=(
        "this teacher's attention (default: llm.bidirectional); a fine-tuned teacher runs its own stage 1 with it"))
    label: str | None = Field(None, description="row name in the report")


class EncoderTeacher(StrictModel):
    """Any other caption encoder (e.g. all-MiniLM-L6-v2, the non-LLM row)."""

    kind: Literal["encoder"] = "encoder"
    encoder: TextEncoderConfig
    label: str | None = None


class ClipTeacher(StrictModel):
    """No teacher: a CLIP text transformer trained jointly from scratch (the vanilla-CLIP row)."""

    kind: Literal["clip"] = "clip"
    text: ClipTextConfig = Field(default_factory=ClipTextConfig)
    label: str | None = None


Teacher = Annotated[LLMTeacher | EncoderTeacher | ClipTeacher, Field(discriminator="kind")]


class Variant(StrictModel):
    """One stage-2 run: a teacher and the share of dense captions among the training captions."""

    teacher: str
    dense: float = Field(0.5, ge=0, le=1, description="probability that a sample's caption is the dense one")

    @property
    def name(self) -> str:
        return f"{self.teacher}-dense{round(self.dense * 100)}"


def variant_run(variant: str, k: int) -> str:
    """The stage-2 run of ``variant`` with its k-th seed (stage ``train/<this>``, folder ``train/<this>``)."""
    return f"{variant}/s{k}"


class ScenesSettings(StrictModel):
    """The generated scenes (llm2clip.data.scenes): training images and held-out images."""

    train: int = Field(1000, ge=8)
    val: int = Field(250, ge=4)
    seed: int = 0
    val_offset: int = Field(1_000_000, ge=0, description="held-out scenes start here (never trained on)")
    render_size: int = Field(32, ge=8)
    min_objects: int = Field(2, ge=1, le=9)
    max_objects: int = Field(5, ge=1, le=9)


class Stage1Settings(StrictModel):
    """Caption-contrastive LoRA fine-tuning of `llm` (only when a teacher has `finetuned: true`)."""

    cupl_per_class: int | None = Field(4, ge=2, description="descriptions per CuPL training class")
    scenes: int = Field(500, ge=0, description="training scenes whose short/dense caption pairs join the groups")
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(top_layers=2))
    contrastive: ContrastiveSettings = Field(default_factory=lambda: ContrastiveSettings(batch_size=32))
    optim: OptimSettings = Field(default_factory=lambda: OptimSettings(steps=60, lr=1e-3, warmup_steps=5))


class Stage2Settings(StrictModel):
    """What every variant shares: the vision tower, the adapter, the loop. `model.text` is the
    adapter for embedding teachers; the CLIP teacher replaces it with its text transformer."""

    model: ModelConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)
    seeds: int = Field(1, ge=1, description=(
        "training runs per variant, with seeds seed, seed+1, ...: the tower's initialisation and the data order; "
        "the report's intervals and verdicts come from these runs and a bootstrap over held-out images"))


class FashionMnistSettings(StrictModel):
    """Stage 2 on real photos (Fashion-MNIST, Debian package dataset-fashion-mnist) with class-level captions
    (CuPL descriptions as dense, a class name as short), then zero-shot classification of its test split."""

    enabled: Literal["auto", "on", "off"] = Field("auto", description="auto: when the Debian files are present")
    root: str | None = Field(None, description="folder of the idx files (default: the Debian package's)")
    train: int = Field(3000, ge=10, description="training images (first N of the train split)")
    test: int = Field(2000, ge=10, description="zero-shot test images (first N of the test split)")
    per_class: int = Field(20, ge=1, description="CuPL descriptions per class as dense captions")
    steps: int = Field(150, ge=1)
    teachers: list[str] | None = Field(None, description="default: every teacher of the variants")

    @field_validator("enabled", mode="before")
    @classmethod
    def _yaml_bool(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads off/on as booleans


class EvalSettings(StrictModel):
    cupl_classes: int = Field(100, ge=2, description="CRA on this many held-out CuPL classes")
    cupl_per_class: int = Field(5, ge=2)
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])


def _known_teacher(name: str, info, where: str) -> None:
    teachers = info.data.get("teachers")  # absent when the teachers themselves failed to validate
    if teachers and name not in teachers:
        raise ValueError(f"{where}unknown teacher {name!r} (teachers: {sorted(teachers)})")


class PipelineConfig(StrictModel):
    run_dir: str = Field("runs/run", description=(
        "relative to the config file's folder (a preset's and a --run-dir override: to the working directory)"))
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads of single-process stages")
    parallel: int = Field(1, ge=1, description=(
        "stages at once, one process and one thread each (>1: stage 1 and stage-2 variants run in a pool)"))
    llm: LLMEncoderConfig
    embed_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    scenes: ScenesSettings = Field(default_factory=ScenesSettings)
    stage1: Stage1Settings = Field(default_factory=Stage1Settings)
    teachers: dict[str, Teacher]
    variants: list[Variant] = Field(min_length=1)
    stage2: Stage2Settings
    fashion_mnist: FashionMnistSettings = Field(default_factory=FashionMnistSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @field_validator("teachers")
    @classmethod
    def _teacher_names(cls, teachers):
        for name in teachers:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"{name!r} must be letters, digits, '-' or '_' (it names folders)")
        return teachers

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants, info):
        for i, v in enumerate(variants):
            _known_teacher(v.teacher, info, f"item {i}: ")
        names = [v.name for v in variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{dup} listed twice")
        return variants

    @field_validator("fashion_mnist")
    @classmethod
    def _fm_teachers(cls, fm, info):
        for t in fm.teachers or []:
            _known_teacher(t, info, "teachers: ")
        return fm

    def fashion_mnist_teachers(self) -> list[str]:
        """The teachers trained on Fashion-MNIST in this run (none when it is off or absent)."""
        from ..data import fashion_mnist as fm

        s = self.fashion_mnist
        root = s.root or fm.DEFAULT_DIR
        if s.enabled == "off" or (s.enabled == "auto" and not fm.available(root)):
            return []
        if not fm.available(root):
            raise ValueError(f"fashion_mnist.enabled is on but {root} has no Fashion-MNIST files "
                             "(apt-get install dataset-fashion-mnist)")
        used = list(dict.fromkeys(v.teacher for v in self.variants))
        return [t for t in used if t in (s.teachers or used)]

    def resolve_paths(self, base: Path) -> None:
        self.run_dir = resolve_path(self.run_dir, base)
        self.llm.resolve_paths(base)
        for t in self.teachers.values():
            hook = getattr(t.encoder, "resolve_paths", None) if isinstance(t, EncoderTeacher) else None
            if callable(hook):
                hook(base)
        self.stage2.model.resolve_paths(base)
        self.fashion_mnist.root = resolve_path(self.fashion_mnist.root, base)

    def teacher_llm(self, name: str) -> LLMEncoderConfig:
        """The LLM of an LLM teacher as it encodes (before stage 1's weights, for a fine-tuned one)."""
        t = self.teachers[name]
        return self.llm if t.bidirectional is None else self.llm.model_copy(update={"bidirectional": t.bidirectional})

    def finetuned_teachers(self) -> list[str]:
        return [k for k, t in self.used_teachers().items() if isinstance(t, LLMTeacher) and t.finetuned]

    def teacher_label(self, name: str) -> str:
        return self.teachers[name].label or name

    def used_teachers(self) -> dict[str, Teacher]:
        used = {v.teacher for v in self.variants}
        return {k: t for k, t in self.teachers.items() if k in used}
