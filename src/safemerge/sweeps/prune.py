"""The adaptive grid: λ values in ascending waves, so that a λ failing the safety test prunes the larger
λ of its method, which the constrained policy could not choose anyway while ASR rises with λ.

A wave holds the next λ of every method still open, all seeds, in one executor call (parallel workers
stay busy). A method is closed at the first λ where some seed fails the test: the choice needs every seed
to pass. Methods without λ run in the first wave. The pruned trials are listed with the reason, and
`--exhaustive` runs the full grid instead (the way to check the monotonicity this relies on).
"""

from __future__ import annotations

from safemerge.config import SweepConfig
from safemerge.sweeps import choose as choosing
from safemerge.sweeps.refine import bisect_groups, lambda_settings
from safemerge.sweeps.trials import merge_trial


def prunes(cfg: SweepConfig) -> bool:
    """Pruning needs the safety test to decide: the adaptive grid under the constrained policy."""
    return cfg.adaptive and cfg.search == "grid" and cfg.policy == "constrained"


def pruned_grid(cfg: SweepConfig, executor, keyed, aligned: dict, bar) -> tuple[list[dict], list[dict]]:
    """Run the grid wave by wave; the records of the trials run and the list of those pruned, with why."""
    lambdas = sorted(cfg.lambdas)
    open_methods = dict(lambda_settings(cfg))  # method -> seeds
    records = executor.run(keyed([merge_trial(cfg, m, None, s) for m, s, has_lambda in bisect_groups(cfg)
                                  if not has_lambda]), bar.advance)
    pruned = []
    for i, lam in enumerate(lambdas):
        wave = [merge_trial(cfg, m, lam, s) for m, seeds in open_methods.items() for s in seeds]
        if not wave:
            break
        new = executor.run(keyed(wave), bar.advance)
        records += new
        for method in {r["method"] for r in new if not choosing.meets_constraint(r, aligned, cfg.max_asr_increase)}:
            seeds = open_methods.pop(method)
            reason = f"{method} fails the safety test at λ = {lam:g}, and ASR rises with λ (--exhaustive runs them)"
            pruned += [{"method": method, "lam": larger, "seed": s, "reason": reason}
                       for larger in lambdas[i + 1:] for s in seeds]
    return records, pruned
