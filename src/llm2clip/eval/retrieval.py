"""Image-text retrieval: R@K in both directions, for any number of captions per image.

Names say the direction: ``i2t_R@K`` has image queries (a hit if *any* of the image's captions is
in the top K captions), ``t2i_R@K`` has caption queries (a hit if the caption's own image is in
the top K images). CLIP_benchmark calls these ``text_retrieval_recall@K`` and
``image_retrieval_recall@K``; our values equal its values (tests/test_retrieval.py).

Captions are tied to images by an explicit caption-to-image index, never by a reshape, so unequal
caption counts cannot shift anything (docs/METHOD.md 7.6).

How it is computed: instead of a top-K list, every query gets its exact rank, the number of
wrong candidates scoring at least as high as its best right one. R@K is then ``rank < K`` for any K
at no extra cost, and the only state kept across chunks is one counter per image and one rank per
caption. Similarities are made a block of captions at a time, so memory is bounded by
``max_chunk_bytes`` whatever the pool size (1M captions x 100k images included).

Ties count against the query (a wrong candidate with an equal score is ranked first): a
degenerate model with constant features scores 0, not 100 %, and the result does not depend on
the order of the candidates. On features without exact ties this equals top-K membership.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

DEFAULT_KS = (1, 5, 10)
CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100)
DEFAULT_CHUNK_BYTES = 64 << 20
_I16 = 32767  # the most rows or columns one int16 count may cover


@dataclass
class RetrievalRanks:
    """0-based ranks: ``i2t[i]`` for image i (-1 when it has no caption), ``t2i[c]`` for caption c."""

    i2t: torch.Tensor
    t2i: torch.Tensor

    @property
    def i2t_valid(self) -> torch.Tensor:
        return self.i2t[self.i2t >= 0]

    def recall(self, ks: Sequence[int] = DEFAULT_KS) -> dict:
        i2t, ks = self.i2t_valid, _check_ks(ks)
        out = {}
        for k in ks:
            out[f"i2t_R@{k}"] = (i2t < k).double().mean().item() if len(i2t) else float("nan")
        for k in ks:
            out[f"t2i_R@{k}"] = (self.t2i < k).double().mean().item() if len(self.t2i) else float("nan")
        return out

    def curves(self, ks: Sequence[int] = CURVE_KS) -> dict:
        """R@K at several K, for plots (recall@K curves)."""
        r = self.recall(ks)
        return {"k": list(ks), "i2t": [r[f"i2t_R@{k}"] for k in ks], "t2i": [r[f"t2i_R@{k}"] for k in ks]}

    def summary(self) -> dict:
        """Median and mean rank, 1-based as usual in papers."""
        i2t, t2i = self.i2t_valid.double() + 1, self.t2i.double() + 1
        return {"i2t_median_rank": i2t.median().item() if len(i2t) else float("nan"),
                "t2i_median_rank": t2i.median().item() if len(t2i) else float("nan"),
                "i2t_mean_rank": i2t.mean().item() if len(i2t) else float("nan"),
                "t2i_mean_rank": t2i.mean().item() if len(t2i) else float("nan")}


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise InputError(f"K values must be positive integers, got {ks}")
    return ks


def _as_features(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if t.ndim != 2:
        raise InputError(f"{what} must be a [N, D] matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InputError(f"{what} must be floating point, got {t.dtype}")
    return t


def check_caption_index(caption_image, n_images: int, n_captions: int) -> torch.Tensor:
    """The caption-to-image index as a long tensor, after checking its length and range."""
    idx = torch.as_tensor(np.asarray(caption_image) if not isinstance(caption_image, torch.Tensor) else caption_image)
    if idx.ndim != 1:
        raise InputError(f"caption_image must be 1-D (one image index per caption), got shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise InputError(f"caption_image must hold integer image indices, got {idx.dtype}")
    if len(idx) != n_captions:
        raise InputError(f"caption_image has {len(idx)} entries for {n_captions} captions")
    idx = idx.long()
    if n_captions:
        bad = ((idx < 0) | (idx >= n_images)).nonzero().flatten()
        if len(bad):
            c = int(bad[0])
            raise InputError(f"caption {c} points to image {int(idx[c])}, outside 0..{n_images - 1} "
                             f"({len(bad)} such captions)")
    return idx


def caption_index_from_lists(captions_per_image: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Flatten per-image caption lists into (captions, caption-to-image index)."""
    captions, index = [], []
    for i, caps in enumerate(captions_per_image):
        if isinstance(caps, str):
            raise InputError(f"image {i}: expected a list of captions, got a single string")
        captions.extend(caps)
        index.extend([i] * len(caps))
    return captions, np.asarray(index, dtype=np.int64)


def rows_per_chunk(n_images: int, dim: int = 0, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Captions per block: a float32 score plus a bool per image, or the gathered image rows."""
    return min(_I16, max(1, int(max_chunk_bytes) // (5 * max(1, n_images, dim))))


@torch.no_grad()
def retrieval_ranks(image_features, text_features, caption_image, *, normalize: bool = True,
                    chunk_size: int | None = None, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    device: str | torch.device | None = None) -> RetrievalRanks:
    """Exact I2T and T2I ranks of every query; scores are cosine (``normalize``) or dot products."""
    img = _as_features(image_features, "image_features")
    txt = _as_features(text_features, "text_features")
    if img.shape[1] != txt.shape[1]:
        raise InputError(f"image features are {img.shape[1]}-d but text features are {txt.shape[1]}-d")
    n_i, n_t = img.shape[0], txt.shape[0]
    if n_i == 0:
        raise InputError("no images to retrieve from")
    ci = check_caption_index(caption_image, n_i, n_t)
    for t, what in ((img, "image_features"), (txt, "text_features")):
        # A row sum is non-finite iff a value is (NaN/inf propagate); a full mask would cost N x D bytes.
        bad = (~torch.isfinite(t.sum(1, dtype=torch.float32))).nonzero().flatten()
        if len(bad):  # NaN compares false everywhere and would rank first
            raise InputError(f"{what}: {len(bad)} rows have NaN/inf values (first: row {int(bad[0])})")
    dev = torch.device(device) if device is not None else img.device
    img = img.to(dev, torch.float32)
    if normalize:
        img = F.normalize(img, dim=-1)
    ci_dev = ci.to(dev)
    rows = min(chunk_size, _I16) if chunk_size else rows_per_chunk(n_i, img.shape[1], max_chunk_bytes)

    def text_block(s: int, e: int) -> torch.Tensor:
        t = txt[s:e].to(dev, torch.float32)
        return F.normalize(t, dim=-1) if normalize else t

    # I2T threshold: each image's best own-caption score (-inf when it has none).
    best = torch.full((n_i,), float("-inf"), device=dev)
    for s in range(0, n_t, rows):
        e = min(s + rows, n_t)
        pos = (text_block(s, e) * img[ci_dev[s:e]]).sum(1)
        best.scatter_reduce_(0, ci_dev[s:e], pos, reduce="amax")

    t2i = torch.zeros(n_t, dtype=torch.long, device=dev)
    i2t = torch.zeros(n_i, dtype=torch.long, device=dev)
    hit = torch.empty((min(rows, n_t), n_i), dtype=torch.bool, device=dev)
    for s in range(0, n_t, rows):
        e = min(s + rows, n_t)
        sims = text_block(s, e) @ img.T
        h = hit[: e - s]
        r = torch.arange(e - s, device=dev)
        own = sims[r, ci_dev[s:e]]
        # int16 sums of uint8 views are several times faster than bool sums; blocks keep them exact.
        for a in range(0, n_i, _I16):
            b = min(a + _I16, n_i)
            torch.ge(sims[:, a:b], own[:, None], out=h[:, a:b])
            t2i[s:e] += h[:, a:b].view(torch.uint8).sum(1, dtype=torch.int16)
        sims[r, ci_dev[s:e]] = float("-inf")  # positives never count against their image
        torch.ge(sims, best[None, :], out=h)
        i2t += h.view(torch.uint8).sum(0, dtype=torch.int16)
    t2i -= 1  # the caption's own image was counted
    i2t[torch.isinf(best)] = -1
    return RetrievalRanks(i2t=i2t.cpu(), t2i=t2i.cpu())


def retrieval_metrics(image_features, text_features, caption_image, ks: Sequence[int] = DEFAULT_KS,
                      **kw) -> dict:
    """``i2t_R@K`` and ``t2i_R@K`` (fractions) plus pool sizes; keyword args go to retrieval_ranks."""
    ks = _check_ks(ks)
    ranks = retrieval_ranks(image_features, text_features, caption_image, **kw)
    out = ranks.recall(ks)
    out.update(images=int(len(ranks.i2t)), captions=int(len(ranks.t2i)),
               images_without_captions=int((ranks.i2t < 0).sum()))
    return out


def retrieval_result(image_features, text_features, benchmark, ks: Sequence[int] = DEFAULT_KS,
                     device=None) -> dict:
    """Score features of a loaded benchmark (rows in its image and caption order): the result dict
    that reports consume, with the benchmark's identity."""
    ks = _check_ks(ks)
    t0 = time.perf_counter()
    ranks = retrieval_ranks(image_features, text_features, benchmark.caption_image, device=device)
    metrics = ranks.recall(ks)
    metrics.update(ranks.summary())
    metrics.update(images=int(len(ranks.i2t)), captions=int(len(ranks.t2i)),
                   images_without_captions=int((ranks.i2t < 0).sum()))
    return {"benchmark": benchmark.name, "task": "retrieval", "metrics": metrics, "curves": ranks.curves(),
            "data": benchmark.identity(), "score_s": round(time.perf_counter() - t0, 3)}


def evaluate_retrieval(model, benchmark, *, preprocess=None, ks: Sequence[int] = DEFAULT_KS,
                       batch_size: int = 64, on_bad_image: str = "error", num_workers: int = 0, device=None,
                       progress: bool | None = None) -> dict:
    """Encode a retrieval benchmark with ``model`` and score it; the dict the reports consume.

    ``model`` needs ``encode_image(batch)`` (``preprocess`` maps a PIL image to what goes in the
    batch; without it the batch is a list of PIL images) and ``encode_text(list_of_str)``.
    """
    from .encoding import encode_benchmark_images, encode_texts

    ks = _check_ks(ks)
    if benchmark.task != "retrieval":
        raise InputError(f"benchmark {benchmark.name!r} is a {benchmark.task} benchmark, not retrieval")
    t0 = time.perf_counter()
    img_feats, benchmark = encode_benchmark_images(model, benchmark, preprocess=preprocess, batch_size=batch_size,
                                                   on_bad=on_bad_image, num_workers=num_workers, progress=progress)
    txt_feats = encode_texts(model.encode_text, benchmark.captions, batch_size=batch_size, progress=progress)
    encode_s = time.perf_counter() - t0
    out = retrieval_result(img_feats, txt_feats, benchmark, ks, device)
    out["encode_s"] = round(encode_s, 3)
    return out
