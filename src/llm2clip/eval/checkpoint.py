"""Evaluating a checkpoint: load the model (a saved LLM2CLIP model or an open_clip baseline), run the
named benchmarks, and write the report. The engine of ``llm2clip eval`` and of the pipeline's
evaluation stage.

Checkpoints:

* a saved LLM2CLIP model folder (``run_dir/model``: ``llm2clip_model.json`` + safetensors), loaded by
  ``llm2clip.load`` (llm2clip.api), so eval scores exactly what the inference API gives. With the
  adapter text side, raw captions need the caption encoder it was trained against, found as
  ``llm2clip.api.find_caption_encoder`` says: an explicit spec, else the manifest's ``caption_encoder``
  entry, else the run's own config (``run_dir/config.json``: the in-memory encoder, or the encoder
  recorded in its feature store). Its identity is checked against the one the manifest pins.
* ``open_clip:NAME[:PRETRAINED]``: an open_clip model with its own text tower (baselines), from a
  local weights file or tag; without one, random weights drawn with torch seed 0 (reproducible).

``precision`` here is autocast over float32 weights, as in training (``llm2clip.load``'s precision
casts the weights themselves).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from ..api import DEFAULT_DEVICE, find_caption_encoder, precision_name, read_manifest, resolve_device, run_config
from ..errors import ConfigError, InputError
from ..hashing import file_sha256 as sha256_file
from ..text.specs import parse_caption_encoder_spec  # noqa: F401  (re-exported: callers import it from here)
from .benchmark import BenchmarkUnavailable
from .prompts import classification_prompts
from .registry import REGISTRY, load_benchmark

log = logging.getLogger(__name__)

DEFAULT_BENCHMARKS = ("scenes-short", "scenes-dense", "cupl-cra", "fashion-mnist")
OPEN_CLIP_PREFIX = "open_clip:"
SCENE_BENCHMARKS = ("scenes-short", "scenes-dense")


# ------------------------------------------------------------------------------ caption encoders
def _read_manifest(model_dir: Path) -> dict:
    try:
        return read_manifest(model_dir)
    except ConfigError as err:
        if "no llm2clip_model.json" not in str(err):
            raise
        raise ConfigError(f"{err}, or {OPEN_CLIP_PREFIX}NAME[:WEIGHTS] for an open_clip model") from None


def _missing_encoder(model_dir: Path, manifest: dict) -> ConfigError:
    ident = manifest.get("text_identity")
    return ConfigError(f"{model_dir}: this model reads caption embeddings, so raw captions need the caption "
                       f"encoder it was trained against, and none is recorded beside it: pass --caption-encoder SPEC "
                       f"(e.g. smollm2, bow:dim=N, a saved encoder folder or a YAML file); the model expects "
                       f"identity {json.dumps(ident)}")


def caption_encoder_config(model_dir: str | Path, override_spec=None) -> tuple[object, str]:
    """(config, where it came from) of the caption encoder a saved model needs for raw captions."""
    model_dir = Path(model_dir)
    manifest = _read_manifest(model_dir)
    cfg, source = find_caption_encoder(model_dir, manifest, override_spec)
    if cfg is None:
        raise _missing_encoder(model_dir, manifest)
    return cfg, source


def caption_encoder_for(model_dir: str | Path, override_spec=None):
    """The caption encoder for a saved model's raw captions, built and checked against the identity
    its manifest pins (a mismatch is a ConfigError naming the fields); found as
    ``llm2clip.api.find_caption_encoder`` says."""
    from ..data.images import build_caption_encoder
    from ..model import check_identity

    cfg, source = caption_encoder_config(model_dir, override_spec)
    enc = cfg if _is_encoder(cfg) else build_caption_encoder(cfg)
    check_identity(_read_manifest(Path(model_dir)).get("text_identity"), enc.identity(),
                   f"caption encoder ({source})")
    return enc


# ------------------------------------------------------------------------------------ models
def _is_encoder(x) -> bool:
    """A built caption encoder (not a spec string, dict or config)."""
    return not isinstance(x, (str, dict)) and callable(getattr(x, "identity", None)) and callable(
        getattr(x, "encode", None))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise InputError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class EvalModel:
    """What the harness scores: ``encode_image`` (a batch of preprocessed tensors) and
    ``encode_text`` (a list of strings), both returning float32 features on the CPU; ``preprocess``
    maps a PIL image to the tensor; ``identity()`` describes the model for the results."""

    def __init__(self, module: torch.nn.Module, image_fn: Callable, text_fn: Callable, preprocess: Callable,
                 identity: dict, device: torch.device, precision: str = "fp32",
                 stages: tuple[Callable, Callable] | None = None, scene_defaults: dict | None = None):
        precision = precision_name(precision)  # 'bfloat16' and 'bf16' name the same autocast
        self.module, self.preprocess, self.device, self.precision = module, preprocess, device, precision
        self._image, self._text, self._stages = image_fn, text_fn, stages
        self._identity = dict(identity)
        self.scene_defaults = dict(scene_defaults or {})
        _autocast(device, precision)  # checks the combination now

    def identity(self) -> dict:
        return dict(self._identity)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.precision):
            return self._image(images.to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        if self._stages is not None:
            return self._head(self._raw(texts))
        with _autocast(self.device, self.precision):
            return self._text(list(texts)).float().cpu()

    @torch.no_grad()
    def _raw(self, texts) -> torch.Tensor:
        # The caption encoder runs in its own dtype (part of its identity), never under our autocast.
        return torch.as_tensor(self._stages[0](list(texts))).float().cpu()

    @torch.no_grad()
    def _head(self, emb: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.precision):
            return self._stages[1](emb.to(self.device)).float().cpu()

    def text_stages(self):
        """(caption encoder, adapter) when the text path has both (CRA reports each), else None."""
        return None if self._stages is None else (self._raw, self._head)


def _display_name(path: Path) -> str:
    p = path.resolve()
    return p.parent.name if p.name == "model" else p.name


def _scene_defaults_from_run(model_dir: Path, image_size: int) -> dict:
    """Render scenes as the run's training scenes were rendered; else at the tower's input size."""
    from .loaders.scenes import SCENES_OFFSET

    run_cfg, path = run_config(model_dir)
    train = ((run_cfg or {}).get("data") or {}).get("train") or {}
    if train.get("kind") != "scenes":
        return {"render_size": int(image_size)}
    if train.get("offset", 0) + train.get("count", 0) > SCENES_OFFSET:
        log.warning("%s: the training scenes reach offset %d, past the held-out offset %d", path,
                    train.get("offset", 0) + train.get("count", 0), SCENES_OFFSET)
    return {k: train[k] for k in ("seed", "render_size", "min_objects", "max_objects") if k in train}


def _from_loaded(lm, ident: dict, precision: str, scene_defaults: dict) -> EvalModel:
    """An EvalModel over a LoadedModel: the same modules, the same caption encoder."""
    model = lm.model
    stages = (lm.caption_encoder.encode, model.encode_text) if model.uses_adapter else None
    return EvalModel(model, model.encode_image, model.encode_text, lm.transform, ident, lm.device, precision,
                     stages, scene_defaults)


def load_llm2clip(model_dir: str | Path, caption_encoder=None, device=DEFAULT_DEVICE, precision: str = "fp32",
                  name: str | None = None) -> EvalModel:
    """A saved LLM2CLIP model for evaluation, loaded by ``llm2clip.load`` (float32 weights; ``precision``
    is autocast), its caption encoder found, rebuilt and checked."""
    from ..api import load
    from ..model import MODEL_MANIFEST, MODEL_WEIGHTS

    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ConfigError(f"checkpoint {model_dir}: folder not found")
    if not (model_dir / MODEL_MANIFEST).is_file() and (model_dir / "model" / MODEL_MANIFEST).is_file():
        model_dir = model_dir / "model"  # a run folder: its final model
    manifest = _read_manifest(model_dir)
    lm = load(model_dir, device=device, caption_encoder=caption_encoder, lazy_text=True)
    enc_info = None
    if lm.uses_adapter:
        if lm.encoder_source is None:
            raise _missing_encoder(model_dir, manifest)
        enc_info = {"source": lm.encoder_source, "identity": lm.caption_encoder.identity()}
        if not manifest.get("text_identity"):
            log.warning("%s: the manifest pins no caption-encoder identity; nothing was checked", model_dir)
    lm.model.eval()
    ident = {"name": name or _display_name(model_dir), "kind": "llm2clip", "path": str(model_dir.resolve()),
             "weights_sha256": sha256_file(model_dir / MODEL_WEIGHTS),
             "manifest_sha256": sha256_file(model_dir / MODEL_MANIFEST), "config": manifest.get("config"),
             "text_side": "adapter" if lm.uses_adapter else "clip",
             "text_identity": manifest.get("text_identity"), "caption_encoder": enc_info}
    return _from_loaded(lm, ident, precision, _scene_defaults_from_run(model_dir, lm.image_size))


def load_open_clip(spec: str, device=DEFAULT_DEVICE, precision: str = "fp32", name: str | None = None) -> EvalModel:
    """``open_clip:NAME[:PRETRAINED]``: the model with its own text tower and val transform."""
    import open_clip

    body = spec[len(OPEN_CLIP_PREFIX):] if spec.startswith(OPEN_CLIP_PREFIX) else spec
    arch, _, pretrained = body.partition(":")
    if not arch:
        raise ConfigError(f"{spec}: expected {OPEN_CLIP_PREFIX}MODEL_NAME[:PRETRAINED_FILE]")
    if arch not in open_clip.list_models():
        raise ConfigError(f"{spec}: unknown open_clip model {arch!r} (see open_clip.list_models())")
    pre_path = Path(pretrained).expanduser() if pretrained else None
    looks_like_file = bool(pretrained) and (pretrained.startswith((".", "/", "~")) or
                                            pretrained.endswith((".pt", ".bin", ".pth", ".safetensors")))
    if looks_like_file and not pre_path.is_file():
        raise ConfigError(f"{spec}: weights file {pre_path} not found")
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random-weight baseline is the same model in every run
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=str(pre_path) if looks_like_file else (pretrained or None))
        except Exception as err:  # open_clip raises many types (missing tag, hub offline, bad file)
            raise ConfigError(f"{spec}: open_clip could not create the model: {err}") from None
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as err:  # HF tokenizers may need the hub
        raise ConfigError(f"{spec}: open_clip could not build the tokenizer: {err}") from None
    model.to(dev).eval()
    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    ident = {"name": name or f"open_clip:{arch}", "kind": "open_clip", "architecture": arch,
             "pretrained": pretrained or None, "open_clip_version": getattr(open_clip, "__version__", None)}
    if looks_like_file:
        ident["pretrained_sha256"] = sha256_file(pre_path)
    elif not pretrained:
        ident["init"] = "random weights, torch seed 0"

    def text_fn(texts):
        return model.encode_text(tokenizer(texts).to(dev), normalize=True)

    return EvalModel(model, lambda x: model.encode_image(x, normalize=True), text_fn, preprocess, ident, dev,
                     precision, None, {"render_size": size})


def load_eval_model(checkpoint, caption_encoder=None, device=DEFAULT_DEVICE, precision: str = "fp32",
                    name: str | None = None) -> EvalModel:
    """An EvalModel from a saved-model folder, ``open_clip:...``, an LLM2CLIP instance or an EvalModel."""
    from ..model import LLM2CLIP

    if isinstance(checkpoint, EvalModel):
        return checkpoint
    if isinstance(checkpoint, LLM2CLIP):
        return _wrap_llm2clip(checkpoint, caption_encoder, device, precision, name)
    if isinstance(checkpoint, str) and checkpoint.startswith(OPEN_CLIP_PREFIX):
        if caption_encoder is not None:
            raise ConfigError(f"{checkpoint}: open_clip models use their own text tower; a caption encoder does "
                              f"not apply")
        return load_open_clip(checkpoint, device, precision, name)
    if isinstance(checkpoint, (str, Path)):
        return load_llm2clip(checkpoint, caption_encoder, device, precision, name)
    raise InputError(f"cannot evaluate a {type(checkpoint).__name__}: give a model folder, open_clip:NAME, an "
                     f"LLM2CLIP model or an EvalModel")


def _wrap_llm2clip(model, caption_encoder, device, precision, name) -> EvalModel:
    """An in-memory LLM2CLIP model (e.g. straight from training), through ``llm2clip.api.wrap``."""
    from ..api import wrap

    lm = wrap(model, device, caption_encoder=caption_encoder, lazy_text=True)
    if lm.uses_adapter and lm.encoder_source is None:
        raise ConfigError("the model reads caption embeddings: attach its caption encoder or pass one")
    ident = {"name": name or "llm2clip", "kind": "llm2clip", "path": None,
             "config": model.config.model_dump(mode="json"), "text_side": "adapter" if model.uses_adapter else "clip",
             "text_identity": model.text_identity,
             "caption_encoder": {"source": "attached", "identity": lm.caption_encoder.identity()}
             if model.uses_adapter else None}
    return _from_loaded(lm, ident, precision, {"render_size": lm.image_size})


# -------------------------------------------------------------------------------- benchmarks
def parse_benchmark_arg(arg: str) -> tuple[str, str | None]:
    """'NAME' or 'NAME=DIR' -> (registered name, folder or None); unknown names are an error."""
    name, eq, root = arg.partition("=")
    name = name.strip().lower()
    if name not in REGISTRY:
        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}")
    if eq and not root:
        raise InputError(f"benchmark {arg!r}: empty folder after '='")
    if not eq and not REGISTRY[name].builtin:
        raise InputError(f"benchmark {name} needs its local copy: {name}=DIR with {REGISTRY[name].expects}")
    return name, (root or None)


def _evaluate_one(model: EvalModel, bench, *, batch_size: int, num_workers: int, on_bad_image: str,
                  zeroshot_prompts: str | None, progress) -> dict:
    from .cra import evaluate_cra
    from .retrieval import evaluate_retrieval
    from .zeroshot import evaluate_zeroshot

    kw = dict(preprocess=model.preprocess, batch_size=batch_size, on_bad_image=on_bad_image,
              num_workers=num_workers, progress=progress)
    if bench.task == "retrieval":
        return evaluate_retrieval(model, bench, **kw)
    if bench.task == "classification":
        return evaluate_zeroshot(model, classification_prompts(bench, zeroshot_prompts), **kw)
    return evaluate_cra(model, bench, batch_size=max(batch_size, 64), progress=progress)


def _summary(res: dict) -> str:
    m = res["metrics"]
    if res["task"] == "retrieval":
        return f"I2T R@1 {100 * m['i2t_R@1']:.1f}, T2I R@1 {100 * m['t2i_R@1']:.1f} ({m['images']} images)"
    if res["task"] == "cra":
        return f"CRA R@1 {100 * m['R@1']:.1f} (pool {m['pool_size']})"
    return f"top-1 {100 * m['top1']:.1f} ({m['images']} images, {m['classes']} classes)"


def evaluate_checkpoint(model_or_dir, benchmarks: Sequence[str] = DEFAULT_BENCHMARKS, out_dir=None, *,
                        name: str | None = None, caption_encoder=None, options: dict | None = None,
                        zeroshot_prompts: str | None = None, batch_size: int = 64, device=DEFAULT_DEVICE,
                        precision: str = "fp32", num_workers: int = 0, on_bad_image: str = "error",
                        progress: bool | None = None, title: str = "llm2clip evaluation") -> dict:
    """Evaluate one model on ``benchmarks`` ('NAME' or 'NAME=DIR'); write the report to ``out_dir``
    (results.json, report.md, PNG plots) when given. Returns the run dict (report.make_run): model
    identity, one result per benchmark, ``skipped`` (built-in sets whose data is absent, with the
    reason), ``settings``, and ``outputs`` (file paths) when written.

    ``options``: benchmark name -> loader options, e.g. {"scenes-dense": {"count": 100}}. Scene sets
    default to the run's training render size and generator seed.
    """
    from .report import make_run, write_report

    specs = [parse_benchmark_arg(b) for b in benchmarks]
    if not specs:
        raise InputError("no benchmarks to run")
    seen = [n for n, _ in specs]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise InputError(f"benchmark {dup[0]} given more than once")
    options = {k.lower(): dict(v) for k, v in (options or {}).items()}
    unknown = sorted(set(options) - set(REGISTRY))
    if unknown:
        raise InputError(f"options for unknown benchmark {unknown[0]!r}; known: {', '.join(REGISTRY)}")

    # Folder benchmarks first: a bad folder fails before any model is loaded.
    loaded = {n: load_benchmark(n, root, **options.get(n, {})) for n, root in specs if not REGISTRY[n].builtin}
    model = load_eval_model(model_or_dir, caption_encoder, device, precision, name)

    results, skipped = [], []
    for n, root in specs:
        bench = loaded.get(n)
        if bench is None:
            opts = options.get(n, {})
            if n in SCENE_BENCHMARKS:
                opts = {**model.scene_defaults, **opts}
            if n == "fashion-mnist" and zeroshot_prompts is not None:
                opts.setdefault("prompts", zeroshot_prompts)
            try:
                bench = load_benchmark(n, root, **opts)
            except BenchmarkUnavailable as err:
                reason = str(err).removeprefix(f"{n}: ")
                log.warning("skipped %s: %s", n, reason)
                skipped.append({"benchmark": n, "reason": reason})
                continue
        res = _evaluate_one(model, bench, batch_size=batch_size, num_workers=num_workers, on_bad_image=on_bad_image,
                            zeroshot_prompts=zeroshot_prompts, progress=progress)
        log.info("%s: %s", n, _summary(res))
        results.append(res)

    settings = {"benchmarks": list(benchmarks), "options": options, "zeroshot_prompts": zeroshot_prompts,
                "batch_size": batch_size, "device": str(model.device), "precision": precision}
    run = make_run(model.identity(), results, skipped=skipped, settings=settings)
    if out_dir is not None:
        if not results:
            raise InputError("every benchmark was skipped: nothing to report (" +
                             "; ".join(f"{s['benchmark']}: {s['reason']}" for s in skipped) + ")")
        paths = write_report([run], out_dir, title)
        run["outputs"] = {k: str(v) for k, v in paths.items()}
    return run


def default_out_dir(checkpoint: str) -> Path:
    """run_dir/eval for run_dir/model; runs/eval/<name> for anything else."""
    if not checkpoint.startswith(OPEN_CLIP_PREFIX):
        p = Path(checkpoint).expanduser()
        if p.name == "model":
            return p.parent / "eval"
        if (p / "model").is_dir():
            return p / "eval"
        return p.parent / f"{p.name}-eval"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", checkpoint[len(OPEN_CLIP_PREFIX):].replace("/", "_")).strip("_")
    return Path("runs") / "eval" / f"open_clip-{slug}"
