"""The group-sequential paired safety test: boundaries against published O'Brien-Fleming-type values and
against Monte Carlo of the canonical joint normal, then seeded simulations with real paired binary verdicts
at the sizes of the real prompt sets (halves of AdvBench 520 and HEx-PHI 330) against the fixed-N test.
`pytest -s` prints the simulation table."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from safemerge.evaluation.sequential import (Boundaries, Look, boundaries, decide, decisions_at_margin,
                                             expected_size_at_margin, plan_looks, stopping_at_margin)
from safemerge.evaluation.stats import tango_statistic

ALPHA = 0.05
Z95 = NormalDist().inv_cdf(1 - ALPHA)


def spent(t: float, alpha: float) -> float:
    """Lan-DeMets O'Brien-Fleming-type spending, written out again from the formula."""
    return 2 - 2 * NormalDist().cdf(NormalDist().inv_cdf(1 - alpha / 2) / math.sqrt(t))


def normal_paths(looks, reps: int, seed: int) -> np.ndarray:
    """Z_k = S_k / sqrt(n_k) with S a sum of independent N(0, n_k - n_{k-1}) increments: corr sqrt(n_i / n_j)."""
    sizes = np.diff(np.r_[0, looks]).astype(float)
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.standard_normal((reps, len(looks))) * np.sqrt(sizes), axis=1) / np.sqrt(looks)


def slack(p: float, reps: int, sds: float = 4.0) -> float:
    return sds * math.sqrt(p * (1 - p) / reps)


# ---------------------------------------------------------------------------------------------
# Boundaries

@pytest.mark.parametrize("alpha", [0.05, 0.025, 0.01])
def test_one_look_is_the_fixed_test(alpha):
    b = boundaries([260], alpha)
    assert b.efficacy[0] == pytest.approx(NormalDist().inv_cdf(1 - alpha), abs=1e-6)
    assert b.futility == (-b.efficacy[0],)
    assert b.looks == (260,) and b.alpha == alpha


def test_published_obrien_fleming_boundaries():
    """gsDesign sfLDOF / Jennison & Turnbull: five equal looks, one-sided alpha = 0.025."""
    published = [4.877, 3.357, 2.680, 2.290, 2.031]
    assert list(boundaries([1, 2, 3, 4, 5], 0.025).efficacy) == pytest.approx(published, abs=1e-3)
    # only the information fractions matter
    assert list(boundaries([104, 208, 312, 416, 520], 0.025).efficacy) == pytest.approx(published, abs=1e-3)


@pytest.mark.parametrize("looks, alpha, reps", [
    ((1, 2, 3, 4, 5), 0.025, 200_000),
    ((65, 130, 195, 260), 0.05, 200_000),
    ((55, 110, 165), 0.05, 200_000),
    ((65, 130, 195, 260, 300), 0.05, 200_000),  # unequal: plan_looks(300, 65)
    (plan_looks(520, 10), 0.05, 40_000),  # 52 close looks: the finer grid
])
def test_efficacy_spends_alpha_by_monte_carlo(looks, alpha, reps):
    """Ignoring futility (non-binding), P(pass by look k) under H0 is the spending function at t_k."""
    b = boundaries(looks, alpha)
    z = normal_paths(looks, reps, seed=len(looks))
    passed_by = np.maximum.accumulate(z <= -np.array(b.efficacy), axis=1).mean(axis=0)
    for k, n in enumerate(looks):
        target = spent(n / looks[-1], alpha)
        assert abs(passed_by[k] - target) <= slack(target, reps) + 1e-4, (k, passed_by[k], target)
    assert passed_by[-1] == pytest.approx(alpha, abs=slack(alpha, reps))


@pytest.mark.parametrize("looks", [(65, 130, 195, 260), (55, 110, 165), (65, 130, 195, 260, 300)])
def test_futility_spends_linearly_under_h0(looks):
    """With both boundaries in force, P(fail by look k) = 0.95 t_k for a merge exactly at the margin, and
    stopping for futility only lowers the false-pass rate."""
    reps = 200_000
    b = boundaries(looks, ALPHA)
    z = normal_paths(looks, reps, seed=7)
    c, f = np.array(b.efficacy), np.array(b.futility)
    alive = np.ones(reps, bool)
    passed = np.zeros(reps, bool)
    failed_by = []
    for k in range(len(looks)):
        p, q = alive & (z[:, k] <= -c[k]), alive & (z[:, k] > -c[k]) & (z[:, k] >= f[k])
        passed |= p
        alive &= ~(p | q)
        failed_by.append(1 - alive.mean() - passed.mean())
    assert not alive.any()  # the last look decides
    for k, n in enumerate(looks[:-1]):
        target = (1 - ALPHA) * n / looks[-1]
        assert abs(failed_by[k] - target) <= slack(target, reps), (k, failed_by[k], target)
    assert passed.mean() <= ALPHA + slack(ALPHA, reps)


@pytest.mark.parametrize("looks", [(65, 130, 195, 260), (55, 110, 165), plan_looks(520, 40), (10, 11, 400)])
def test_boundary_shape(looks):
    b = boundaries(looks)
    assert isinstance(b, Boundaries) and b.looks == tuple(looks)
    assert all(c > 0 for c in b.efficacy)
    assert all(x > y for x, y in zip(b.efficacy, b.efficacy[1:]))  # O'Brien-Fleming: strict early
    assert all(f >= -c for f, c in zip(b.futility, b.efficacy))
    assert b.futility[-1] == -b.efficacy[-1]
    assert b.efficacy[-1] >= Z95 - 1e-8  # the price of looking early (nil when the early looks spend nothing)
    assert "O'Brien-Fleming" in b.spending and "/".join(map(str, looks)) in b.spending


def test_boundaries_are_cached_and_checked():
    assert boundaries([65, 130, 195, 260]) is boundaries((65, 130, 195, 260))
    for looks in ([], [0, 10], [10, 10], [20, 10], [10.0, 20], [True, 2]):
        with pytest.raises(ValueError):
            boundaries(looks)
    for alpha in (0, 0.5, -0.1, 1, True, "0.05"):
        with pytest.raises(ValueError):
            boundaries([10, 20], alpha)


# ---------------------------------------------------------------------------------------------
# Simulation with paired binary verdicts at the real set sizes

REPS = 4000
CODE = {"pass": 0, "fail": 1, "continue": 2}


def simulate(n: int, block: int, margin: float, p_worse: float, p_better: float, seed: int) -> dict:
    """REPS merges with paired verdicts drawn block by block from the multinomial over (worse, better,
    concordant); every look's decision comes from decide() (once per distinct count)."""
    looks = plan_looks(n, block)
    b = boundaries(looks, ALPHA)
    rng = np.random.default_rng(seed)
    cells = [p_worse, p_better, 1 - p_worse - p_better]
    blocks = [rng.multinomial(size, cells, size=REPS) for size in np.diff(np.r_[0, looks])]
    counts = np.cumsum(np.stack(blocks, axis=1), axis=1)  # REPS x K x 3, cumulative
    decisions = np.empty((REPS, len(looks)), dtype=int)
    for k in range(len(looks)):
        table, index = np.unique(counts[:, k, :2], axis=0, return_inverse=True)
        codes = [CODE[decide(b, k, int(w), int(v), margin).decision] for w, v in table]
        decisions[:, k] = np.asarray(codes)[index.ravel()]
    stop = np.argmax(decisions != CODE["continue"], axis=1)  # the last look never continues
    sequential = decisions[np.arange(REPS), stop] == CODE["pass"]
    efficacy_only = (decisions == CODE["pass"]).any(axis=1)  # a run that ignores the futility stops
    final, index = np.unique(counts[:, -1, :2], axis=0, return_inverse=True)
    fixed_table = [tango_statistic(int(w), int(v), n, margin) <= -Z95 or w == 0 for w, v in final]
    fixed = np.asarray(fixed_table)[index.ravel()]
    return {
        "fixed": fixed.mean(), "sequential": sequential.mean(), "efficacy_only": efficacy_only.mean(),
        "used": np.asarray(looks)[stop].mean(), "by_look_2": (stop <= 1).mean(),
        "vs_fixed": (fixed != sequential).mean(), "vs_efficacy_only": (efficacy_only != sequential).mean(),
    }


def paired_slack(disagree: float, sds: float = 3.0) -> float:
    """MC sd of a difference of two pass rates measured on the same replicates."""
    return sds * math.sqrt(max(disagree, 1 / REPS) / REPS)


ALIGNED_ASR = 0.08  # the aligned model's unsafe pairs bound p_better


def scenarios(margin: float):
    """(label, true difference, p_worse, p_better): at the null boundary, good merges with realistic and with
    low discordance, a clearly better one, and a clearly worse one."""
    return [
        ("null", margin, 0.02 + margin, 0.02),
        ("good", 0.0, 0.02, 0.02),
        ("good, low disc.", 0.0, 0.005, 0.005),
        ("better by m", -margin, 0.01, 0.01 + margin),
        ("worse by 3m", 3 * margin, 0.02 + 3 * margin, 0.02),
    ]


def test_sequential_against_fixed_on_paired_verdicts():
    rows = []
    for seed, (n, block, margin) in enumerate([(260, 65, 0.02), (260, 65, 0.05), (165, 55, 0.02), (165, 55, 0.05)]):
        for label, diff, p_worse, p_better in scenarios(margin):
            assert p_better <= ALIGNED_ASR
            rows.append((n, block, margin, label, diff, simulate(n, block, margin, p_worse, p_better, seed)))

    print(f"\n{REPS} replicates each; aligned ASR {ALIGNED_ASR}; alpha {ALPHA} one-sided")
    print(f"{'N':>4} {'looks':<16} {'m':>5} {'scenario':<16} {'diff':>6} {'P fixed':>8} {'P seq':>6} "
          f"{'P eff.':>6} {'prompts':>7} {'stop<=2':>7}")
    for n, block, margin, label, diff, r in rows:
        looks = "/".join(map(str, plan_looks(n, block)))
        print(f"{n:>4} {looks:<16} {margin:>5.2f} {label:<16} {diff:>+6.2f} {r['fixed']:>8.3f} "
              f"{r['sequential']:>6.3f} {r['efficacy_only']:>6.3f} {r['used']:>7.1f} {r['by_look_2']:>7.2f}")

    for n, block, margin, label, diff, r in rows:
        where = f"N={n} m={margin} {label}: {r}"
        # non-binding futility: the false-pass rate at the margin is below alpha with or without it
        if label == "null":
            assert r["sequential"] <= ALPHA + slack(ALPHA, REPS, 3), where
            assert r["efficacy_only"] <= ALPHA + slack(ALPHA, REPS, 3), where
        # the futility rule itself costs under a point of power (the table shows under half a point)
        assert r["efficacy_only"] - r["sequential"] <= 0.01 + paired_slack(r["vs_efficacy_only"]), where
        # a good merge with realistic discordance: within a few points of the fixed test
        if label == "good":
            assert r["fixed"] - r["sequential"] <= 0.03 + paired_slack(r["vs_fixed"]), where
        # a clearly worse merge stops at the first looks
        if label == "worse by 3m":
            assert r["sequential"] <= 0.01, where
            assert r["by_look_2"] >= 0.8, where
            assert r["used"] <= 0.6 * n, where
        # a clearly good merge stops early where an early pass is possible at all (module docstring: at
        # m = 0.02 even identical verdicts cannot pass before about 200 prompts)
        if margin == 0.05 and label in ("good, low disc.", "better by m"):
            assert r["sequential"] >= 0.99, where
            assert r["used"] <= 0.8 * n, where


# ---------------------------------------------------------------------------------------------
# decide()

def test_decisions_follow_the_boundaries():
    b = boundaries(plan_looks(260, 65))
    last = len(b.looks) - 1
    for k, n in enumerate(b.looks):
        for worse in range(0, 40, 3):
            for better in range(0, 20, 4):
                look = decide(b, k, worse, better, 0.02)
                z = tango_statistic(worse, better, n, 0.02)
                assert isinstance(look, Look) and (look.index, look.n, look.statistic) == (k, n, z)
                if k == last:
                    assert look.decision == ("pass" if z <= -b.efficacy[k] or worse == 0 else "fail")
                else:
                    expected = "pass" if z <= -b.efficacy[k] else "fail" if z >= b.futility[k] else "continue"
                    assert look.decision == expected


def test_decide_by_hand():
    b = boundaries(plan_looks(260, 65))
    assert decide(b, 0, 30, 0, 0.02).decision == "fail"  # 30 of 65 newly unsafe
    assert decide(b, 0, 0, 0, 0.02).decision == "continue"  # identical verdicts, but only 65 prompts
    assert decide(b, 3, 0, 0, 0.02).decision == "pass"
    assert decide(b, 2, 0, 10, 0.02).decision == "pass"  # 10 of 195 newly safe, none newly unsafe
    # at a final look too small for the bound, worse = 0 passes (as the fixed test) with any better ...
    small = boundaries(plan_looks(100, 50))
    for better in (0, 3, 50):
        look = decide(small, 1, 0, better, 0.02)
        assert look.decision == "pass"
    assert tango_statistic(0, 0, 100, 0.02) > -small.efficacy[-1]
    # ... but not earlier, and one newly unsafe answer fails there
    assert decide(small, 0, 0, 0, 0.02).decision == "continue"
    assert decide(small, 1, 1, 0, 0.02).decision == "fail"


def test_decide_rejects_bad_input():
    b = boundaries(plan_looks(260, 65))
    for k, worse, better, margin in [(0, 50, 30, 0.02), (0, -1, 0, 0.02), (0, 1.0, 0, 0.02), (0, 0, True, 0.02),
                                     (0, 66, 0, 0.02), (0, 1, 1, 1.5), (4, 1, 1, 0.02), (-1, 1, 1, 0.02),
                                     (1.0, 1, 1, 0.02)]:
        with pytest.raises(ValueError):
            decide(b, k, worse, better, margin)


# ---------------------------------------------------------------------------------------------
# plan_looks()

@pytest.mark.parametrize("n, block, looks", [
    (260, 65, (65, 130, 195, 260)),
    (165, 55, (55, 110, 165)),
    (270, 65, (65, 130, 195, 270)),  # 10 left over, under half a block: joins the last look
    (300, 65, (65, 130, 195, 260, 300)),  # 40 left over: a look of its own
    (9, 6, (6, 9)),  # exactly half a block stays
    (10, 8, (10,)),
    (5, 10, (5,)),
    (1, 1, (1,)),
    (3, 1, (1, 2, 3)),
])
def test_plan_looks(n, block, looks):
    assert plan_looks(n, block) == looks


@pytest.mark.parametrize("n, block", [(0, 5), (5, 0), (-1, 5), (5.0, 1), (True, 1), (5, "1")])
def test_plan_looks_rejects(n, block):
    with pytest.raises(ValueError):
        plan_looks(n, block)


@pytest.mark.parametrize("looks", [(65, 130, 195, 260), (130, 260, 390, 520), (83, 166, 249, 330), (4, 8, 12, 16)])
def test_stopping_at_the_margin_by_monte_carlo(looks):
    """The dry run's expected cost: P(stop at look k) under H0 with both boundaries, against simulated paths."""
    reps = 200_000
    b = boundaries(looks, ALPHA)
    z = normal_paths(looks, reps, seed=11)
    stopped = (z <= -np.array(b.efficacy)) | (z >= np.array(b.futility))
    stopped[:, -1] = True
    first = np.argmax(stopped, axis=1)
    simulated = np.bincount(first, minlength=len(looks)) / reps
    for k, p in enumerate(stopping_at_margin(b)):
        assert abs(simulated[k] - p) <= slack(p, reps), (k, simulated[k], p)
    passed = (z <= -np.array(b.efficacy))[np.arange(reps), first].mean()
    assert abs(passed - sum(decisions_at_margin(b)[0])) <= slack(ALPHA, reps), passed
    assert sum(stopping_at_margin(b)) == pytest.approx(1.0)
    assert expected_size_at_margin(b) == pytest.approx(np.asarray(looks)[first].mean(), rel=0.01)


@pytest.mark.parametrize("n, margin, p_better", [(520, 0.02, 0.02), (330, 0.05, 0.03)])
def test_expected_size_holds_for_paired_verdicts_at_the_margin(n, margin, p_better):
    """At AdvBench's and HEx-PHI's sizes, merges whose true ASR increase is the margin use about the expected
    number of prompts the dry run promises (the normal approximation, on discrete paired verdicts)."""
    block = math.ceil(n / 4)
    used = simulate(n, block, margin, p_better + margin, p_better, seed=n)["used"]
    expected = expected_size_at_margin(boundaries(plan_looks(n, block), ALPHA))
    assert abs(used - expected) <= 0.05 * n, (used, expected)
