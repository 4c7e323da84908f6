"""Paired differences with seed-and-image bootstrap intervals, and the verdicts drawn from them."""

import numpy as np
import pytest

from llm2clip.eval.paired import (
    HOLDS,
    NOT_RESOLVED,
    REVERSED,
    combine,
    format_interval,
    paired_difference,
    per_image_hits,
    verdict,
)


def test_per_image_hits_average_both_directions():
    hits = per_image_hits({"i2t": [0, 0, 3, 1], "t2i": [0, 2, 0, 5]})
    assert hits.tolist() == [1.0, 0.5, 0.5, 0.0]
    assert per_image_hits({"i2t": [0, 1], "t2i": [1, 4]}, k=2).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="one caption per image"):
        per_image_hits({"i2t": [0], "t2i": [0, 1]})


def test_a_constant_shift_is_exact_and_decided_both_ways():
    rng = np.random.default_rng(0)
    b = np.repeat(rng.random((1, 50)), 3, axis=0)  # three seeds that agree: only images vary
    iv = paired_difference(b + 0.1, b)
    assert iv["diff"] == pytest.approx(0.1) and iv["low"] == pytest.approx(0.1) and iv["high"] == pytest.approx(0.1)
    assert verdict(iv) == HOLDS and verdict(iv, -1) == REVERSED
    same = paired_difference(b, b)
    assert same["low"] == same["high"] == 0 and verdict(same) == NOT_RESOLVED


def test_image_noise_matches_the_normal_approximation():
    # one seed each: the interval is the paired bootstrap over images, ~ diff +- 1.96 sd(a - b) / sqrt(n)
    rng = np.random.default_rng(1)
    n = 3000
    a, b = (rng.random(n) < 0.3).astype(float), (rng.random(n) < 0.2).astype(float)
    iv = paired_difference(a, b, reps=4000)
    half = 1.96 * np.std(a - b) / np.sqrt(n)
    assert (iv["high"] - iv["low"]) / 2 == pytest.approx(half, rel=0.12)
    assert iv["low"] < a.mean() - b.mean() < iv["high"] and verdict(iv) == HOLDS


def test_seed_spread_widens_the_interval():
    # the same per-image scores shifted per seed: images alone say "holds", seeds say "not resolved"
    rng = np.random.default_rng(2)
    base = (rng.random(400) < 0.3).astype(float)
    a = np.stack([base + s for s in (-0.15, 0.0, 0.2)])  # three training seeds of model a
    b = np.stack([base - 0.02])
    iv = paired_difference(a, b, reps=4000)
    assert iv["diff"] == pytest.approx(a.mean() - b.mean())
    assert iv["high"] - iv["low"] > 0.2 and verdict(iv) == NOT_RESOLVED
    assert verdict(paired_difference(a.mean(0, keepdims=True), b)) == HOLDS
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, b[:, :10])


def test_combine_and_format():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, NOT_RESOLVED]) == NOT_RESOLVED
    assert combine([HOLDS, REVERSED, NOT_RESOLVED]) == REVERSED
    assert combine([]) == NOT_RESOLVED
    assert format_interval({"diff": 0.05, "low": -0.01, "high": 0.1}) == "+0.050 [-0.010, +0.100]"
