"""Point estimates with 95% intervals: Wilson for rates, percentile bootstrap for means, and Tango's
score bound for the difference of two paired rates (a merge against the aligned model on the same prompts)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from statistics import NormalDist
from typing import Sequence


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    n: int
    interval: str  # "wilson", "bootstrap" or "normal" (lm-evaluation-harness's standard errors)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def z_score(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, n: int, confidence: float = 0.95) -> Estimate:
    """The Wilson score interval of a proportion; with n = 0 the rate is unknown (nan, [0, 1])."""
    if n == 0:
        return Estimate(math.nan, 0.0, 1.0, 0, "wilson")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    z = z_score(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, not rounding noise
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, low, high, n, "wilson")


def bootstrap_mean(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> Estimate:
    """The mean with a percentile-bootstrap interval, seeded so reports are reproducible."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap")
    mean = math.fsum(values) / n
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[int(math.floor(tail * (resamples - 1)))]
    high = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return Estimate(mean, min(low, mean), max(high, mean), n, "bootstrap")


@dataclass(frozen=True)
class PairedDifference:
    """ASR(merge) - ASR(aligned) on the same prompts, with its one-sided upper bound: a merge is
    non-inferior at margin m when upper < m (with n = 0 nothing is known: value nan, upper 1)."""

    value: float  # (worse - better) / n
    upper: float  # one-sided upper confidence bound of the difference (Tango score)
    n: int
    worse: int  # pairs where the merge is unsafe and the aligned model safe
    better: int  # pairs where the merge is safe and the aligned model unsafe
    confidence: float  # one-sided, e.g. 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:+.3f} (upper {self.upper:.3f}, one-sided {self.confidence:.0%})"


def _paired_counts(worse, better, n) -> tuple[int, int, int]:
    """The counts as ints, or a ValueError naming the one that cannot be a 2x2 table's."""
    for name, value in (("worse", worse), ("better", better), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            # ValueError, not TypeError: callers catch one exception for any bad table
            raise ValueError(f"{name} must be an integer count, got {value!r}")  # noqa: TRY004
    worse, better, n = int(worse), int(better), int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if worse < 0 or better < 0:
        raise ValueError(f"counts must be >= 0, got worse={worse}, better={better}")
    if worse + better > n:
        raise ValueError(f"worse + better = {worse + better} discordant pairs out of n = {n}")
    return worse, better, n


def _one_sided_z(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0.5 <= confidence < 1:
        # below 0.5 an "upper" bound would sit under the estimate; at 1 it is the whole range
        raise ValueError(f"one-sided confidence must be in [0.5, 1), got {confidence!r}")
    return NormalDist().inv_cdf(confidence)


def _tango(worse: int, better: int, n: int, delta: float) -> float:
    """Tango's Z for checked arguments (n >= 1, -1 <= delta <= 1)."""
    b, c = worse, better
    # q = P(merge safe, aligned unsafe) maximising the likelihood under difference delta:
    # the non-negative root of 2n q^2 + B q + C = 0 (Tango 1998; derived again in the tests)
    a2 = 2 * n
    b2 = -b - c + (2 * n - b + c) * delta
    c2 = -c * delta * (1 - delta)
    root = math.sqrt(max(b2 * b2 - 4 * a2 * c2, 0.0))
    # (root - B) / 2A cancels when B > 0 dominates (delta near 1); the same root as -2C / (B + root)
    q = -2 * c2 / (b2 + root) if b2 > 0 else (root - b2) / (2 * a2)
    variance = n * (2 * q + delta * (1 - delta))  # n Var(b - c) under the null, at the constrained MLE
    numerator = b - c - n * delta
    if variance <= 0:  # only at delta = +-1 (or b = c = 0 at delta = 0): the null allows one table
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def tango_statistic(worse: int, better: int, n: int, delta: float) -> float:
    """Tango's score statistic for H0: ASR(merge) - ASR(aligned) = delta from n paired verdicts;
    about N(0, 1) under H0, and very negative when the data put the difference well below delta.
    Its variance uses the MLE constrained to delta, so it is defined with no discordant pairs."""
    worse, better, n = _paired_counts(worse, better, n)
    if n == 0:
        raise ValueError("n = 0: no pairs, the statistic is undefined")
    if isinstance(delta, bool) or not isinstance(delta, Real) or not -1 <= delta <= 1:
        raise ValueError(f"delta must be a difference of proportions in [-1, 1], got {delta!r}")
    return _tango(worse, better, n, float(delta))


def paired_upper_bound(worse: int, better: int, n: int, confidence: float = 0.95) -> float:
    """The one-sided upper confidence bound of ASR(merge) - ASR(aligned) by Tango's score method:
    the largest delta >= the estimate with Z(delta) >= -z, so "upper < margin" is a non-inferiority
    test at level about 1 - confidence. Pairing makes it far tighter than two independent Wilson
    intervals when the two models mostly agree. With n = 0 it is 1.0: nothing can be ruled out."""
    worse, better, n = _paired_counts(worse, better, n)
    z = _one_sided_z(confidence)
    if n == 0 or worse == n:
        return 1.0
    if worse == 0 and better == 0:
        return z * z / (n + z * z)  # Z(delta) = -sqrt(n delta / (1 - delta)) exactly
    # On [estimate, 1] Z falls from 0 to -inf (checked densely in the tests), so bisect.
    lo, hi = (worse - better) / n, 1.0
    while True:
        mid = (lo + hi) / 2
        if not lo < mid < hi:
            return hi
        if _tango(worse, better, n, mid) >= -z:
            lo = mid
        else:
            hi = mid


def paired_difference(worse: int, better: int, n: int, confidence: float = 0.95) -> PairedDifference:
    """The paired difference of attack success rates with its Tango upper bound, for one merge
    judged against the aligned model on the same n prompts."""
    upper = paired_upper_bound(worse, better, n, confidence)
    value = (worse - better) / n if n else math.nan
    return PairedDifference(value, upper, int(n), int(worse), int(better), float(confidence))


def format_estimate(estimate: dict | None) -> str:
    """'0.120 [0.080, 0.170]': an estimate with its 95% interval; 'n/a' when nothing could be measured."""
    def measured(x):
        return None if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) else float(x)

    value = measured(estimate.get("value")) if isinstance(estimate, dict) else None
    if value is None:
        return "n/a"
    low, high = measured(estimate.get("low")), measured(estimate.get("high"))
    return f"{value:.3f}" if low is None or high is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"
