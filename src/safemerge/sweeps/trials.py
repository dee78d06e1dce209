"""What a sweep evaluates: trials (aligned, fine-tuned, merges), the grid, and each trial's key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safemerge.config import DEFAULT_DENSITY, MergeConfig, SweepConfig
from safemerge.errors import ConfigError
from safemerge.evaluation.prompts import load_safety_set
from safemerge.evaluation.run import EvalPlan, limit_task, resolve_judge, task_options, unique_names
from safemerge.evaluation.tasks.base import Task
from safemerge.evaluation.tasks.registry import load_task
from safemerge.merging import methods

# Trial records of version 2 keep each harmful set's verdicts for the paired test; stored trials of an earlier
# version are evaluated again (their generations come from the cache)
RECORD_VERSION = 2


CFG_ALIGNED = "\0aligned"  # key of the aligned model in the fingerprint table (never a path)


@dataclass(frozen=True)
class Trial:
    kind: str  # "aligned", "finetuned" or "merge"
    method: str
    lam: float | None
    density: float | None
    seed: int | None  # index of the fine-tuned input; None when a trial uses all of them
    finetuned: tuple[str, ...]

    @property
    def label(self) -> str:
        if self.kind == "aligned":
            return "aligned"
        if self.kind == "finetuned":
            return f"fine-tuned (seed {self.seed})"
        lam = "" if self.lam is None else f" λ={self.lam:g}"
        seed = "" if self.seed is None else f" (seed {self.seed})"
        return f"{self.method}{lam}{seed}"

    @property
    def slug(self) -> str:
        """A directory name: linear-lam0.3-seed0, model_stock, aligned, finetuned-seed1."""
        parts = [self.kind if self.kind != "merge" else self.method]
        if self.kind == "merge" and self.lam is not None:
            parts.append(f"lam{self.lam:g}")
        if self.seed is not None:
            parts.append(f"seed{self.seed}")
        return "-".join(parts)

    def merge_config(self, cfg: SweepConfig, out: Path) -> MergeConfig:
        """The `safemerge merge` that makes this trial's model (baselines: linear at λ 0 or 1)."""
        return MergeConfig(aligned=cfg.aligned, finetuned=list(self.finetuned), out=out, method=self.method,
                           lam=self.lam, density=self.density,
                           seed=cfg.merge.seed, dtype=cfg.merge.dtype, allow_pickle=cfg.evaluation.allow_pickle)


def baselines(cfg: SweepConfig) -> list[Trial]:
    aligned = Trial("aligned", "linear", 0.0, None, None, (cfg.finetuned[0],))
    return [aligned] + [Trial("finetuned", "linear", 1.0, None, i, (f,)) for i, f in enumerate(cfg.finetuned)]


def merge_trial(cfg: SweepConfig, method: str, lam: float | None, seed: int | None) -> Trial:
    takes = methods.get(method).parameters
    density = (cfg.merge.density if cfg.merge.density is not None else DEFAULT_DENSITY) if "density" in takes else None
    finetuned = tuple(cfg.finetuned) if seed is None else (cfg.finetuned[seed],)
    return Trial("merge", method, round(lam, 6) if "lam" in takes else None, density, seed, finetuned)


def grid_trials(cfg: SweepConfig) -> list[Trial]:
    """Each method at each λ for each seed; a method that combines the seeds (model_stock) once."""
    trials = []
    for method in cfg.method_list:
        m = methods.get(method)
        seeds = [None] if m.min_models > 1 else range(len(cfg.finetuned))
        lambdas = cfg.lambdas if "lam" in m.parameters else [None]
        trials += [merge_trial(cfg, method, lam, seed) for lam in lambdas for seed in seeds]
    return trials


def sweep_plan(cfg: SweepConfig, device: str) -> EvalPlan:
    """Each safety set split into its selection and report parts; val and test tasks."""
    for spec in cfg.task_val + cfg.task_test:
        if spec.startswith("lm-eval:"):
            raise ConfigError(f"{spec}: lm-evaluation-harness tasks are not supported in sweeps yet; "
                              "use bbh:PATH[:TASK], gsm8k or file:PATH[:SCORER], or `safemerge evaluate` on the result")
    limit = cfg.evaluation.limit
    safety = {}
    for pset in unique_names(load_safety_set(s) for s in cfg.safety).values():
        pset = pset.limit(limit) if limit else pset
        for part in pset.split(cfg.selection_fraction, cfg.split_seed):
            safety[part.name] = part
    options = task_options(cfg.evaluation) | {"bertscore_device": device}
    tasks = {}
    for role, specs in (("val", cfg.task_val), ("test", cfg.task_test)):
        for name, task in unique_names(load_task(s, **options) for s in specs).items():
            tasks[f"{role}/{name}"] = limit_task(task, limit) if limit else task
    judge_spec = resolve_judge(cfg.evaluation.judge, device)
    from safemerge.evaluation.judges import make_judge

    judge = make_judge(judge_spec, lambda spec: None)  # check the spec before any model is loaded
    return EvalPlan(safety, tasks, [], judge_spec, getattr(judge, "decided_by", ()), getattr(judge, "labels_refusals", False))


def evaluation_identity(cfg: SweepConfig, plan: EvalPlan) -> dict:
    """Everything about the evaluation that changes a trial's results."""
    where = {"model", "out", "cache_dir", "force", "safety", "tasks", "gpu_memory_utilization",
             "judge_gpu_memory_utilization"}  # inputs are keyed apart; memory shares change no result
    settings = cfg.eval_config().model_dump(mode="json", exclude=where)
    return {
        "settings": settings,
        "safety": {name: pset.sha256 for name, pset in plan.safety.items()},
        "tasks": {name: task_digest(task) for name, task in plan.tasks.items()},
        "judge": plan.judge_spec,
        "merge": {"dtype": cfg.merge.dtype, "seed": cfg.merge.seed},
        # an adaptive merge's record depends on the test that stopped it (trial_key: merges only)
        "sequential": {"looks": cfg.looks, "margin": cfg.max_asr_increase, "order_seed": cfg.split_seed}
        if cfg.sequential else None,
        "record": RECORD_VERSION,
    }


def task_digest(task: Task) -> str:
    items = [[it.id, it.prompt, it.reference] for it in task.items]
    return hashlib.sha256(json.dumps([task.scorer.name, task.generation, items]).encode()).hexdigest()


def trial_key(trial: Trial, fingerprints: dict[str, str], identity: dict) -> str:
    if trial.kind != "merge":  # baselines are evaluated in full, whatever the test
        identity = {k: v for k, v in identity.items() if k != "sequential"}
    payload = {"trial": {k: v for k, v in asdict(trial).items() if k != "finetuned"},
               "aligned": fingerprints[CFG_ALIGNED], "finetuned": [fingerprints[f] for f in trial.finetuned],
               "evaluation": identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:40]


def trial_of(record: dict) -> Trial:
    return Trial(record["kind"], record["method"], record["lam"], record["density"], record["seed"],
                 tuple(record["finetuned"]))
