"""What a sweep would cost, before it runs: trials, generations, tokens, engines."""

from __future__ import annotations

import itertools
import math

from safemerge.config import SweepConfig
from safemerge.evaluation.judges import is_model_judge
from safemerge.sweeps.refine import bisect_groups, lambda_settings
from safemerge.sweeps.trials import Trial, baselines, grid_trials, merge_trial, sweep_plan


def dry_run(cfg: SweepConfig, tokens_per_second: float = 2500.0) -> dict:
    """What a sweep would do, from the sets and tasks alone (no model is loaded): trials,
    generations, judge calls, and an upper bound of the generated tokens with the GPU hours they
    take at an ASSUMED generation throughput (tokens/s per GPU; a guess to replace with a measured one)."""
    from safemerge.checkpoints.readers import open_source

    for spec in (cfg.aligned, *cfg.finetuned):
        open_source(spec, allow_pickle=cfg.evaluation.allow_pickle)  # headers only: the inputs exist and are readable
    plan = sweep_plan(cfg, "cpu" if cfg.evaluation.device == "cpu" else "cuda")  # a sweep that size runs on GPUs
    trials = estimated_trials(cfg)
    safety = sum(len(p.prompts) for p in plan.safety.values())
    tasks = {name: len(t.items) * int(t.generation.get("num_samples", 1)) for name, t in plan.tasks.items()}
    per_trial = safety + sum(tasks.values())
    judge_model = is_model_judge(plan.judge_spec)
    judge_calls = trials * safety if judge_model else 0
    generated = trials * per_trial * cfg.evaluation.max_new_tokens + judge_calls * 128
    engines = None
    if cfg.evaluation.backend == "vllm":
        from safemerge.sweeps.vllm import engine_plan

        engines = engine_plan(cfg, planned_trials(cfg))
    return {
        "trials": trials, "refinement_trials": len(refinement_estimate(cfg)) if cfg.refines else 0,
        "search": cfg.search, "methods": cfg.method_list, "lambdas": cfg.lambdas,
        "seeds": len(cfg.finetuned), "safety_prompts_per_trial": safety, "task_generations_per_trial": tasks,
        "generations": trials * per_trial, "judge": plan.judge_spec, "judge_calls": judge_calls,
        "max_generated_tokens": generated, "assumed_tokens_per_second": tokens_per_second,
        "gpu_hours_upper_bound": generated / tokens_per_second / 3600, "vllm": engines,
        "adaptive": adaptive_estimate(cfg, plan, planned_trials(cfg), trials * per_trial) if cfg.sequential else None,
    }


ADAPTIVE_ASSUMPTIONS = ("a merge exactly at the safety margin judges the expected number of selection prompts of the "
                        "group-sequential design there and passes with its probability there (at most alpha); one that "
                        "fails skips its other sets, report parts, XSTest and tasks. The bound for merges that all pass "
                        "runs those in full. Pruning is not counted: it depends on the results.")


def adaptive_estimate(cfg: SweepConfig, plan, trials: list[Trial], exhaustive: int) -> dict:
    """The adaptive sweep's expected generations under ADAPTIVE_ASSUMPTIONS, for merges at the margin and for
    merges that all pass (their selection parts still cost the expected number at the margin)."""
    from safemerge.evaluation import sequential
    from safemerge.evaluation.prompts import is_xstest
    from safemerge.sweeps.adaptive import design

    sizes = {name: len(p.prompts) for name, p in plan.safety.items()}
    per_trial = sum(sizes.values()) + sum(len(t.items) * int(t.generation.get("num_samples", 1))
                                          for t in plan.tasks.values())
    at_margin, if_passing, reach = 0.0, 0.0, 1.0  # reach: P(every earlier set passed)
    for name, n in sizes.items():
        if name.endswith("/selection") and not is_xstest(name):
            bounds = design(n, cfg.looks)
            passes, _ = sequential.decisions_at_margin(bounds)
            at_margin += reach * sequential.expected_size_at_margin(bounds)
            if_passing += sequential.expected_size_at_margin(bounds)
            reach *= sum(passes)
    rest = per_trial - sum(n for name, n in sizes.items() if name.endswith("/selection") and not is_xstest(name))
    merges = sum(t.kind == "merge" for t in trials)
    others = exhaustive - merges * per_trial
    margin_total = others + merges * (at_margin + reach * rest)
    passing_total = others + merges * (if_passing + rest)
    tokens = cfg.evaluation.max_new_tokens
    return {"looks": cfg.looks, "expected_generations_at_margin": round(margin_total),
            "expected_generations_if_all_pass": round(passing_total),
            "expected_max_tokens_at_margin": round(margin_total * tokens),
            "expected_max_tokens_if_all_pass": round(passing_total * tokens),
            "ratio_at_margin": margin_total / exhaustive if exhaustive else 1.0,
            "ratio_if_all_pass": passing_total / exhaustive if exhaustive else 1.0, "assumptions": ADAPTIVE_ASSUMPTIONS}


def estimated_trials(cfg: SweepConfig) -> int:
    return len(planned_trials(cfg))


def planned_trials(cfg: SweepConfig) -> list[Trial]:
    """The trials a sweep runs; for bisection an estimate (each search's evaluations at a stand-in λ)."""
    if cfg.search == "grid":
        return baselines(cfg) + grid_trials(cfg) + (refinement_estimate(cfg) if cfg.refines else [])
    steps = 1 + math.ceil(math.log2(1 / cfg.tolerance))
    searches = [[merge_trial(cfg, method, 0.5 if has_lambda else None, seed)] * (steps if has_lambda else 1)
                for method, seed, has_lambda in bisect_groups(cfg)]
    return baselines(cfg) + [t for search in searches for t in search]


def refinement_estimate(cfg: SweepConfig) -> list[Trial]:
    """Stand-ins for the refinement's trials: the bisection of the widest gap of the grid (0 and 1 included)."""
    points = [0.0, *cfg.lambdas, 1.0]
    widest = max(b - a for a, b in itertools.pairwise(points))
    steps = max(0, math.ceil(math.log2(widest / cfg.tolerance) - 1e-9))
    return [merge_trial(cfg, method, 0.5, seed) for method, seeds in lambda_settings(cfg) for seed in seeds] * steps
