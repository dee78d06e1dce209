"""Bisection over λ on the safety boundary, and the checks that ASR does rise with λ."""

from __future__ import annotations

from collections.abc import Callable

from safemerge.evaluation.stats import format_estimate
from safemerge.sweeps.choose import asr_sets, selection_asr, value_of


def bisect_lambda(evaluate: Callable[[float], dict], meets: Callable[[dict], bool], *,
                  tolerance: float = 0.05) -> dict:
    """The largest λ in [0, 1] whose trial meets the constraint, assuming ASR grows with λ.

    λ = 0 is the aligned model and meets by definition, so it is never evaluated; λ = 1 is tried first. Each
    evaluated λ is logged, and any sign that ASR does not grow with λ is returned in ``breaches``."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must lie in (0, 1), not {tolerance!r}")
    log: list[dict] = []

    def probe(lam: float) -> bool:
        trial = evaluate(lam)
        ok = bool(meets(trial))
        log.append({"lam": lam, "meets": ok, "asr": {name: selection_asr(trial, name) for name in asr_sets(trial)},
                    "trial": trial["key"]})
        return ok

    lo, hi, answer_trial = 0.0, 1.0, None
    if probe(1.0):
        lo, answer_trial = 1.0, log[-1]["trial"]
    while hi - lo > tolerance:
        mid = round((lo + hi) / 2, 6)  # clean keys and labels
        if not lo < mid < hi:  # the rounding has run out of room
            break
        if probe(mid):
            lo, answer_trial = mid, log[-1]["trial"]
        else:
            hi = mid
    if lo == 0.0:
        summary = (f"no λ in (0, 1] met the constraint (smallest tried {min(e['lam'] for e in log):g}); "
                   "no merge qualifies, the aligned model (λ = 0) is the answer")
    else:
        summary = f"largest λ meeting the constraint: {lo:g} (to within {tolerance:g}; {len(log)} evaluations)"
    return {"lam": lo or None, "trial": answer_trial, "log": log, "evaluations": len(log),
            "breaches": monotonicity_breaches(log), "summary": summary}


def half_width(estimate: dict) -> float:
    return (estimate["high"] - estimate["low"]) / 2


def monotonicity_breaches(log: list[dict]) -> list[str]:
    """Where the evaluated λ contradict "ASR grows with λ": a λ that meets above one that failed, or a set's ASR
    clearly lower (by more than the two intervals' half-widths together) at a larger λ. Works for grid logs too."""
    entries = sorted(log, key=lambda e: e["lam"])
    breaches = []
    for i, later in enumerate(entries):
        failed = [e for e in entries[:i] if not e["meets"] and e["lam"] < later["lam"]]
        if later["meets"] and failed:
            breaches.append(f"λ={later['lam']:g} meets the constraint while the smaller λ={failed[0]['lam']:g} "
                            "does not")
        for name, estimate in later["asr"].items():
            drop = clearest_drop(name, estimate, [e for e in entries[:i] if e["lam"] < later["lam"]])
            if drop is not None:
                earlier = drop["asr"][name]
                breaches.append(f"{name}: ASR at λ={later['lam']:g} ({format_estimate(estimate)}) is clearly below that at "
                                f"λ={drop['lam']:g} ({format_estimate(earlier)}), though ASR is assumed to grow with λ")
    return breaches


def clearest_drop(name: str, estimate: dict | None, smaller: list[dict]) -> dict | None:
    """The smaller-λ entry whose ASR on this set most clearly exceeds this one, if any clearly does."""
    if value_of(estimate) is None:
        return None
    best, best_gap = None, 0.0
    for entry_ in smaller:
        earlier = entry_["asr"].get(name)
        if value_of(earlier) is None:
            continue
        gap = value_of(earlier) - value_of(estimate) - half_width(earlier) - half_width(estimate)
        if gap > best_gap:
            best, best_gap = entry_, gap
    return best


def refinement_lambda(passes_at: dict[float, bool], tolerance: float) -> float | None:
    """The next λ to try on a method's constraint boundary, or None when it is found to within ``tolerance``.

    ``passes_at`` maps each λ tried so far to whether the setting passed (every seed). The boundary lies between
    the largest passing λ (0, the aligned model, when none passes) and the next λ tried above it (1 when there is
    none); the answer is their midpoint."""
    low = max((lam for lam, ok in passes_at.items() if ok), default=0.0)
    high = min((lam for lam in passes_at if lam > low), default=1.0)
    if high - low <= tolerance + 1e-9:  # 0.4 - 0.35 is a hair above 0.05
        return None
    mid = round((low + high) / 2, 6)  # clean keys and labels
    return mid if low < mid < high else None


def grid_answer(trials_by_lam: dict[float, dict], meets: Callable[[dict], bool]) -> float | None:
    """The largest grid λ above 0 whose trial meets the constraint (None when none does), to compare with
    ``bisect_lambda``; unlike the bisection it assumes nothing about monotonicity."""
    passing = [lam for lam, trial in trials_by_lam.items() if lam > 0 and meets(trial)]
    return max(passing) if passing else None
