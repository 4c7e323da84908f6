"""Inference: ``llm2clip.load(path)`` gives a model ready to embed images and texts.

    import llm2clip
    m = llm2clip.load("runs/stage2-scenes/model")                 # device="cuda", dtype="bfloat16" on a GPU
    img = m.encode_image(["a.png", "b.jpg"])                        # [2, E] float32, L2-normalised
    txt = m.encode_text(["a long, dense description ...", "a dog"]) # the LLM's context, not 77 tokens
    m.similarity(img, txt)                                          # cosine [2, 2]; scale=True: CLIP logits

The caption encoder is rebuilt from what stage 2 recorded in the model's manifest (``caption_encoder``:
the config of the encoder that made the training embeddings) and checked against the pinned
``text_identity``; ``caption_encoder=`` overrides it. Models with the CLIP text tower use its tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import ConfigError, InputError, Llm2ClipError
from .hashing import file_sha256

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_LLM_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in _LLM_DTYPE_NAMES:
            raise ConfigError(f"dtype: {dtype} is not one of float32, bfloat16, float16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}") from None



# ------------------------------------------------------------------------------ caption encoder
def _encoder_config(spec, where: str):
    """A validated caption-encoder config from a dict (a manifest record), a spec string or a config."""
    from pydantic import BaseModel

    if isinstance(spec, BaseModel):
        return spec
    if isinstance(spec, (str, Path)):
        from .text.specs import parse_encoder_spec

        return parse_encoder_spec(str(spec))
    if isinstance(spec, dict):
        from .config import StrictModel, parse_config
        from .train.config import CaptionEncoderConfig

        class _Record(StrictModel):
            caption_encoder: CaptionEncoderConfig

        return parse_config({"caption_encoder": spec}, _Record, where).caption_encoder
    raise ConfigError(f"{where}: caption_encoder must be an encoder, a config, a dict or a spec string, "
                      f"not {type(spec).__name__}")


def _with_runtime(cfg, device: str, dtype: torch.dtype | None):
    """The recorded config on this device (and dtype, when given): neither changes the encoder's identity."""
    update = {}
    if "device" in type(cfg).model_fields:
        update["device"] = device
    if dtype is not None and "dtype" in type(cfg).model_fields:
        update["dtype"] = _LLM_DTYPE_NAMES[dtype]
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
                 caption_encoder=None, encoder_dtype: torch.dtype | None = None):
        from .vision import build_transform

        self.model, self.path, self.device, self.dtype = model, path, device, dtype
        v = model.visual
        self.image_size = int(v.image_size)
        self.transform = build_transform(v.image_size, v.mean, v.std, train=False)
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
            raise ConfigError(f"{self._where()}: {err}") from None

    @property
    def caption_encoder(self):
        """The caption encoder (None for the CLIP text tower), built and identity-checked on first use."""
        if not self.uses_adapter:
            return None
        if self.model.caption_encoder is None:
            spec = self._encoder_spec
            if spec is None:
                raise ConfigError(
                    f"{self._where()}: the model does not record its caption encoder (it was trained from a feature "
                    "store without an encoder record, or saved before llm2clip recorded it); pass "
                    "caption_encoder= to llm2clip.load (a spec such as 'smollm2', an encoder config, or an encoder)")
            from .data.images import build_caption_encoder

            try:
                encoder = build_caption_encoder(_with_runtime(spec, str(self.device), self._encoder_dtype))
            except (OSError, ImportError, ValueError, Llm2ClipError) as err:
                raise ConfigError(f"{self._where()}: cannot rebuild the caption encoder "
                                  f"{spec.model_dump(mode='json')}: {err}; pass caption_encoder= to llm2clip.load") from err
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

        if isinstance(item, Image.Image):
            return item
        if isinstance(item, (str, Path)):
            from .data.images import load_image_file

            p = Path(item)
            if not p.is_file():
                raise InputError(f"{p}: image file not found")
            try:
                return load_image_file(str(p))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
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
            get = lambda lo, hi: images[lo:hi]  # noqa: E731
        else:
            if isinstance(images, (str, Path, Image.Image)):
                images = [images]
            images = list(images)
            n = len(images)
            get = lambda lo, hi: torch.stack(  # noqa: E731
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
            raise InputError(f"similarity needs [N, E] and [M, E] embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
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


def load(path: str | Path, device: str | torch.device = "cpu", dtype=None, caption_encoder=None,
         lazy_text: bool = False) -> LoadedModel:
    """A saved LLM2CLIP model folder (``run_dir/model``) ready for inference.

    device: "cpu", "cuda", "cuda:1", ...; dtype: None/"float32" or "bfloat16"/"float16" for the model,
    and for the LLM caption encoder when given (None keeps the dtype it was recorded with).
    caption_encoder: overrides the recorded one: a spec ('smollm2', 'runs/x/encoder', a YAML file), a config,
    a dict, or a built encoder; its identity must match the model's. lazy_text: build the caption encoder
    on the first ``encode_text`` (image-only work never loads the LLM).
    """
    from .model import MODEL_MANIFEST, LLM2CLIP

    path = Path(path)
    if not (path / MODEL_MANIFEST).is_file() and (path / "model" / MODEL_MANIFEST).is_file():
        path = path / "model"  # a run folder
    dev = torch.device(device)
    dt = resolve_dtype(dtype)
    model = LLM2CLIP.load(path, map_location="cpu")
    model.to(device=dev, dtype=dt or torch.float32)
    where = f"{path}/{MODEL_MANIFEST}: caption_encoder"
    if not model.uses_adapter:
        if caption_encoder is not None:
            raise ConfigError(f"{path}: this model has the CLIP text tower (its own tokenizer); "
                              "it takes no caption_encoder")
        spec = None
    elif caption_encoder is not None:
        spec = caption_encoder if _is_encoder(caption_encoder) else _encoder_config(caption_encoder, "caption_encoder")
    elif model.caption_encoder_config is not None:
        spec = _encoder_config(model.caption_encoder_config, where)
    else:
        spec = None
    out = LoadedModel(model, path.resolve(), dev, dt or torch.float32, spec, dt)
    if not lazy_text and spec is not None:
        out.caption_encoder  # noqa: B018  (build and identity-check now, so errors come at load)
    return out
