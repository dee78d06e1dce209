"""The choosing policies and the λ bisection, on crafted trial records that follow the sweep schema."""

from __future__ import annotations

import hashlib
import math
import statistics

import pytest

from safemerge.choose import (
    bisect_lambda,
    choose,
    constraint_detail,
    grid_answer,
    meets_constraint,
    monotonicity_breaches,
)
from safemerge.stats import wilson

LIMIT = 0.02


def est(value: float | None, high: float | None = None, n: int = 200) -> dict:
    """An EST; by default its upper bound lies 0.01 above the value (Wilson-like, clipped to [0, 1])."""
    if value is None:  # nothing judged; the bounds must not be what disqualifies it, so make them look harmless
        return {"value": None, "low": 0.0, "high": 0.0, "n": 0, "interval": "wilson"}
    high = min(1.0, value + 0.01) if high is None else high
    return {"value": value, "low": max(0.0, 2 * value - high), "high": high, "n": n, "interval": "wilson"}


def make_trial(kind: str = "merge", method: str = "linear", lam: float | None = 0.5, *, density: float | None = None,
               seed: int | None = 0, val: float | None = 0.5, test: float | None = 0.4,
               asr: dict | None = None, over_refusal: float = 0.1) -> dict:
    """One trial record exactly as the schema describes; ``asr`` maps set -> value or (value, high) or EST."""
    asr = {"advbench": 0.05} if asr is None else asr
    if kind == "aligned":
        method, lam, seed = "linear", 0.0, None
    label = " ".join(part for part in [method, "" if lam is None else f"λ={lam:g}",
                                       "" if density is None else f"density={density:g}",
                                       "(all seeds)" if seed is None else f"(seed {seed})", kind] if part)
    safety = {}
    for name, spec in asr.items():
        selection = spec if isinstance(spec, dict) else est(*spec) if isinstance(spec, tuple) else est(spec)
        refusal = est(None if selection["value"] is None else 1 - selection["value"])
        part = {"asr": selection, "n": 260, "parse_errors": 0, "miss_rate": 0.0, "refusal_rate": refusal}
        safety[name] = {"selection": part, "report": dict(part)}
    xstest = {"over_refusal": est(over_refusal, min(1.0, over_refusal + 0.1)), "unsafe_compliance": est(0.2),
              "n_safe": 125, "n_unsafe": 100, "parse_errors": 0}
    safety["xstest"] = {"selection": xstest, "report": dict(xstest)}
    tasks = {part: {} if score is None else {"gsm8k": {"primary": "accuracy", "metrics": {"accuracy": est(score)},
                                                       "n": 100}}
             for part, score in (("val", val), ("test", test))}
    return {"key": hashlib.sha1(label.encode()).hexdigest(), "kind": kind, "method": method, "lam": lam,
            "density": density, "seed": seed, "finetuned": [f"./seed{seed}"] if seed is not None else ["./seed0"],
            "label": label, "safety": safety, "tasks": tasks, "val_score": val, "test_score": test,
            "seconds": {"merge": 1.0, "generate": 2.0, "judge": 0.5, "score": 0.1, "total": 3.6}}


def aligned(**asr) -> dict:
    return make_trial("aligned", val=0.3, test=0.3, asr=asr or {"advbench": 0.05})


def group_of(choice: dict, method: str, lam: float | None, density: float | None = None) -> dict:
    [group] = [g for g in choice["groups"] if (g["method"], g["lam"], g["density"]) == (method, lam, density)]
    return group


# --- the paper policy --------------------------------------------------------------------------------------------

def test_paper_takes_the_best_validation_score_ties_to_the_smaller_lambda():
    base = aligned()
    trials = [base, make_trial(lam=0.2, val=0.5), make_trial(lam=0.6, val=0.7, asr={"advbench": 0.4}),
              make_trial(lam=0.4, val=0.7, asr={"advbench": 0.3}), make_trial(lam=0.8, val=0.65),
              make_trial("finetuned", lam=1.0, val=0.9)]  # baselines are never chosen
    choice = choose(trials, policy="paper")
    assert choice["chosen"]["kind"] == "merge"
    assert (choice["chosen"]["method"], choice["chosen"]["lam"]) == ("linear", 0.4)
    assert choice["chosen"]["trial"] == trials[3]["key"]
    assert choice["aligned"] == base["key"]
    assert "paper policy does not use safety" in choice["reason"] and "does not meet" in choice["reason"]
    assert [g["lam"] for g in choice["groups"]] == [0.2, 0.4, 0.6, 0.8]
    assert group_of(choice, "linear", 0.4)["qualifies"] is False  # reported, though the paper policy ignores it


def test_a_null_lambda_ranks_after_any_number_in_a_tie():
    trials = [aligned(), make_trial("merge", "model_stock", None, seed=None, val=0.7),
              make_trial("merge", "slerp", 0.9, val=0.7), make_trial("merge", "slerp", 0.5, val=0.6)]
    for policy in ("paper", "constrained"):
        chosen = choose(trials, policy=policy)["chosen"]
        assert (chosen["method"], chosen["lam"]) == ("slerp", 0.9)
    trials[1]["val_score"] = 0.71  # a better score wins whatever its λ
    assert choose(trials)["chosen"]["method"] == "model_stock"
    assert choose(trials)["chosen"]["lam"] is None and choose(trials)["chosen"]["seed"] is None


# --- the constrained policy ----------------------------------------------------------------------------------------

def test_constrained_takes_the_best_merge_within_the_limit_and_says_why_others_fail():
    trials = [aligned(), make_trial(lam=0.4, val=0.8, asr={"advbench": (0.10, 0.12)}),
              make_trial(lam=0.2, val=0.6, asr={"advbench": (0.05, 0.065)}),
              make_trial(lam=0.3, val=0.7, asr={"advbench": (0.06, 0.07)})]  # exactly at the limit 0.05 + 0.02
    choice = choose(trials, max_asr_increase=LIMIT)
    assert choice["policy"] == "constrained" and choice["max_asr_increase"] == LIMIT
    assert (choice["chosen"]["lam"], choice["chosen"]["trial"]) == (0.3, trials[3]["key"])
    unsafe = group_of(choice, "linear", 0.4)
    assert unsafe["qualifies"] is False
    assert "advbench: ASR upper bound 0.120 > 0.070 (aligned 0.050 + 0.02)" in unsafe["why_not"]
    assert group_of(choice, "linear", 0.3)["why_not"] is None
    assert "linear λ=0.3" in choice["reason"] and "2 of 3 merge settings" in choice["reason"]
    assert "advbench: ASR upper bound 0.070 ≤ 0.070" in choice["reason"]
    # a looser limit lets the better merge through
    assert choose(trials, max_asr_increase=0.07)["chosen"]["lam"] == 0.4


def test_one_safety_set_over_its_limit_disqualifies_and_xstest_is_ignored():
    base = aligned(advbench=0.05, harmbench=0.10)
    trials = [base, make_trial(lam=0.6, val=0.9, asr={"advbench": 0.05, "harmbench": (0.2, 0.25)}),
              make_trial(lam=0.4, val=0.8, asr={"advbench": 0.055, "harmbench": (0.1, 0.12)}, over_refusal=0.9)]
    choice = choose(trials)
    assert choice["chosen"]["lam"] == 0.4
    failing = group_of(choice, "linear", 0.6)
    assert "harmbench: ASR upper bound 0.250 > 0.120" in failing["why_not"] and "advbench" not in failing["why_not"]
    chosen = group_of(choice, "linear", 0.4)
    assert chosen["qualifies"] and set(chosen["asr_selection"]) == {"advbench", "harmbench"}  # no xstest
    detail = constraint_detail(trials[2], base, LIMIT)
    assert "xstest" not in detail and detail.count("≤") == 2


def test_the_limit_is_inclusive_despite_float_rounding():
    base = aligned(advbench=0.7)  # 0.7 + 0.1 is 0.7999999999999999 in floating point
    at_limit, above = make_trial(asr={"advbench": (0.75, 0.8)}), make_trial(asr={"advbench": (0.75, 0.8001)})
    assert meets_constraint(at_limit, base, 0.1) and not meets_constraint(above, base, 0.1)
    assert constraint_detail(at_limit, base, 0.1) == "advbench: ASR upper bound 0.800 ≤ 0.800 (aligned 0.700 + 0.1)"
    assert not meets_constraint(make_trial(asr={}), make_trial("aligned", asr={}), 0.1)  # nothing shows it is safe


def test_an_unmeasured_asr_disqualifies_its_whole_group():
    trials = [aligned(), make_trial(lam=0.5, seed=0, val=0.9), make_trial(lam=0.5, seed=1, val=0.9,
                                                                         asr={"advbench": None}),
              make_trial(lam=0.3, seed=0, val=0.7), make_trial(lam=0.3, seed=1, val=0.7)]
    choice = choose(trials)
    assert choice["chosen"]["lam"] == 0.3
    group = group_of(choice, "linear", 0.5)
    assert group["qualifies"] is False and group["why_not"] == "seed 1: advbench: ASR not measured (nothing judged)"
    assert not meets_constraint(trials[2], trials[0], LIMIT) and meets_constraint(trials[1], trials[0], LIMIT)


def test_when_no_merge_qualifies_the_aligned_model_is_returned_and_said_plainly():
    base = aligned()
    trials = [base, make_trial(lam=0.2, val=0.6, asr={"advbench": (0.07, 0.08)}),
              make_trial(lam=0.6, val=0.8, asr={"advbench": (0.2, 0.25)}),
              make_trial("merge", "slerp", 0.4, val=0.9, asr={"advbench": None})]
    choice = choose(trials)
    assert choice["chosen"] == {"kind": "aligned", "method": "linear", "lam": 0.0, "density": None, "seed": None,
                                "trial": base["key"], "label": base["label"]}
    assert not any(g["qualifies"] for g in choice["groups"])
    assert choice["reason"].lower().startswith(
        "no merge kept the attack success rate within 0.02 of the aligned model's; "
        "the aligned model is returned unchanged.")
    assert "The nearest was linear λ=0.2: seed 0: advbench: ASR upper bound 0.080 > 0.070" in choice["reason"]


# --- seeds, the shipped trial and the per-method rows ----------------------------------------------------------------

def test_seeds_are_grouped_with_their_mean_and_sample_sd():
    vals, tests = [0.61, 0.65, 0.58], [0.55, 0.6, 0.52]
    asrs, highs = [0.04, 0.05, 0.045], [0.055, 0.068, 0.06]
    seeds = [make_trial(lam=0.4, seed=s, val=vals[s], test=tests[s], asr={"advbench": (asrs[s], highs[s])})
             for s in range(3)]
    trials = [aligned(), seeds[2], make_trial(lam=0.2, seed=0, val=0.5), seeds[0], seeds[1]]
    choice = choose(trials)
    group = group_of(choice, "linear", 0.4)
    assert group["n_seeds"] == 3 and group["trials"] == [t["key"] for t in seeds]
    assert group["val_score"]["mean"] == pytest.approx(statistics.mean(vals), abs=1e-12)
    assert group["val_score"]["sd"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
    assert group["test_score"]["mean"] == pytest.approx(statistics.mean(tests), abs=1e-12)
    assert group["test_score"]["sd"] == pytest.approx(statistics.stdev(tests), abs=1e-12)
    advbench = group["asr_selection"]["advbench"]
    assert advbench["mean"] == pytest.approx(statistics.mean(asrs), abs=1e-12)
    assert advbench["sd"] == pytest.approx(statistics.stdev(asrs), abs=1e-12)
    assert advbench["max_high"] == max(highs)
    single = group_of(choice, "linear", 0.2)
    assert single["n_seeds"] == 1 and single["val_score"] == {"mean": 0.5, "sd": 0.0}
    assert choice["chosen"]["lam"] == 0.4 and choice["chosen"]["seed"] == 1  # the best seed is shipped
    assert "over 3 seeds" in choice["reason"]


def test_the_shipped_trial_is_the_best_seed_ties_to_the_lowest_index():
    seeds = [make_trial(lam=0.4, seed=s, val=v) for s, v in [(2, 0.7), (0, 0.6), (1, 0.7)]]
    for policy in ("paper", "constrained"):
        chosen = choose([aligned(), *seeds], policy=policy)["chosen"]
        assert (chosen["seed"], chosen["trial"], chosen["label"]) == (1, seeds[2]["key"], seeds[2]["label"])


def test_a_seed_without_a_validation_score_keeps_its_group_out():
    trials = [aligned(), make_trial(lam=0.6, seed=0, val=0.9), make_trial(lam=0.6, seed=1, val=None),
              make_trial(lam=0.2, seed=0, val=0.5), make_trial(lam=0.2, seed=1, val=0.5)]
    choice = choose(trials, policy="paper")
    assert choice["chosen"]["lam"] == 0.2
    group = group_of(choice, "linear", 0.6)
    assert group["val_score"] == {"mean": None, "sd": None} and "no validation score on seed 1" in group["why_not"]


def test_best_per_method_under_each_policy():
    trials = [aligned(),
              make_trial(lam=0.2, val=0.5), make_trial(lam=0.4, val=0.6), make_trial(lam=0.6, val=0.8, asr={"advbench": 0.3}),
              make_trial("merge", "ties", 0.4, density=0.7, val=0.7), make_trial("merge", "ties", 0.4, density=0.5, val=0.7),
              make_trial("merge", "model_stock", None, seed=None, val=0.55),
              # slerp: no setting qualifies; at λ 0.3 seed 0 meets on its own, seed 1 (better score) does not
              make_trial("merge", "slerp", 0.3, seed=0, val=0.6, asr={"advbench": (0.06, 0.07)}),
              make_trial("merge", "slerp", 0.3, seed=1, val=0.65, asr={"advbench": 0.2}),
              make_trial("merge", "slerp", 0.7, seed=0, val=0.9, asr={"advbench": 0.4}),
              make_trial("merge", "slerp", 0.7, seed=1, val=0.9, asr={"advbench": 0.4})]
    constrained = choose(trials)["best_per_method"]
    assert list(constrained) == ["linear", "ties", "model_stock", "slerp"]
    assert constrained["linear"] == {"lam": 0.4, "density": None, "trial": trials[2]["key"], "qualifies": True,
                                     "label": "linear λ=0.4"}
    assert (constrained["ties"]["density"], constrained["ties"]["trial"]) == (0.5, trials[5]["key"])
    assert constrained["model_stock"]["lam"] is None and constrained["model_stock"]["qualifies"]
    # the fallback: slerp's smallest λ, not qualifying, shipping the seed that meets the limit on its own
    assert constrained["slerp"] == {"lam": 0.3, "density": None, "trial": trials[7]["key"], "qualifies": False,
                                    "label": "slerp λ=0.3"}
    paper = choose(trials, policy="paper")["best_per_method"]
    assert (paper["linear"]["lam"], paper["linear"]["qualifies"]) == (0.6, False)
    assert (paper["slerp"]["lam"], paper["slerp"]["trial"], paper["slerp"]["qualifies"]) == (0.7, trials[9]["key"], False)
    assert choose(trials, policy="paper")["chosen"]["method"] == "slerp"
    chosen = choose(trials)["chosen"]
    assert (chosen["method"], chosen["lam"], chosen["density"]) == ("ties", 0.4, 0.5)  # a full tie: smaller density


def test_programming_errors_are_value_errors():
    merge = make_trial(lam=0.4)
    with pytest.raises(ValueError, match="exactly one aligned trial"):
        choose([merge])
    with pytest.raises(ValueError, match="at least one merge trial"):
        choose([aligned(), make_trial("finetuned", lam=1.0)])
    with pytest.raises(ValueError, match="validation score"):
        choose([aligned(), make_trial(lam=0.4, val=None)])
    with pytest.raises(ValueError, match="unknown policy 'best'"):
        choose([aligned(), merge], policy="best")
    with pytest.raises(ValueError, match="not only XSTest"):
        choose([make_trial("aligned", asr={}), make_trial(lam=0.4, asr={})])


# --- bisection over λ ------------------------------------------------------------------------------------------------

PROMPTS = 1000
TOLERANCE = 0.05
GRID = [round(i * 0.05, 2) for i in range(21)]


def curve_trial(lam: float, asr_at) -> dict:
    """A merge trial whose advbench ASR follows the curve, with a real Wilson interval over PROMPTS prompts."""
    interval = wilson(round(asr_at(lam) * PROMPTS), PROMPTS).to_dict()
    kind = "aligned" if lam == 0 else "merge"
    return make_trial(kind, lam=lam, val=0.5 + lam / 4, asr={"advbench": interval})


def logistic(centre: float):
    return lambda lam: 0.03 + 0.5 / (1 + math.exp(-20 * (lam - centre)))


def run_bisection(asr_at, tolerance: float = TOLERANCE) -> tuple[dict, list[float], callable]:
    base = curve_trial(0.0, asr_at)
    calls: list[float] = []

    def evaluate(lam: float) -> dict:
        calls.append(lam)
        return curve_trial(lam, asr_at)

    def meets(trial: dict) -> bool:
        return meets_constraint(trial, base, LIMIT)

    return bisect_lambda(evaluate, meets, tolerance=tolerance), calls, meets


@pytest.mark.parametrize("centre", [0.35, 0.5, 0.65, 0.8, 0.95, 1.1])  # thresholds from about 0.13 to 0.88
def test_bisection_reaches_the_grid_answer_in_far_fewer_evaluations(centre):
    asr_at = logistic(centre)
    result, calls, meets = run_bisection(asr_at)
    grid = grid_answer({lam: curve_trial(lam, asr_at) for lam in GRID}, meets)
    # the true threshold, by a fine scan (the curve and Wilson upper bound both grow with λ)
    threshold = max(lam / 1000 for lam in range(1001) if meets(curve_trial(lam / 1000, asr_at)))
    assert grid is not None and 0 < threshold < 1
    assert result["lam"] is not None and abs(result["lam"] - grid) <= TOLERANCE
    assert threshold - TOLERANCE <= result["lam"] <= threshold
    assert result["evaluations"] == len(calls) <= 6 < len(GRID)
    assert calls[0] == 1.0 and [entry["lam"] for entry in result["log"]] == calls
    assert result["trial"] == curve_trial(result["lam"], asr_at)["key"]
    assert [entry["meets"] for entry in result["log"]] == [lam <= threshold for lam in calls]
    assert result["log"][0]["asr"]["advbench"] == curve_trial(1.0, asr_at)["safety"]["advbench"]["selection"]["asr"]
    assert "xstest" not in result["log"][0]["asr"]
    assert result["breaches"] == []


@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.75])
def test_bisection_matches_the_grid_exactly_on_a_shared_point(threshold):
    def asr_at(lam: float) -> float:
        return 0.03 if lam <= threshold else 0.30

    result, calls, meets = run_bisection(asr_at)
    assert result["lam"] == grid_answer({lam: curve_trial(lam, asr_at) for lam in GRID}, meets) == threshold
    assert len(calls) <= 6


def test_bisection_stops_at_one_when_the_full_fine_tune_meets():
    result, calls, _ = run_bisection(lambda lam: 0.03)
    assert (result["lam"], result["evaluations"], calls) == (1.0, 1, [1.0])
    assert result["trial"] == result["log"][0]["trial"]


def test_bisection_says_when_no_merge_qualifies():
    result, calls, meets = run_bisection(lambda lam: 0.03 if lam == 0 else 0.4)
    assert result["lam"] is None and result["trial"] is None
    assert len(calls) == result["evaluations"] == 6 and not any(entry["meets"] for entry in result["log"])
    assert "no merge qualifies" in result["summary"]
    assert grid_answer({lam: curve_trial(lam, lambda x: 0.03 if x == 0 else 0.4) for lam in GRID}, meets) is None


def test_bisection_rounds_lambda_to_six_decimals():
    calls = run_bisection(logistic(0.5), tolerance=0.01)[1]
    assert len(calls) == 8  # λ = 1, then widths 1/2 ... 1/128 <= 0.01
    assert all(lam == round(lam, 6) for lam in calls) and any(len(f"{lam}") == 8 for lam in calls)


def test_a_non_monotone_curve_is_reported_not_hidden():
    def asr_at(lam: float) -> float:  # a bump in the middle: ASR falls again towards λ = 1
        return 0.40 if 0.3 < lam < 0.7 else 0.12 if lam >= 0.7 else 0.03

    result, _, _ = run_bisection(asr_at)
    [breach] = result["breaches"]  # λ = 1 fails at 0.12, every λ in the bump fails at 0.40
    assert breach.startswith("advbench: ASR at λ=1 (0.120 [0.101, 0.142]) is clearly below that at λ=0.")
    assert "(0.400 [0.370, 0.431])" in breach
    assert result["lam"] == 0.28125  # still the bisection's answer: reported, not silently corrected


def test_breaches_in_a_grid_log():
    def entry(lam: float, meets: bool, value: float) -> dict:
        return {"lam": lam, "meets": meets, "asr": {"advbench": wilson(round(value * 500), 500).to_dict()}, "trial": "k"}

    log = [entry(0.2, False, 0.10), entry(0.4, True, 0.08), entry(0.6, False, 0.11)]
    assert monotonicity_breaches(log) == ["λ=0.4 meets the constraint while the smaller λ=0.2 does not"]
    log.append(entry(0.8, False, 0.02))  # clearly below 0.10 and 0.11 (intervals about ±0.025 and ±0.013)
    [_, drop] = monotonicity_breaches(log)
    assert drop.startswith("advbench: ASR at λ=0.8 (0.020") and "λ=0.6 (0.110" in drop
