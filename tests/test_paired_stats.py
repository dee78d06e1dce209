"""Tango's score bound for a paired difference of proportions, checked against published intervals,
an independent implementation (constrained MLE by maximising the likelihood numerically, then a dense
scan of the statistic), exact coverage by enumerating the trinomial, and seeded simulation at the
sizes of the real prompt sets (AdvBench and HEx-PHI halves)."""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest

from safemerge.evaluation.stats import PairedDifference, paired_difference, paired_upper_bound, tango_statistic


def z_one_sided(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


# ---------------------------------------------------------------------------------------------
# An independent Tango statistic. With cells p10 = P(worse), p01 = P(better) and the concordant
# rest, fixing delta = p10 - p01 leaves q = p01 free; the profile log-likelihood
#     b log(q + delta) + c log q + r log(1 - 2q - delta),   r = n - b - c,
# is concave on max(0, -delta) < q < (1 - delta) / 2, so its maximiser is found by bisecting the
# sign of its derivative (no quadratic formula). Under H0, Var(b - c) = n (p10 + p01 - delta^2)
# = n (2q + delta (1 - delta)), evaluated at that q.

def _q_bisect(b, c, n, delta, iterations=56):
    """Vectorised: b, c, n and delta broadcast (delta strictly inside (-1, 1)). A count of zero
    drops its term; a term whose denominator reaches 0 at a bound is infinite there."""
    b, c, n, delta = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (b, c, n, delta)))
    r = n - b - c
    lo = np.maximum(0.0, -delta)
    hi = (1.0 - delta) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(iterations):
            mid = (lo + hi) / 2
            slope = (np.where(b > 0, b / (mid + delta), 0.0) + np.where(c > 0, c / mid, 0.0)
                     - np.where(r > 0, 2 * r / (1 - 2 * mid - delta), 0.0))
            up = slope > 0
            lo = np.where(up, mid, lo)
            hi = np.where(up, hi, mid)
    return (lo + hi) / 2


def _q_bisect_scalar(b, c, n, delta, iterations=56):
    r = n - b - c
    lo, hi = max(0.0, -delta), (1.0 - delta) / 2
    for _ in range(iterations):
        mid = (lo + hi) / 2
        slope = 0.0
        if b:
            slope += b / (mid + delta) if mid + delta > 0 else math.inf
        if c:
            slope += c / mid if mid > 0 else math.inf
        if r:
            slope -= 2 * r / (1 - 2 * mid - delta) if 1 - 2 * mid - delta > 0 else math.inf
        if slope > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def reference_z(b, c, n, delta):
    q = _q_bisect(b, c, n, delta)
    return (b - c - n * delta) / np.sqrt(n * (2 * q + delta * (1 - delta)))


def reference_z_scalar(b, c, n, delta):
    q = _q_bisect_scalar(b, c, n, delta)
    return (b - c - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))


def reference_upper(b, c, n, confidence, grid=2000):
    """sup{delta >= estimate: Z(delta) >= -z} by a dense scan of [estimate, 1], asserting that the
    accepted points form one interval starting at the estimate, then bisection in the last bracket."""
    if b == n:
        return 1.0
    z = z_one_sided(confidence)
    est = (b - c) / n
    deltas = est + (1 - est) * np.arange(1, grid) / grid
    ok = reference_z(b, c, n, deltas) >= -z
    accepted = int(ok.sum())
    assert ok[:accepted].all(), f"{{Z >= -z}} is not an interval for b={b}, c={c}, n={n}"
    lo = est if accepted == 0 else float(deltas[accepted - 1])
    hi = 1.0 if accepted == len(deltas) else float(deltas[accepted])
    for _ in range(45):
        mid = (lo + hi) / 2
        if reference_z_scalar(b, c, n, mid) >= -z:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------------
# 1. Published Tango intervals. A two-sided 100(1 - 2a)% interval's upper limit is the one-sided
# 100(1 - a)% upper bound, and its lower limit is minus the upper bound with the two discordant
# cells swapped. Tables are (n11, n12, n21, n22) with the difference (n12 - n21) / N, i.e.
# worse = n12, better = n21. The primary papers were not reachable from here; the values are the
# published examples as two R packages transcribe and test them (ratesci, P. Laud; contingencytables,
# the companion package of Fagerland, Lydersen & Laake's book), which the bound must reproduce:
#  - Fagerland, Lydersen & Laake, Stat Med 2014;33:2850-2875 (and their book "Statistical Analysis
#    of Contingency Tables", CRC 2017, ch. 8): airway hyper-responsiveness before/after stem cell
#    transplantation (Bentur et al. 2009), (1, 1, 7, 12): Tango 95% CI -0.517 to -0.026
#    [ratesci tests/testthat/test3.R]; complete response before/after consolidation therapy
#    (Cavo et al. 2012), (59, 6, 16, 80): estimate -0.0621, 95% CI -0.1240 to -0.0054
#    [contingencytables tests/testthat/test-ch8 output of Tango_asymptotic_score_CI_paired_2x2].
#  - Agresti & Min, Stat Med 2005;24:729-740: (53, 16, 8, 9): 95% CI -0.020 to 0.207 [ratesci].
#  - Tang, Li & Tang, Stat Methods Med Res 2010 (Tango's interval, their example): (8, 3, 1, 2):
#    95% CI -0.1670 to 0.4327 [ratesci].
#  - Chang et al., J Appl Stat 2024;51:139-152: (7, 25, 2, 68): 95% CI 0.139 to 0.321 [ratesci].
#  - ratesci's "Tango RD" published examples (also M-L Tang et al.'s examples): (4, 9, 3, 16):
#    95% CI -0.027 to 0.390; (43, 0, 1, 0), an off-diagonal zero cell: 90% CI -0.096 to 0.037.
PUBLISHED = [
    # (n12, n21, N, two-sided level, lower, upper, decimals)
    (1, 7, 21, 0.95, -0.517, -0.026, 3),
    (6, 16, 161, 0.95, -0.1240, -0.0054, 4),
    (16, 8, 86, 0.95, -0.020, 0.207, 3),
    (3, 1, 14, 0.95, -0.1670, 0.4327, 4),
    (25, 2, 102, 0.95, 0.139, 0.321, 3),
    (9, 3, 32, 0.95, -0.027, 0.390, 3),
    (0, 1, 44, 0.90, -0.096, 0.037, 3),
]


@pytest.mark.parametrize(("b", "c", "n", "level", "low", "high", "decimals"), PUBLISHED)
def test_published_tango_intervals(b, c, n, level, low, high, decimals):
    one_sided = 1 - (1 - level) / 2
    tolerance = 0.5 * 10 ** -decimals + 1e-12  # agreement to the printed precision
    assert paired_upper_bound(b, c, n, one_sided) == pytest.approx(high, abs=tolerance)
    assert -paired_upper_bound(c, b, n, one_sided) == pytest.approx(low, abs=tolerance)


# ---------------------------------------------------------------------------------------------
# 2. Every table of small n against the independent implementation.

@pytest.mark.parametrize("n", [5, 12, 20])
def test_bound_matches_an_independent_scan_for_every_small_table(n):
    for b in range(n + 1):
        for c in range(n + 1 - b):
            for confidence in (0.95,) if n == 20 else (0.95, 0.8):
                got = paired_upper_bound(b, c, n, confidence)
                want = reference_upper(b, c, n, confidence)
                assert got == pytest.approx(want, abs=1e-9), (b, c, n, confidence)


def test_statistic_matches_the_independent_mle_and_mcnemar():
    for b, c, n in [(0, 0, 10), (3, 0, 10), (0, 4, 10), (5, 2, 20), (13, 0, 260), (20, 7, 260), (1, 40, 165)]:
        deltas = np.linspace(-0.97, 0.97, 41)
        ref = reference_z(b, c, n, deltas)
        got = np.array([tango_statistic(b, c, n, float(d)) for d in deltas])
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
        if b + c:  # at delta = 0 the score statistic is McNemar's (Tango 1998)
            assert tango_statistic(b, c, n, 0.0) == pytest.approx((b - c) / math.sqrt(b + c), rel=1e-12)


def test_statistic_falls_from_zero_at_the_estimate_towards_one():
    """Bisection needs Z to decrease on [estimate, 1]: checked (with the independent Z) on every table
    with n <= 24 and on the low-discordance corner of n = 165 and 260."""
    tables = [(b, c, n) for n in range(1, 25) for b in range(n) for c in range(n + 1 - b)]
    tables += [(b, c, n) for n in (165, 260) for b in range(0, 40, 3) for c in range(0, 40, 3)]
    b, c, n = (np.array(v, dtype=float)[:, None] for v in zip(*tables, strict=True))
    est = (b - c) / n
    deltas = est + (1 - est) * np.arange(1, 300)[None, :] / 300
    z = reference_z(b, c, n, deltas)
    assert np.all(np.diff(z, axis=1) < 0)
    for x, y, m in tables[::7]:
        assert tango_statistic(x, y, m, (x - y) / m) == pytest.approx(0.0, abs=1e-9)
        assert tango_statistic(x, y, m, 1.0) == -math.inf


# ---------------------------------------------------------------------------------------------
# 3. Exact coverage: the bound depends on (b, c) only, so enumerate the trinomial (b, c, rest).

def exact_coverage(n, confidence, p10, p01):
    cells = [(b, c) for b in range(n + 1) for c in range(n + 1 - b)]
    b = np.array([x for x, _ in cells])
    c = np.array([y for _, y in cells])
    r = n - b - c
    upper = np.array([paired_upper_bound(int(x), int(y), n, confidence) for x, y in cells])
    log_coef = np.array([math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(y + 1) - math.lgamma(n - x - y + 1)
                         for x, y in cells])
    p10 = np.asarray(p10, dtype=float)[:, None]
    p01 = np.asarray(p01, dtype=float)[:, None]
    rest = np.clip(1 - p10 - p01, 0.0, 1.0)

    def term(k, p):  # k log p with 0 log 0 = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(k == 0, 0.0, k * np.log(p))

    pmf = np.exp(log_coef + term(b, p10) + term(c, p01) + term(r, rest))
    assert np.allclose(pmf.sum(axis=1), 1.0)
    covered = upper[None, :] >= (p10 - p01)
    return (pmf * covered).sum(axis=1)


@pytest.mark.parametrize("n", [20, 40])
def test_exact_coverage_of_the_one_sided_bound(n):
    step = 0.02
    grid = [(i * step, j * step) for i in range(51) for j in range(51) if i + j <= 50]
    p10, p01 = (np.array(v) for v in zip(*grid, strict=True))
    coverage = exact_coverage(n, 0.95, p10, p01)
    # Measured on this grid (1326 points): n = 20 mean 0.952, min 0.885; n = 40 mean 0.951, min 0.910,
    # both minima at (p10, p01) = (0.94, 0), nearly all pairs discordant one way; score bounds are
    # approximate. Low discordance, our regime (p10 + p01 <= 0.2): mean 0.967 / 0.957, min 0.922 / 0.935.
    assert coverage.mean() >= 0.94
    assert coverage.min() >= 0.88
    low = (p10 + p01) <= 0.2 + 1e-12
    assert coverage[low].mean() >= 0.95
    assert coverage[low].min() >= 0.92


# ---------------------------------------------------------------------------------------------
# 4. Simulation at the real set sizes, seeded.

@pytest.mark.parametrize("n", [260, 165])
@pytest.mark.parametrize(("p10", "p01"), [(0.01, 0.005), (0.03, 0.01), (0.0, 0.002), (0.002, 0.0), (0.005, 0.005),
                                          (0.05, 0.05), (0.10, 0.03), (0.02, 0.08)])
def test_simulated_coverage_at_the_set_sizes(n, p10, p01):
    # Measured (this seed): n = 260: 0.962, 0.956, 0.998, 1.000, 0.960, 0.950, 0.951, 0.948 in the order
    # listed; n = 165: 0.961, 0.965, 1.000, 1.000, 0.978, 0.951, 0.952, 0.942 (exact: 0.9418).
    rng = np.random.default_rng(20240 + n)
    draws = 100_000
    counts = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=draws)[:, :2]
    tables, freq = np.unique(counts, axis=0, return_counts=True)
    bounds = np.array([paired_upper_bound(int(b), int(c), n) for b, c in tables])
    covered = int(freq[bounds >= p10 - p01].sum())
    assert covered / draws >= 0.94, covered / draws


def _exact_coverage_low_discordance(n, p10, p01, top=80):
    """Exact coverage at a real set size, enumerating b, c <= top (the rest has negligible mass)."""
    bs, cs = np.meshgrid(np.arange(top + 1), np.arange(top + 1), indexing="ij")
    upper = np.array([[paired_upper_bound(b, c, n) for c in range(top + 1)] for b in range(top + 1)])
    log_coef = np.vectorize(lambda b, c: math.lgamma(n + 1) - math.lgamma(b + 1) - math.lgamma(c + 1)
                            - math.lgamma(n - b - c + 1))(bs, cs)
    out = []
    for x, y in zip(p10, p01, strict=True):
        with np.errstate(divide="ignore", invalid="ignore"):
            log_pmf = (log_coef + np.where(bs > 0, bs * np.log(x), 0.0) + np.where(cs > 0, cs * np.log(y), 0.0)
                       + (n - bs - cs) * np.log(1 - x - y))
        pmf = np.exp(log_pmf)
        assert pmf.sum() > 1 - 1e-9
        out.append(float(pmf[upper >= x - y].sum()))
    return np.array(out)


@pytest.mark.parametrize("n", [260, 165])
def test_exact_coverage_at_the_non_inferiority_margin(n):
    """What the rule "upper < 0.02" needs: coverage when the true difference is the margin. Measured
    min over p01 in [0, 0.1]: 0.9485 (n = 260), 0.9492 (n = 165). The known weak spot is elsewhere: a
    merge that is never worse (p10 = 0) and sometimes better, where the bound undercovers (min 0.920
    at p01 = 0.02 for n = 260, 0.913 at p01 = 0.0275 for n = 165); there the truth is already below
    any positive margin, so it cannot pass a merge that should fail."""
    p01 = np.arange(0, 0.1001, 0.0025)
    assert _exact_coverage_low_discordance(n, p01 + 0.02, p01).min() >= 0.945
    p01 = np.arange(0.0025, 0.1001, 0.0025)
    never_worse = _exact_coverage_low_discordance(n, np.zeros_like(p01), p01)
    assert never_worse.min() >= 0.91


# ---------------------------------------------------------------------------------------------
# 5. Properties and edge cases.

@pytest.mark.parametrize("n", [1, 7, 165, 260, 520])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_no_discordant_pairs_has_the_closed_form(n, confidence):
    z = z_one_sided(confidence)
    assert paired_upper_bound(0, 0, n, confidence) == pytest.approx(z * z / (n + z * z), rel=1e-12)
    for delta in (0.001, 0.01, 0.3):  # Z(delta) = -sqrt(n delta / (1 - delta)) when b = c = 0
        assert tango_statistic(0, 0, n, delta) == pytest.approx(-math.sqrt(n * delta / (1 - delta)), rel=1e-12)


def test_margins_at_the_advbench_half():
    identical = paired_difference(0, 0, 260)
    assert identical.value == 0.0
    assert identical.upper < 0.02 and identical.upper == pytest.approx(0.0103, abs=5e-5)
    for worse, better in [(13, 0), (20, 7)]:  # five points of extra compliance
        assert paired_upper_bound(worse, better, 260) > 0.02
    for worse, better in [(9, 0), (15, 7)]:  # about the same at the HEx-PHI half
        assert paired_upper_bound(worse, better, 165) > 0.02


def test_monotone_in_each_cell_and_above_the_estimate():
    for n, top in [(40, 40), (260, 30)]:
        for b in range(top + 1):
            for c in range(min(top, n - b) + 1):
                upper = paired_upper_bound(b, c, n)
                assert (b - c) / n <= upper <= 1.0
                if b + 1 + c <= n:
                    assert paired_upper_bound(b + 1, c, n) > upper, (b, c, n)
                if c >= 1:
                    assert paired_upper_bound(b, c - 1, n) > upper, (b, c, n)
    assert paired_upper_bound(10, 0, 10) == 1.0 and paired_upper_bound(9, 0, 10) < 1.0
    assert -1.0 < paired_upper_bound(0, 10, 10) < 0.0


def test_higher_confidence_widens_and_half_confidence_is_the_estimate():
    for b, c, n in [(3, 1, 14), (13, 0, 260), (20, 7, 260), (0, 5, 165)]:
        bounds = [paired_upper_bound(b, c, n, conf) for conf in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)]
        assert bounds[0] == pytest.approx((b - c) / n, abs=1e-12)
        assert all(x < y for x, y in itertools.pairwise(bounds))


def test_no_pairs():
    assert paired_upper_bound(0, 0, 0) == 1.0
    result = paired_difference(0, 0, 0)
    assert math.isnan(result.value) and result.upper == 1.0 and result.n == 0
    with pytest.raises(ValueError, match="n = 0"):
        tango_statistic(0, 0, 0, 0.0)


def test_paired_difference_record():
    result = paired_difference(20, 7, 260, 0.9)
    assert isinstance(result, PairedDifference)
    assert result.value == pytest.approx(13 / 260)
    assert result.upper == paired_upper_bound(20, 7, 260, 0.9)
    assert result.to_dict() == {"value": 13 / 260, "upper": result.upper, "n": 260, "worse": 20, "better": 7,
                                "confidence": 0.9}
    assert "upper" in str(result)
    with pytest.raises(AttributeError):
        result.upper = 0.0  # frozen


@pytest.mark.parametrize(("args", "named"), [
    ((-1, 0, 10), "-1"),
    ((0, -2, 10), "-2"),
    ((6, 5, 10), "11"),
    ((0, 0, -3), "-3"),
    ((2.5, 0, 10), "2.5"),
    (("3", 0, 10), "'3'"),
    ((True, 0, 10), "True"),
    ((0, 0, 10.0), "10.0"),
])
def test_invalid_counts_raise(args, named):
    for call in (lambda: paired_upper_bound(*args), lambda: paired_difference(*args),
                 lambda: tango_statistic(*args, 0.0)):
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            call()


@pytest.mark.parametrize("confidence", [0.0, 0.3, 1.0, 1.5, -0.95, float("nan"), "0.95"])
def test_invalid_confidence_raises(confidence):
    with pytest.raises(ValueError, match="confidence"):
        paired_upper_bound(3, 1, 20, confidence)
    with pytest.raises(ValueError, match="confidence"):
        paired_difference(3, 1, 20, confidence)


@pytest.mark.parametrize("delta", [1.5, -1.01, float("nan"), "0.1"])
def test_invalid_delta_raises(delta):
    with pytest.raises(ValueError, match="delta"):
        tango_statistic(3, 1, 20, delta)
