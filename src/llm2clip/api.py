"""Inference: ``llm2clip.load(path)`` gives a model ready to embed images and texts.

    import llm2clip
    m = llm2clip.load("runs/stage2-scenes/model")                 # on the GPU when there is one
    m = llm2clip.load("runs/stage2-scenes/model", device="cpu", precision="bf16")
    img = m.encode_image(["a.png", "b.jpg"])                        # [2, E] float32, L2-normalised
    txt = m.encode_text(["a long, dense description ...", "a dog"]) # the LLM's context, not 77 tokens
    m.similarity(img, txt)                                          # cosine [2, 2]; scale=True: CLIP logits

This is the package's one model loader: ``llm2clip eval``, ``llm2clip index`` / ``search``, the
pipeline and export all load saved models through it. The caption encoder (raw captions -> the
embeddings the adapter reads) is found by :func:`find_caption_encoder`, first match wins:

1. ``caption_encoder=``: a built encoder, a config, a dict or a spec ('smollm2', 'bow:dim=24',
   'runs/x/encoder', a YAML file);
2. the model's manifest (``caption_encoder``: the config of the encoder behind the training embeddings);
3. the run config beside ``run_dir/model`` (``run_dir/config.json``): ``data.features.encoder``;
4. the feature store that config names: the ``encoder`` of its ``manifest.json``.

Its identity is checked against the ``text_identity`` the manifest pins. Models with the CLIP text
tower use its tokenizer.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import ConfigError, InputError, Llm2ClipError
from .hashing import file_sha256

DEFAULT_DEVICE = "auto"  # the GPU when there is one, else the CPU
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_LLM_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MANIFEST_ENCODER_KEY = "caption_encoder"


def resolve_dtype(dtype) -> torch.dtype | None:
    """A precision name (fp32, bf16, fp16, float32, bfloat16, float16), a torch dtype, or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in _LLM_DTYPE_NAMES:
            raise ConfigError(f"precision: {dtype} is not one of float32, bfloat16, float16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"precision (dtype): {dtype!r} is not one of {', '.join(DTYPES)}") from None


def precision_name(precision) -> str:
    """The short name (fp32, bf16, fp16) of a precision; None is fp32."""
    return _SHORT_NAMES[resolve_dtype(precision) or torch.float32]


def resolve_device(device: str | torch.device | None = DEFAULT_DEVICE) -> torch.device:
    """'auto' (or None): CUDA when available, else the CPU; a CUDA device where there is none is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device}: CUDA is not available here")
    return dev


def _precision_arg(precision, dtype, where: str = "llm2clip.load"):
    """``precision``, or the deprecated ``dtype=`` spelling of it."""
    if dtype is None:
        return precision
    if precision is not None:
        raise ConfigError(f"{where}: give precision= only (dtype= is its deprecated name)")
    warnings.warn(f"{where}: dtype= is deprecated; use precision=", DeprecationWarning, stacklevel=3)
    return dtype


# ------------------------------------------------------------------------------ caption encoder
def read_manifest(model_dir: str | Path) -> dict:
    """The saved model's ``llm2clip_model.json``, as a dict."""
    from .model import MODEL_MANIFEST

    mf = Path(model_dir) / MODEL_MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{model_dir}: no {MODEL_MANIFEST}; not a saved LLM2CLIP model; give run_dir/model")
    try:
        return json.loads(mf.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{mf}: not valid JSON: {err}") from None


def run_config(model_dir: str | Path) -> tuple[dict | None, Path]:
    """The stage-2 run config beside a run's model folder (run_dir/config.json), if any, and its path."""
    model_dir = Path(model_dir)
    path = model_dir.parent / "config.json"
    if model_dir.name != "model" or not path.is_file():
        return None, path
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except json.JSONDecodeError:
        return None, path


def find_caption_encoder(model_dir: str | Path, manifest: dict | None = None, override=None):
    """(encoder or config, where it came from) of the caption encoder a saved model needs for raw
    captions, or (None, None) when none is recorded anywhere (see the module docstring for the order)."""
    from .text.specs import parse_caption_encoder_spec

    model_dir = Path(model_dir)
    if override is not None:
        if _is_encoder(override):
            return override, "given (object)"
        return parse_caption_encoder_spec(override, "caption_encoder"), f"given: {override}"
    manifest = read_manifest(model_dir) if manifest is None else manifest
    entry = manifest.get(MANIFEST_ENCODER_KEY)
    if isinstance(entry, dict):
        cfg = entry if "kind" in entry else entry.get("config", entry)
        where = f"{model_dir}: manifest {MANIFEST_ENCODER_KEY}"
        return parse_caption_encoder_spec(dict(cfg), where), where
    cfg, path = run_config(model_dir)
    feats = ((cfg or {}).get("data") or {}).get("features") or {}
    if feats.get("encoder"):
        where = f"{path}: data.features.encoder"
        return parse_caption_encoder_spec(dict(feats["encoder"]), where), where
    if feats.get("store"):
        store_mf = Path(feats["store"]) / "manifest.json"
        if store_mf.is_file():
            enc = json.loads(store_mf.read_text(encoding="utf-8")).get("encoder")
            if isinstance(enc, dict):
                where = f"{store_mf}: encoder"
                return parse_caption_encoder_spec(dict(enc), where), where
    return None, None


def _with_runtime(cfg, device: str, dtype: torch.dtype | None):
    """The recorded config on this device (and dtype, when given): neither changes the encoder's identity."""
    update = {}
    if "device" in type(cfg).model_fields:
        update["device"] = device
    if dtype is not None and "dtype" in type(cfg).model_fields:
        update["dtype"] = _LLM_DTYPE_NAMES[dtype]
        if update["dtype"] != "float32" and getattr(cfg, "bf16_linears", "none") != "none":
            update["bf16_linears"] = "none"  # bf16_linears runs over fp32 weights; the asked dtype replaces it
    return cfg.model_copy(update=update) if update else cfg


def _is_encoder(obj) -> bool:
    return callable(getattr(obj, "encode", None)) and callable(getattr(obj, "identity", None))


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return _check_texts([texts])
    if not isinstance(texts, Sequence):
        raise InputError(f"texts must be a string or a list of strings, not {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text {i}: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise InputError(f"text {i}: empty text")
    return list(texts)


def _bar(total: int, batch_size: int, progress: bool | None, desc: str, unit: str):
    # Default: a bar only when the work spans several batches (and tqdm's own TTY check).
    show = progress if progress is not None else (None if total > 4 * batch_size else False)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=(not show) if show is not None else None)


# ----------------------------------------------------------------------------------- the model
class LoadedModel:
    """A saved LLM2CLIP model with its eval image transform and its caption encoder.

    ``encode_image`` / ``encode_text`` return float32 CPU tensors [N, E], L2-normalised unless
    ``normalize=False``; batched, with a progress bar when the input spans several batches.
    """

    def __init__(self, model, path: Path | None, device: torch.device, dtype: torch.dtype,
                 caption_encoder=None, encoder_dtype: torch.dtype | None = None, encoder_source: str | None = None,
                 manifest: dict | None = None):
        from .vision import build_transform

        self.model, self.path, self.device, self.dtype = model, path, device, dtype
        v = model.visual
        self.image_size = int(v.image_size)
        self.transform = build_transform(v.image_size, v.mean, v.std, train=False)
        self.manifest = manifest  # the saved model's llm2clip_model.json (None in memory)
        self.encoder_source = encoder_source  # where the caption encoder came from (find_caption_encoder)
        self._encoder_dtype = encoder_dtype
        self._encoder_spec = caption_encoder  # an encoder, a config, or None: built on first use
        self._identity: dict | None = None
        if model.uses_adapter and caption_encoder is not None and _is_encoder(caption_encoder):
            self._attach(caption_encoder)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.embed_dim)

    @property
    def uses_adapter(self) -> bool:
        return self.model.uses_adapter

    def __repr__(self) -> str:
        text = "adapter" if self.uses_adapter else "clip text tower"
        return f"LoadedModel({str(self.path)!r}, {text}, embed_dim={self.embed_dim}, {self.device}, {self.dtype})"

    # -------------------------------------------------------------------------- caption encoder
    def _where(self) -> str:
        return f"{self.path}/llm2clip_model.json" if self.path else "model"

    def _attach(self, encoder) -> None:
        try:
            self.model.attach_caption_encoder(encoder)
        except ConfigError as err:
            source = f" [caption encoder from {self.encoder_source}]" if self.encoder_source else ""
            raise ConfigError(f"{self._where()}: {err}{source}") from None

    @property
    def caption_encoder(self):
        """The caption encoder (None for the CLIP text tower), built and identity-checked on first use."""
        if not self.uses_adapter:
            return None
        if self.model.caption_encoder is None:
            spec = self._encoder_spec
            if spec is None:
                raise ConfigError(
                    f"{self._where()}: the model does not record its caption encoder, nor does a run config "
                    "beside it (it was trained from a feature store without an encoder record, or saved before "
                    "llm2clip recorded it); pass "
                    "caption_encoder= to llm2clip.load (a spec such as 'smollm2', an encoder config, or an encoder)")
            from .data.images import build_caption_encoder

            try:
                encoder = build_caption_encoder(_with_runtime(spec, str(self.device), self._encoder_dtype))
            except (OSError, ImportError, ValueError, Llm2ClipError) as err:
                raise ConfigError(f"{self._where()}: cannot rebuild the caption encoder "
                                  f"{spec.model_dump(mode='json')}: {err}; "
                                  "pass caption_encoder= to llm2clip.load") from err
            self._attach(encoder)
        return self.model.caption_encoder

    # ----------------------------------------------------------------------------------- images
    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"an image tensor must be [B, 3, H, W] (already transformed), got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(f"image tensor is {x.shape[-2]}x{x.shape[-1]}; this model's tower takes "
                             f"{self.image_size}x{self.image_size} (apply model.transform to PIL images)")
        return x

    def load_image(self, item, where: str = "image"):
        """A PIL image from a PIL image or a path; a missing or unreadable file is an InputError naming it."""
        from PIL import Image

        from .fileio import image_errors, open_image

        if isinstance(item, Image.Image):
            return item
        if isinstance(item, (str, Path)):
            p = Path(item)
            if not p.is_file():
                raise InputError(f"{p}: image file not found")
            try:
                return open_image(p)
            except image_errors() as err:
                raise InputError(f"{p}: cannot read the image: {err}") from None
        raise InputError(f"{where}: expected a PIL image or a file path, got {type(item).__name__}")

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """One batch of transformed images [B, 3, S, S] -> [B, E] float32 on the CPU."""
        x = self.model.encode_image(self._pixels(pixels).to(self.device, self.dtype), normalize=False).float()
        return (F.normalize(x, dim=-1) if normalize else x).cpu()

    def encode_image(self, images, batch_size: int = 64, normalize: bool = True,
                     progress: bool | None = None) -> torch.Tensor:
        """PIL images, file paths, or a ready tensor batch [B, 3, S, S] -> [N, E]."""
        from PIL import Image

        if isinstance(images, torch.Tensor):
            images = self._pixels(images)
            n = images.shape[0]
            get = lambda lo, hi: images[lo:hi]
        else:
            if isinstance(images, (str, Path, Image.Image)):
                images = [images]
            images = list(images)
            n = len(images)
            get = lambda lo, hi: torch.stack(
                [self.transform(self.load_image(images[i], f"image {i}")) for i in range(lo, hi)])
        if n == 0:
            return torch.empty(0, self.embed_dim)
        out = torch.empty(n, self.embed_dim)
        with _bar(n, batch_size, progress, "encode images", "img") as bar:
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                out[lo:hi] = self.embed_pixels(get(lo, hi), normalize)
                bar.update(hi - lo)
        return out

    # ------------------------------------------------------------------------------------ texts
    @torch.inference_mode()
    def encode_text(self, texts, batch_size: int = 32, normalize: bool = True,
                    progress: bool | None = None) -> torch.Tensor:
        """Raw texts -> [N, E]: through the caption encoder (up to its max_length tokens) and the adapter,
        or the CLIP text tower's tokenizer (77 tokens)."""
        texts = _check_texts(texts)
        n = len(texts)
        out = torch.empty(n, self.embed_dim)
        if n == 0:
            return out
        encoder = self.caption_encoder
        order = sorted(range(n), key=lambda i: -len(texts[i]))  # similar lengths together: less padding
        with _bar(n, batch_size, progress, "encode texts", "text") as bar:
            for lo in range(0, n, batch_size):
                idx = order[lo : lo + batch_size]
                chunk = [texts[i] for i in idx]
                if encoder is not None:
                    inp = torch.as_tensor(encoder.encode(chunk, batch_size=batch_size, progress=False))
                else:
                    inp = self.model.text.tokenize(chunk)
                x = self.model.encode_text(inp.to(self.device), normalize=False).float()
                out[idx] = (F.normalize(x, dim=-1) if normalize else x).cpu()
                bar.update(len(idx))
        return out

    # ------------------------------------------------------------------------------- similarity
    def similarity(self, image_emb, text_emb, scale: bool = False) -> torch.Tensor:
        """[N_images, N_texts] cosine similarities (both sides re-normalised); ``scale=True`` gives the
        training logits instead: exp(logit_scale) * cosine (+ logit_bias for SigLIP models)."""
        a, b = (F.normalize(torch.as_tensor(np.asarray(e, dtype=np.float32) if not isinstance(e, torch.Tensor) else e)
                            .float().cpu(), dim=-1) for e in (image_emb, text_emb))
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise InputError(f"similarity needs [N, E] and [M, E] embeddings, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        sim = a @ b.T
        if scale:
            sim = sim * float(self.model.logit_scale.detach().float().exp())
            if self.model.logit_bias is not None:
                sim = sim + float(self.model.logit_bias.detach().float())
        return sim

    # --------------------------------------------------------------------------------- identity
    def identity(self) -> dict:
        """What an image index records to refuse another model: the weights' sha256, the text identity."""
        if self._identity is None:
            from .model import MODEL_WEIGHTS

            if self.path is None:
                raise ConfigError("this model was not loaded from a folder; it has no file identity")
            self._identity = {"weights_sha256": file_sha256(self.path / MODEL_WEIGHTS),
                              "embed_dim": self.embed_dim, "text_identity": self.model.text_identity,
                              "text": "adapter" if self.uses_adapter else "clip"}
        return dict(self._identity)


def load(path: str | Path, device: str | torch.device = DEFAULT_DEVICE, precision=None, caption_encoder=None,
         lazy_text: bool = False, *, dtype=None, revision: str | None = None) -> LoadedModel:
    """A saved LLM2CLIP model folder (``run_dir/model``, or the run folder), or a Hugging Face Hub id
    (``owner/name``, fetched with snapshot_download at ``revision``), ready for inference.

    device: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", ...
    precision: None/"fp32" or "bf16"/"fp16" (also "float32", "bfloat16", "float16", a torch dtype) for the
    model's weights, and for the LLM caption encoder when given (None keeps the dtype it was recorded with);
    ``dtype=`` is its deprecated name.
    caption_encoder: overrides the recorded one: a spec ('smollm2', 'runs/x/encoder', a YAML file), a config,
    a dict, or a built encoder; its identity must match the model's. Without it the encoder is looked up as
    the module docstring says. lazy_text: build the caption encoder on the first ``encode_text``
    (image-only work never loads the LLM).
    """
    from .hub import resolve_model_dir
    from .model import LLM2CLIP, MODEL_MANIFEST

    precision = _precision_arg(precision, dtype)
    path = resolve_model_dir(path, revision=revision)  # a local folder first; else a hub id
    if not (path / MODEL_MANIFEST).is_file() and (path / "model" / MODEL_MANIFEST).is_file():
        path = path / "model"  # a run folder
    dev = resolve_device(device)
    dt = resolve_dtype(precision)
    manifest = read_manifest(path)
    model = LLM2CLIP.load(path, map_location="cpu")
    model.to(device=dev, dtype=dt or torch.float32)
    if not model.uses_adapter:
        if caption_encoder is not None:
            raise ConfigError(f"{path}: this model has the CLIP text tower (its own tokenizer); "
                              "it takes no caption_encoder")
        spec, source = None, None
    else:
        spec, source = find_caption_encoder(path, manifest, caption_encoder)
    out = LoadedModel(model, path.resolve(), dev, dt or torch.float32, spec, dt, source, manifest)
    if not lazy_text and spec is not None:
        out.caption_encoder  # noqa: B018  (build and identity-check now, so errors come at load)
    return out


def wrap(model, device: str | torch.device = DEFAULT_DEVICE, precision=None, caption_encoder=None,
         lazy_text: bool = False) -> LoadedModel:
    """An in-memory LLM2CLIP model (e.g. straight from training) as a LoadedModel, moved to ``device``
    (and cast to ``precision`` when given). Its caption encoder: ``caption_encoder``, else the one
    attached to it, else the config it records (``caption_encoder_config``)."""
    from .text.specs import parse_caption_encoder_spec

    dev = resolve_device(device)
    dt = resolve_dtype(precision)
    if dt is None:
        model.to(dev)
    else:
        model.to(device=dev, dtype=dt)
    model.eval()
    spec, source = None, None
    if model.uses_adapter:
        if caption_encoder is not None:
            spec, source = (caption_encoder, "given (object)") if _is_encoder(caption_encoder) else (
                parse_caption_encoder_spec(caption_encoder, "caption_encoder"), f"given: {caption_encoder}")
        elif model.caption_encoder is not None:
            spec, source = model.caption_encoder, "attached"
        elif getattr(model, "caption_encoder_config", None):
            spec = parse_caption_encoder_spec(dict(model.caption_encoder_config), "model caption_encoder_config")
            source = "model caption_encoder_config"
    elif caption_encoder is not None:
        raise ConfigError("this model has the CLIP text tower (its own tokenizer); it takes no caption_encoder")
    weights_dtype = dt or next(model.parameters()).dtype
    out = LoadedModel(model, None, dev, weights_dtype, spec, dt, source)
    if not lazy_text and spec is not None:
        out.caption_encoder  # noqa: B018
    return out
