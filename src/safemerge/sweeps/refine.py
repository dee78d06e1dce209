"""λ refined on the safety boundary: bisection between the largest passing λ and the next one tried."""

from __future__ import annotations

from safemerge.config import SweepConfig
from safemerge.merging import methods
from safemerge.sweeps import choose as choosing
from safemerge.sweeps.bisection import bisect_lambda, refinement_lambda
from safemerge.sweeps.trials import merge_trial


def bisect_groups(cfg: SweepConfig):
    """(method, seed) pairs to bisect; methods without λ are evaluated once."""
    for method in cfg.method_list:
        m = methods.get(method)
        if "lam" not in m.parameters:
            yield method, None, False
        else:
            for seed in ([None] if m.min_models > 1 else range(len(cfg.finetuned))):
                yield method, seed, True


def lambda_settings(cfg: SweepConfig) -> list[tuple[str, list[int | None]]]:
    """The methods with a λ axis and the seeds each is merged with."""
    return [(method, [None] if methods.get(method).min_models > 1 else list(range(len(cfg.finetuned))))
            for method in cfg.method_list if "lam" in methods.get(method).parameters]


def passes_by_lambda(records: list[dict], method: str, aligned: dict, allowance: float) -> dict[float, bool]:
    """For each λ tried with this method: whether every seed passes the safety test."""
    by_lam: dict[float, list[dict]] = {}
    for record in records:
        if record["kind"] == "merge" and record["method"] == method and record["lam"] is not None:
            by_lam.setdefault(record["lam"], []).append(record)
    return {lam: all(choosing.meets_constraint(r, aligned, allowance) for r in group) for lam, group in by_lam.items()}


def refine(cfg: SweepConfig, executor, keyed, records: list[dict], bar, search_log: list) -> list[dict]:
    """After the grid, bisect each λ method between its largest passing λ and the next λ tried, until the gap is
    within the tolerance. Each round runs every method's next λ (all seeds) in one executor call."""
    aligned, added = records[0], []
    while True:
        wanted = []
        for method, seeds in lambda_settings(cfg):
            lam = refinement_lambda(passes_by_lambda(records + added, method, aligned, cfg.max_asr_increase),
                                             cfg.tolerance)
            wanted += [] if lam is None else [merge_trial(cfg, method, lam, seed) for seed in seeds]
        if not wanted:
            return added
        new = executor.run(keyed(wanted), bar.advance)
        added += new
        search_log += [{"phase": "refine", "method": r["method"], "seed": r["seed"], "lam": r["lam"],
                        "meets": choosing.meets_constraint(r, aligned, cfg.max_asr_increase),
                        "asr_upper": choosing.upper_bounds(r, aligned, cfg.max_asr_increase), "trial": r["key"]}
                       for r in new]


def run_bisection(cfg, group, executor, keyed, aligned, bar, search_log, breaches) -> list[dict]:
    method, seed, has_lambda = group
    if not has_lambda:
        return executor.run(keyed([merge_trial(cfg, method, None, seed)]), bar.advance)
    evaluated = []

    def evaluate(lam: float) -> dict:
        record = executor.run(keyed([merge_trial(cfg, method, lam, seed)]), bar.advance)[0]
        evaluated.append(record)
        return record

    def meets(record: dict) -> bool:
        return choosing.meets_constraint(record, aligned, cfg.max_asr_increase)

    found = bisect_lambda(evaluate, meets, tolerance=cfg.tolerance)
    where = f"{method}" + ("" if seed is None else f" seed {seed}")
    by_key = {r["key"]: r for r in evaluated}
    search_log += [{"phase": "bisect", "method": method, "seed": seed, **entry,
                    "asr_upper": choosing.upper_bounds(by_key[entry["trial"]], aligned, cfg.max_asr_increase)}
                   for entry in found["log"]]
    breaches += [f"{where}: {b}" for b in found["breaches"]]
    return evaluated
