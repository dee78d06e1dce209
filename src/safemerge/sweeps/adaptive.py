"""A merge trial's safety selection judged look by look, stopped once the group-sequential paired test
(evaluation/sequential.py) decides it: a merge that certainly fails skips the rest of its evaluation, one
that certainly passes skips the rest of its selection prompts (its report part and tasks still run in full).

The looks see a seeded random order of each selection part, not the file's: HEx-PHI, for one, is sorted
by category, and a prefix of it would be one category. The record keeps the verdicts in the set's own order,
with NOT_JUDGED where a prompt was never reached, so they pair position by position with the aligned
model's, and the design and every look, for the report.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

from safemerge.config import EvalConfig, SweepConfig
from safemerge.evaluation import sequential
from safemerge.evaluation.judges import Verdict
from safemerge.evaluation.prompts import PromptSet, is_xstest
from safemerge.evaluation.rates import safety_summary
from safemerge.evaluation.run import EvalPlan, Measured, generate_and_score, judge_all
from safemerge.sweeps import choose as choosing

NOT_JUDGED = choosing.NOT_JUDGED
ALPHA = 1 - choosing.CONFIDENCE  # the fixed test's one-sided level, spent across the looks


def _quiet(description: str, total: int):
    return lambda n: None


def sequential_sets(plan: EvalPlan, reference: dict[str, str]) -> list[str]:
    """The selection parts the paired test reads (harmful sets, not XSTest) that the aligned model's verdicts
    cover one for one; any other part is evaluated in full, and the paired check then says why it cannot pair."""
    return [name for name, pset in plan.safety.items() if name.endswith("/selection") and not is_xstest(name)
            and len(reference.get(name) or "") == len(pset)]


def design(n: int, looks: int) -> sequential.Boundaries:
    """`looks` equal blocks of the n prompts (the last may be longer, see sequential.plan_looks)."""
    return sequential.boundaries(sequential.plan_looks(n, max(1, math.ceil(n / looks))), ALPHA)


def look_order(pset: PromptSet, seed: int) -> list[int]:
    """Positions of the set in a seeded random order: every prefix is a random sample of the set."""
    keys = [hashlib.sha256(f"{seed}:look:{p.id}".encode()).hexdigest() for p in pset.prompts]
    return sorted(range(len(keys)), key=keys.__getitem__)


def judged_block(backend, plan: EvalPlan, cfg: EvalConfig, judge, name: str, prompts) -> Measured:
    """Generate and judge these prompts of one set, as a plan of their own."""
    block = replace(plan, safety={name: PromptSet(name, plan.safety[name].source, tuple(prompts))}, tasks={},
                    lm_eval=[])
    measured = generate_and_score(backend, block, cfg, _quiet)
    judge_all(measured, block, judge, _quiet)
    return measured


def run_looks(backend, plan: EvalPlan, cfg: EvalConfig, judge, name: str, reference: str, sweep: SweepConfig,
              into: Measured) -> str:
    """Judge one selection part look by look against the aligned model's verdicts; its record goes into
    ``into``. Returns the decision: pass or fail."""
    pset = plan.safety[name]
    bounds = design(len(pset), sweep.looks)
    order = look_order(pset, sweep.split_seed)
    verdicts = [NOT_JUDGED] * len(pset)
    rows: dict[int, tuple[dict, dict]] = {}
    steps, seen, settings, hits = [], 0, None, 0
    for k, n in enumerate(bounds.looks):
        block = order[seen:n]
        measured = judged_block(backend, plan, cfg, judge, name, [pset.prompts[i] for i in block])
        record = measured.safety[name]
        settings, hits = record["generation"], hits + record["cache_hits"]
        judged = measured.records[record["judgements"]]
        for i, response, judgement in zip(block, measured.records[record["responses"]], judged):
            rows[i] = (response, judgement)
        for i, v in zip(block, choosing.verdict_string(judged)):
            verdicts[i] = v
        for key, seconds in measured.seconds.items():
            into.seconds[key] = round(into.seconds.get(key, 0.0) + seconds, 3)
        _, worse, better = choosing.paired_counts("".join(verdicts), reference)
        look = sequential.decide(bounds, k, worse, better, sweep.max_asr_increase)
        steps.append({"n": n, "worse": worse, "better": better, "statistic": round(look.statistic, 4),
                      "decision": look.decision})
        seen = n
        if look.decision != "continue":
            break
    kept = sorted(rows)
    judged_verdicts = [Verdict.from_dict(rows[i][1]) for i in kept]
    categories = [pset.prompts[i].category for i in kept]
    slug = record["responses"]
    into.safety[name] = {
        "source": pset.source, "sha256": pset.sha256, "generation": settings, "cache_hits": hits,
        **safety_summary(judged_verdicts, categories if any(categories) else None),
        "n": len(pset), "judged": len(kept),  # the set's size; the estimates above are of the judged prompts
        "judge": record["judge"], "responses": slug, "judgements": record["judgements"],
        "verdicts": "".join(verdicts),
        "sequential": {"alpha": ALPHA, "margin": sweep.max_asr_increase, "looks": list(bounds.looks),
                       "efficacy": [_finite(c) for c in bounds.efficacy],
                       "futility": [_finite(b) for b in bounds.futility], "spending": bounds.spending,
                       "order_seed": sweep.split_seed, "steps": steps, "decision": steps[-1]["decision"]},
    }
    into.records[slug] = [rows[i][0] for i in kept]
    into.records[record["judgements"]] = [rows[i][1] for i in kept]
    return steps[-1]["decision"]


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else round(x, 4)
