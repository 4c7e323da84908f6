"""From a PipelineConfig to the list of stages, each with its key, inputs and folder; and the run."""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..fileio import folder_lock
from ..model import AdapterConfig
from . import stages as S
from .config import ClipTeacher, LLMTeacher, PipelineConfig, variant_run
from .runner import Runner, Stage, sigterm_stops

PRESETS = ("quickstart", "smoke")

# Stage keys hold the settings that differ from their defaults, so that a field added by a newer version (at a
# default that keeps the old behaviour) does not make a rerun redo finished stages. A changed default is not seen
# by the keys: tests/test_pipeline_keys.py snapshots every default and fails until KEY_VERSION is bumped (when the
# change alters a stage's output) and the snapshot rewritten.
KEY_VERSION = 2
_FOR_KEYS = contextvars.ContextVar("llm2clip_stage_keys", default=False)


def _dump(model) -> dict:
    """A config as it enters a stage: every field for its arguments; for its key, the fields that differ from
    their defaults, plus every ``kind`` (a union member's tag: two kinds at their defaults must not look alike)."""
    full = model.model_dump(mode="json")
    if not _FOR_KEYS.get():
        return full
    return _with_kinds(model.model_dump(mode="json", exclude_defaults=True), full)


def _with_kinds(short, full):
    if isinstance(short, dict) and isinstance(full, dict):
        out = {k: _with_kinds(v, full.get(k)) for k, v in short.items()}
        if "kind" in full:
            out.setdefault("kind", full["kind"])
        return out
    if isinstance(short, list) and isinstance(full, list) and len(short) == len(full):
        return [_with_kinds(a, b) for a, b in zip(short, full)]
    return short


@contextmanager
def _keys_only():
    token = _FOR_KEYS.set(True)
    try:
        yield
    finally:
        _FOR_KEYS.reset(token)

# Priors for the time-left display: one thread's seconds in the recorded quickstart (SmolLM2-135M in bf16, the
# patch-8 / width-96 tower), divided among the pool's workers; rescaled by how the run does as stages finish.
_EST_CAPTION_S = {"llm": 0.1, "sentence": 0.022, "random": 0.0001}
_EST_STEP_S = 0.14  # a stage-2 step with the adapter, batch 64
_EST_CLIP_STEP_FACTOR = 3.4  # with the CLIP text tower instead


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (and no such config file): presets are {', '.join(PRESETS)}")
    return Path(str(resources.files("llm2clip") / "configs" / f"{name}.yaml"))


def load_pipeline_config(path_or_preset: str | Path) -> PipelineConfig:
    """A config file (relative paths: to its folder) or a preset by name (relative paths: to the working
    directory, since a preset lives inside the installed package: `llm2clip quickstart` writes runs/quickstart)."""
    p = Path(path_or_preset)
    if not p.suffix and not p.exists():
        return load_config(preset_path(str(path_or_preset)), PipelineConfig, base=".")  # or an error listing them
    return load_config(p, PipelineConfig)


def _llm_cfg(cfg: PipelineConfig, name: str, run_dir: Path) -> dict:
    base = _dump(cfg.teacher_llm(name))
    if cfg.teachers[name].finetuned:
        base["model"] = str((run_dir / "stage1" / name / "encoder").absolute())
        base["adapters"] = []
    return base


def build_stages(cfg: PipelineConfig) -> list[Stage]:
    """The run's stages in order. Each stage's key holds its non-default settings (and KEY_VERSION); its
    ``legacy_key``, every setting, as runs made before KEY_VERSION 2 recorded it (such a run is adopted)."""
    stages = _build_stages(cfg)
    with _keys_only():
        keyed = _build_stages(cfg)
    for st, k in zip(stages, keyed, strict=True):
        assert st.name == k.name
        st.legacy_key, st.key = st.key, {"key_version": KEY_VERSION, **k.key}
    return stages


def _build_stages(cfg: PipelineConfig) -> list[Stage]:
    run_dir = Path(cfg.run_dir)
    sc = _dump(cfg.scenes)
    try:
        fm_teachers = cfg.fashion_mnist_teachers()
    except ValueError as err:
        raise ConfigError(f"fashion_mnist: {err}") from None
    fm_per_class = cfg.fashion_mnist.per_class if fm_teachers else None
    stages = [Stage("data", {"scenes": sc, "stage1_scenes": cfg.stage1.scenes, "fashion_mnist": fm_per_class,
                             "heldout_groups": True},
                    S.make_data, (str(run_dir / "data"), sc, cfg.stage1.scenes, fm_per_class), estimate_s=2)]
    teachers = cfg.used_teachers()
    n_captions = 2 * (cfg.scenes.train + cfg.scenes.val)
    workers = min(cfg.parallel, len(cfg.variants) + len(fm_teachers))
    # with workers, the stage-1 runs, the embedding stages and the stage-2 runs share one pool, one thread each,
    # each started once its inputs exist: two embeddings side by side at one thread each took 3:16 against 1:50
    # for one alone on both threads (2 cores), and in the pool a stage-2 run that needs no embedding (the CLIP
    # teacher) fills a core while the embeddings run
    pooled, threads = (True, 1) if workers > 1 else (False, cfg.threads)

    for name in cfg.finetuned_teachers():  # stage 1 of each fine-tuned teacher (its own attention)
        st1 = cfg.stage1
        ft = {
            "objective": "contrastive",
            # stage 1 trains in full precision (bf16_linears is for embedding and queries)
            "encoder": _dump(cfg.teacher_llm(name).model_copy(update={"bf16_linears": "none"})),
            "out": str(run_dir / "stage1" / name),
            "lora": _dump(st1.lora),
            "data": {"cupl_train": True, "cupl_per_class": st1.cupl_per_class,
                     "groups": [str((run_dir / "data" / "stage1_groups.jsonl").absolute())] if st1.scenes else []},
            "contrastive": _dump(st1.contrastive),
            "optim": _dump(st1.optim),
            "eval": {"every": 0, "final": False},  # the eval stage scores every teacher on the held-out sets
            "save_every": max(1, st1.optim.steps // 4),
            "log_every": 1,
        }
        # the frozen trunk once per caption, then steps over the top layers (one thread)
        est = (0.02 * (798 * (st1.cupl_per_class or 20) + 2 * st1.scenes)
               + 0.063 * st1.contrastive.batch_size * st1.optim.steps)
        stages.append(Stage(f"stage1/{name}", ft, S.run_stage1, (ft, threads, not pooled), deps=["data"],
                            estimate_s=est / (workers if pooled else 1), pooled=pooled,
                            progress=S.train_progress(run_dir / "stage1" / name, st1.optim.steps) if pooled else None))

    embed_names = []
    for name, t in teachers.items():
        if isinstance(t, ClipTeacher):
            continue
        if isinstance(t, LLMTeacher):
            enc = _llm_cfg(cfg, name, run_dir)
            kind, deps = "llm", (["data", f"stage1/{name}"] if t.finetuned else ["data"])
        else:
            enc = _dump(t.encoder)
            kind, deps = t.encoder.kind, ["data"]
        # format jsonl: a flat caption file (the Fashion-MNIST class captions have no image), read without the
        # deprecation notice meant for hand-written ones
        captions = {"path": str((run_dir / "data" / "captions.jsonl").absolute()), "format": "jsonl"}
        ec = {"encoder": enc, "captions": [captions],
              "out": str((run_dir / "embed" / name).absolute()), "dtype": cfg.embed_dtype, "shard_size": 4096}
        stages.append(Stage(f"embed/{name}", {"config": ec}, S.run_embed, (ec, threads, not pooled), deps=deps,
                            estimate_s=n_captions * _EST_CAPTION_S.get(kind, 0.01) / (workers if pooled else 1),
                            pooled=pooled))
        embed_names.append(name)

    scene_kw = {"seed": cfg.scenes.seed, "min_objects": cfg.scenes.min_objects,
                "max_objects": cfg.scenes.max_objects, "render_size": cfg.scenes.render_size}
    # the CLIP teacher's runs first, the longest (its own text transformer), so that none is left to run alone
    # at the end; then seed-major, so a partial run has every variant at its first seeds
    is_clip = [v for v in cfg.variants if isinstance(cfg.teachers[v.teacher], ClipTeacher)]
    runs = [(v, k) for k in range(cfg.stage2.seeds) for v in is_clip]
    runs += [(v, k) for k in range(cfg.stage2.seeds) for v in cfg.variants if v not in is_clip]
    for v, k in runs:
        data = {"train": {"kind": "scenes", "count": cfg.scenes.train, "offset": 0, **scene_kw},
                "val": {"kind": "scenes", "count": cfg.scenes.val, "offset": cfg.scenes.val_offset, **scene_kw},
                "val_max": cfg.scenes.val, "caption_kinds": {"short": round(1 - v.dense, 6), "dense": v.dense}}
        stages.append(_train_stage(cfg, variant_run(v.name, k), v.teacher, data, cfg.stage2.train.steps,
                                   workers, seed=cfg.seed + k))
    fm = cfg.fashion_mnist
    for t in fm_teachers:  # the same text sides on real photos, for zero-shot classification
        data = {"train": {"kind": "fashion_mnist", "split": "train", "count": fm.train, "per_class": fm.per_class,
                          "root": fm.root},
                "caption_kinds": {"short": 0.5, "dense": 0.5}}
        stages.append(_train_stage(cfg, f"fmnist-{t}", t, data, fm.steps, workers))
    if fm_teachers:
        models = {t: str(run_dir / "train" / f"fmnist-{t}" / "model") for t in fm_teachers}
        stages.append(Stage("zeroshot", {"models": models, "test": fm.test, "root": fm.root}, S.run_zeroshot,
                            (models, fm.test, fm.root, cfg.threads), deps=[f"train/fmnist-{t}" for t in fm_teachers],
                            estimate_s=20 * len(fm_teachers)))
    stages.append(_eval_stage(cfg, [s.name for s in stages]))
    return stages


def _train_stage(cfg: PipelineConfig, name: str, teacher: str, data: dict, steps: int, workers: int,
                 seed: int | None = None) -> Stage:
    run_dir = Path(cfg.run_dir)
    t = cfg.teachers[teacher]
    rc = {"run_dir": str(run_dir / "train" / name), "seed": cfg.seed if seed is None else seed,
          "model": _dump(cfg.stage2.model),
          "data": data, "optim": _dump(cfg.stage2.optim),
          "train": {**_dump(cfg.stage2.train), "steps": steps,
                    "threads": 1 if workers > 1 else (cfg.stage2.train.threads or cfg.threads)}}
    if isinstance(t, ClipTeacher):
        rc["model"]["text"] = _dump(t.text)
        deps = ["data"]
    else:
        if not isinstance(cfg.stage2.model.text, AdapterConfig):
            raise ConfigError("stage2.model.text must be the adapter (the CLIP teacher sets its own text side)")
        rc["data"]["features"] = {"store": str((run_dir / "embed" / teacher).absolute())}
        deps = ["data", f"embed/{teacher}"]
    return Stage(f"train/{name}", {"config": rc}, S.run_train, (rc,), deps=deps,
                 estimate_s=steps * _EST_STEP_S * (_EST_CLIP_STEP_FACTOR if isinstance(t, ClipTeacher) else 1)
                 / workers,
                 pooled=True, progress=S.train_progress(run_dir / "train" / name, steps))


def _eval_stage(cfg: PipelineConfig, stage_names: list[str]) -> Stage:
    run_dir = Path(cfg.run_dir)
    teachers = {}
    for name, t in cfg.used_teachers().items():
        if isinstance(t, ClipTeacher):
            v = next(v for v in cfg.variants if v.teacher == name)
            teachers[name] = {"kind": "clip", "model": str(run_dir / "train" / variant_run(v.name, 0) / "model")}
        else:
            enc = _llm_cfg(cfg, name, run_dir) if isinstance(t, LLMTeacher) else _dump(t.encoder)
            teachers[name] = {"kind": "store", "store": str(run_dir / "embed" / name), "encoder": enc}
    cupl = {"classes": cfg.eval.cupl_classes, "per_class": cfg.eval.cupl_per_class}
    sc = _dump(cfg.scenes)
    deps = [s for s in stage_names if s.startswith(("train/", "embed/")) and not s.startswith("train/fmnist-")]
    key = {"teachers": teachers, "cupl": cupl, "ks": cfg.eval.ks, "scenes": sc}
    variants = {v.name: [variant_run(v.name, k) for k in range(cfg.stage2.seeds)] for v in cfg.variants}
    return Stage("eval", key, S.run_eval, (str(run_dir), sc, teachers, variants, cupl, cfg.eval.ks, cfg.threads),
                 deps=deps, estimate_s=5 + 0.02 * cfg.eval.cupl_classes * cfg.eval.cupl_per_class * len(teachers))


@contextmanager
def no_loading_bars():
    """transformers' per-model "Loading weights" bars off while a run's own progress line speaks (the pool's
    workers turn them off themselves: runner._worker_init)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def run_pipeline(cfg: PipelineConfig, config_source: str = "", out=None) -> dict:
    """Run (or finish) every stage, then write the report; returns the run manifest. One process at a time
    owns the run folder (a second one fails at once, naming the first one's PID)."""
    from .report import write_report

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    stages = build_stages(cfg)
    with folder_lock(cfg.run_dir, "llm2clip run"), sigterm_stops(), no_loading_bars():
        runner = Runner(Path(cfg.run_dir), stages, cfg.parallel, cfg.model_dump(mode="json"), out=out)
        manifest = runner.run()
        return write_report(cfg, manifest, config_source, out=out)
