"""Paired comparisons of two models on the same held-out images, with intervals from seeds and images.

A score is a per-image value (e.g. R@1 as the mean of the image's I2T hit and its caption's T2I hit), one
row per training seed: ``a`` is [seeds_a, images], ``b`` is [seeds_b, images] over the same images. The
difference is ``mean(a) - mean(b)``; its interval comes from a two-level bootstrap: the images are resampled
(the same draw for both sides, which is what makes the comparison paired) and each side's seeds are resampled
on their own (their training runs are independent). A claim then **holds** when the interval excludes zero in
the claimed direction, is **reversed** when it excludes zero the other way, and is **not resolved** otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

HOLDS, REVERSED, NOT_RESOLVED = "holds", "reversed", "not resolved"


def per_image_hits(ranks: Mapping[str, Sequence[int]], k: int = 1) -> np.ndarray:
    """[images] mean of the I2T hit at ``k`` and the T2I hit at ``k`` (caption i is image i's caption)."""
    i2t, t2i = np.asarray(ranks["i2t"]), np.asarray(ranks["t2i"])
    if i2t.shape != t2i.shape:
        raise ValueError(f"one caption per image expected: {i2t.shape[0]} images, {t2i.shape[0]} captions")
    return ((i2t < k).astype(np.float64) + (t2i < k).astype(np.float64)) / 2


def _bootstrap_means(x: np.ndarray, seeds: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per replicate: the mean of ``x`` over resampled seeds [R, S] and resampled images [R, N]."""
    per_seed_mean = x[seeds].mean(axis=1)  # [R, N]: each image's mean over that replicate's seeds
    return np.take_along_axis(per_seed_mean, images, axis=1).mean(axis=1)


def paired_difference(a, b, *, reps: int = 4000, level: float = 0.95, seed: int = 0,
                      chunk: int = 500) -> dict:
    """``mean(a) - mean(b)`` with a ``level`` percentile interval (see the module's docstring)."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores need the same images: {a.shape[1]} against {b.shape[1]}")
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, reps, chunk):
        r = min(chunk, reps - start)
        images = rng.integers(0, n, size=(r, n))
        sa = rng.integers(0, a.shape[0], size=(r, a.shape[0]))
        sb = rng.integers(0, b.shape[0], size=(r, b.shape[0]))
        diffs.append(_bootstrap_means(a, sa, images) - _bootstrap_means(b, sb, images))
    d = np.concatenate(diffs)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(d, [tail, 100 - tail])
    return {"diff": float(a.mean() - b.mean()), "low": float(low), "high": float(high), "level": level,
            "seeds": [a.shape[0], b.shape[0]], "images": n, "reps": reps}


def verdict(interval: Mapping[str, float], direction: int = 1) -> str:
    """For a claim that the difference is positive (``direction`` 1) or negative (-1)."""
    low, high = interval["low"] * direction, interval["high"] * direction
    if direction < 0:
        low, high = high, low
    if low > 0:
        return HOLDS
    if high < 0:
        return REVERSED
    return NOT_RESOLVED


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of several comparisons: holds when each holds, reversed when any is reversed."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == REVERSED for v in verdicts):
        return REVERSED
    return NOT_RESOLVED


def format_interval(iv: Mapping[str, float], digits: int = 3) -> str:
    return f"{iv['diff']:+.{digits}f} [{iv['low']:+.{digits}f}, {iv['high']:+.{digits}f}]"
