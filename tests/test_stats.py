"""Intervals against independent computations: Wilson bounds as roots of their defining
quadratic, and the bootstrap against the normal approximation on a large sample."""

from __future__ import annotations

import math
import random

import pytest

from safemerge.evaluation.stats import bootstrap_mean, wilson, z_score


def wilson_by_roots(k: int, n: int, z: float) -> tuple[float, float]:
    """The p with (k/n - p)^2 = z^2 p (1 - p) / n, solved by bisection on each side of k/n."""
    phat = k / n

    def gap(p):
        return (phat - p) ** 2 - z * z * p * (1 - p) / n

    def root(lo, hi):
        for _ in range(200):
            mid = (lo + hi) / 2
            if (gap(lo) > 0) == (gap(mid) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if k == 0 else root(0.0, phat)
    high = 1.0 if k == n else root(phat, 1.0)
    return low, high


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (5, 100), (1, 3), (260, 520), (519, 520), (7, 8)])
def test_wilson_matches_the_roots_of_its_quadratic(k, n):
    est = wilson(k, n)
    low, high = wilson_by_roots(k, n, z_score(0.95))
    assert est.value == k / n and est.n == n
    assert est.low == pytest.approx(low, abs=1e-9) and est.high == pytest.approx(high, abs=1e-9)


def test_wilson_known_values_and_edges():
    assert wilson(0, 10).low == 0.0 and wilson(0, 10).high == pytest.approx(0.2775, abs=1e-4)
    est = wilson(5, 100)
    assert (round(est.low, 4), round(est.high, 4)) == (0.0215, 0.1118)
    empty = wilson(0, 0)
    assert math.isnan(empty.value) and (empty.low, empty.high) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_bootstrap_is_seeded_and_agrees_with_the_normal_interval():
    rng = random.Random(1)
    values = [rng.random() for _ in range(2000)]
    est = bootstrap_mean(values, seed=3)
    assert est == bootstrap_mean(values, seed=3) and est != bootstrap_mean(values, seed=4)
    mean = math.fsum(values) / len(values)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = 1.96 * sd / math.sqrt(len(values))
    assert est.value == pytest.approx(mean, abs=1e-12)
    assert est.low == pytest.approx(mean - half, abs=0.25 * half) and est.high == pytest.approx(mean + half, abs=0.25 * half)
    constant = bootstrap_mean([0.5] * 20)
    assert (constant.value, constant.low, constant.high) == (0.5, 0.5, 0.5)
    assert math.isnan(bootstrap_mean([]).value)
