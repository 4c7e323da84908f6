"""Zero-shot classification through a model's own text path.

Each class gets one weight vector: its prompts (class name through templates, or several
descriptions per class as CuPL does) are encoded by the model's ``encode_text``, L2-normalised,
averaged and renormalised, as CLIP_benchmark's ``zero_shot_classifier`` does. Class weights are
always computed here from text, never read from a precomputed file of unknown origin (the
official code's ``--imagenet-classname-feautres``, docs/METHOD.md 7.6).

Top-K accuracy uses the same exact-rank rule as retrieval: a class scoring at least as high as
the true class is ranked before it, so ties count against the image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from .encoding import encode_benchmark_images, encode_texts
from .prompts import (  # noqa: F401  (re-exported: callers import them from here)
    class_prompts,
    descriptions_or_templates,
    load_classnames,
    load_cupl,
    load_templates,
    resolve_prompts,
)

DEFAULT_KS = (1, 5)


@torch.no_grad()
def build_classifier(encode_text: Callable, classnames: Sequence[str], prompts, batch_size: int = 256,
                     progress: bool | None = None) -> torch.Tensor:
    """Class weights [C, D]: per class, the renormalised mean of its normalised prompt embeddings."""
    if not classnames:
        raise InputError("no class names")
    per_class = class_prompts(classnames, prompts)
    texts = [t for ts in per_class for t in ts]
    owner = torch.repeat_interleave(torch.arange(len(per_class)), torch.tensor([len(ts) for ts in per_class]))
    emb = F.normalize(encode_texts(encode_text, texts, batch_size, progress), dim=-1)
    weights = torch.zeros(len(per_class), emb.shape[1]).index_add_(0, owner, emb)
    weights /= torch.bincount(owner, minlength=len(per_class))[:, None]
    return F.normalize(weights, dim=-1)


@torch.no_grad()
def class_ranks(image_features, classifier, labels, chunk_size: int = 4096) -> torch.Tensor:
    """0-based rank of each image's true class among all classes (ties count against it)."""
    img = torch.as_tensor(image_features).float()
    w = F.normalize(torch.as_tensor(classifier).float(), dim=-1)
    y = torch.as_tensor(labels).long()
    if img.ndim != 2 or w.ndim != 2 or img.shape[1] != w.shape[1]:
        raise InputError(f"image features {tuple(img.shape)} and classifier {tuple(w.shape)} do not match")
    if len(y) != len(img):
        raise InputError(f"{len(y)} labels for {len(img)} images")
    if len(y) and (y.min() < 0 or y.max() >= len(w)):
        raise InputError(f"labels must lie in 0..{len(w) - 1}")
    if not torch.isfinite(img.sum(1)).all():  # NaN/inf propagate into the row sums
        raise InputError("image features have NaN/inf values")
    img = F.normalize(img, dim=-1)
    ranks = torch.empty(len(y), dtype=torch.long)
    for s in range(0, len(y), chunk_size):
        logits = img[s: s + chunk_size] @ w.T
        true = logits.gather(1, y[s: s + chunk_size, None])
        ranks[s: s + chunk_size] = (logits >= true).sum(1) - 1
    return ranks


def zeroshot_accuracy(image_features, classifier, labels, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """``top1``, ``top5`` ... (fractions) and the counts."""
    ranks = class_ranks(image_features, classifier, labels)
    out = {f"top{k}": (ranks < k).double().mean().item() if len(ranks) else float("nan") for k in ks}
    out.update(images=int(len(ranks)), classes=int(torch.as_tensor(classifier).shape[0]))
    return out


def _prompt_sets(prompts, benchmark, dataset: str) -> list[tuple[str, object, str]]:
    """(label, prompts, source) per classifier: the benchmark's own sets when ``prompts`` is None."""
    if prompts is None and benchmark.prompts:
        return [(label, p, f"{benchmark.name}: {label}") for label, p in benchmark.prompts.items()]
    p, src = resolve_prompts("templates" if prompts is None else prompts, dataset)
    return [(prompts if isinstance(prompts, str) else "prompts", p, src)]


def evaluate_zeroshot(model, benchmark, *, prompts=None, dataset: str = "imagenet1k", preprocess=None,
                      ks: Sequence[int] = DEFAULT_KS, batch_size: int = 64, on_bad_image: str = "error",
                      num_workers: int = 0, progress: bool | None = None) -> dict:
    """Zero-shot top-K of ``model`` on a classification benchmark; the dict the reports consume.

    ``prompts`` None: the benchmark's own prompt sets (``benchmark.prompts``) if it has them, else
    CLIP's templates. With several sets the images are encoded once; the first set gives
    ``top1``..., each other set ``<label>_top1``...
    """
    if benchmark.task != "classification":
        raise InputError(f"benchmark {benchmark.name!r} is a {benchmark.task} benchmark, not classification")
    sets = _prompt_sets(prompts, benchmark, dataset)
    t0 = time.perf_counter()
    classifiers = [build_classifier(model.encode_text, benchmark.classnames, p, progress=progress)
                   for _, p, _ in sets]
    feats, benchmark = encode_benchmark_images(model, benchmark, preprocess=preprocess, batch_size=batch_size,
                                               on_bad=on_bad_image, num_workers=num_workers, progress=progress)
    t1 = time.perf_counter()
    metrics = zeroshot_accuracy(feats, classifiers[0], benchmark.labels, ks)
    for (label, _, _), clf in zip(sets[1:], classifiers[1:], strict=True):
        m = zeroshot_accuracy(feats, clf, benchmark.labels, ks)
        metrics.update({f"{label}_top{k}": m[f"top{k}"] for k in ks})
    data = benchmark.identity()
    data["prompts"] = sets[0][2]
    if len(sets) > 1:
        data["prompt_sets"] = {label: src for label, _, src in sets}
    return {"benchmark": benchmark.name, "task": "classification", "metrics": metrics, "data": data,
            "encode_s": round(t1 - t0, 3), "score_s": round(time.perf_counter() - t1, 3)}
