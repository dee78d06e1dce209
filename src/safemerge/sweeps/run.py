"""`safemerge sweep`: merge by every method and λ, evaluate each merge, choose one, write it.

A *trial* is one model to evaluate: the aligned model (λ = 0), a fine-tuned model (λ = 1) or a
merge. Trials are self-contained and serialisable (a Trial plus the SweepConfig), so an executor
can run them anywhere; the local executor runs them one after the other in this process, with
the aligned model loaded once and each trial's weights set in place by the merge stream that
`safemerge merge` runs (or, with vLLM, on engines: see vllm_sweep.py). A finished trial is stored atomically under RUN/trials/<key>/, keyed by
the inputs' content fingerprints, the method, its parameters and the evaluation settings: a
sweep stopped at any point and started again redoes no finished trial.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from safemerge.backends.generation import TransformersBackend
from safemerge.config import MergeConfig, SweepConfig
from safemerge.errors import ConfigError
from safemerge.evaluation.prompts import load_safety_set
from safemerge.evaluation.run import (
    EvalPlan,
    Measured,
    build_judge,
    generate_and_score,
    generation_cache,
    generation_jobs,
    jsonable,
    judge_all,
    release,
    resolve_judge,
    unique_names,
    write_outputs,
)
from safemerge.evaluation.tasks.base import Task
from safemerge.evaluation.tasks.registry import load_task
from safemerge.merging.inplace import LiveMerger
from safemerge.sweeps import choose as choosing

# Trial records of version 2 keep each harmful set's verdicts for the paired test; stored trials of an earlier
# version are evaluated again (their generations come from the cache)
RECORD_VERSION = 2
CFG_ALIGNED = "\0aligned"  # key of the aligned model in the fingerprint table (never a path)


# --- trials --------------------------------------------------------------------------------


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
                           seed=cfg.merge_seed, dtype=cfg.merge_dtype, allow_pickle=cfg.allow_pickle)


def baselines(cfg: SweepConfig) -> list[Trial]:
    aligned = Trial("aligned", "linear", 0.0, None, None, (cfg.finetuned[0],))
    return [aligned] + [Trial("finetuned", "linear", 1.0, None, i, (f,)) for i, f in enumerate(cfg.finetuned)]


def merge_trial(cfg: SweepConfig, method: str, lam: float | None, seed: int | None) -> Trial:
    from safemerge.merging.methods import METHODS

    takes = METHODS[method].parameters
    density = (cfg.density if cfg.density is not None else 0.5) if "density" in takes else None
    finetuned = tuple(cfg.finetuned) if seed is None else (cfg.finetuned[seed],)
    return Trial("merge", method, round(lam, 6) if "lam" in takes else None, density, seed, finetuned)


def grid_trials(cfg: SweepConfig) -> list[Trial]:
    """Each method at each λ for each seed; a method that combines the seeds (model_stock) once."""
    from safemerge.merging.methods import METHODS

    trials = []
    for method in cfg.method_list:
        m = METHODS[method]
        seeds = [None] if m.min_models > 1 else range(len(cfg.finetuned))
        lambdas = cfg.lambdas if "lam" in m.parameters else [None]
        trials += [merge_trial(cfg, method, lam, seed) for lam in lambdas for seed in seeds]
    return trials


# --- what every trial evaluates ------------------------------------------------------------


def sweep_plan(cfg: SweepConfig, device: str) -> EvalPlan:
    """Each safety set split into its selection and report parts; val and test tasks."""
    for spec in cfg.task_val + cfg.task_test:
        if spec.startswith("lm-eval:"):
            raise ConfigError(f"{spec}: lm-evaluation-harness tasks are not supported in sweeps yet; "
                              "use bbh:PATH[:TASK], gsm8k or file:PATH[:SCORER], or `safemerge evaluate` on the result")
    safety = {}
    for pset in unique_names(load_safety_set(s) for s in cfg.safety).values():
        pset = pset.limit(cfg.limit) if cfg.limit else pset
        for part in pset.split(cfg.selection_fraction, cfg.split_seed):
            safety[part.name] = part
    eval_cfg = cfg.eval_config()
    options = {"samples": cfg.samples, "temperature": cfg.temperature, "ks": tuple(cfg.pass_k),
               "allow_code_execution": cfg.allow_code_execution, "bertscore_model": cfg.bertscore_model,
               "bertscore_layer": cfg.bertscore_layer, "bertscore_device": device}
    tasks = {}
    for role, specs in (("val", cfg.task_val), ("test", cfg.task_test)):
        for name, task in unique_names(load_task(s, **options) for s in specs).items():
            tasks[f"{role}/{name}"] = replace(task, items=task.items[:cfg.limit]) if cfg.limit else task
    judge_spec = resolve_judge(eval_cfg.judge, device)
    from safemerge.evaluation.judges import make_judge

    make_judge(judge_spec, lambda spec: None)  # check the spec before any model is loaded
    return EvalPlan(safety, tasks, [], judge_spec)


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
        "merge": {"dtype": cfg.merge_dtype, "seed": cfg.merge_seed},
        "record": RECORD_VERSION,
    }


def task_digest(task: Task) -> str:
    items = [[it.id, it.prompt, it.reference] for it in task.items]
    return hashlib.sha256(json.dumps([task.scorer.name, task.generation, items]).encode()).hexdigest()


def trial_key(trial: Trial, fingerprints: dict[str, str], identity: dict) -> str:
    payload = {"trial": {k: v for k, v in asdict(trial).items() if k != "finetuned"},
               "aligned": fingerprints[CFG_ALIGNED], "finetuned": [fingerprints[f] for f in trial.finetuned],
               "evaluation": identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:40]


# --- running trials ------------------------------------------------------------------------


class LiveTrialModels:
    """The transformers path: the aligned model in memory, each trial's weights set in place by the
    merge stream that `safemerge merge` runs (bit for bit its output, same content fingerprint)."""

    def __init__(self, cfg: SweepConfig, device: str):
        from safemerge.backends.models import load_model

        self.cfg = cfg
        self.live = load_model(cfg.aligned, device=device, dtype=cfg.dtype, chat_template=cfg.chat_template,
                               allow_pickle=cfg.allow_pickle)
        self.merger = LiveMerger(self.live.model)

    def order(self, trials: list[Trial]) -> list[Trial]:
        return trials

    def prefetch(self, trials, jobs, cache) -> int:
        """Nothing to share: one model is in memory at a time."""
        return 0

    def backend(self, trial: Trial) -> tuple[TransformersBackend, str]:
        fingerprint = self.merger.merge(trial.merge_config(self.cfg, self.cfg.out / "merged"))
        return TransformersBackend(self.live.model, self.live.tokenizer, model_id=fingerprint,
                                   batch_size=self.cfg.batch_size), fingerprint

    def close(self) -> None:
        self.live = self.merger = None


class TrialRunner:
    """What one process needs to run trials, loaded once: the trial models' source (the aligned
    model in memory, or vLLM engines), the evaluation plan and the judge."""

    def __init__(self, cfg: SweepConfig, status: Callable[[str], None] = lambda text: None, judge=None):
        """``judge``: a judge held elsewhere (a shared Ray actor); by default one is built here."""
        from safemerge.backends.models import pick_device

        self.cfg = cfg
        self.eval_cfg = cfg.eval_config()
        self.device = pick_device(cfg.device)
        self.plan = sweep_plan(cfg, self.device)
        if cfg.backend == "vllm":
            from safemerge.sweeps.vllm import VllmTrialModels

            self.models = VllmTrialModels(cfg)
        else:
            self.models = LiveTrialModels(cfg, self.device)
        self.judge = judge
        self.status = status

    def prepare(self, items: list[tuple[Trial, str]], log: Callable[[str], None]) -> list[tuple[Trial, str]]:
        """The order to run these trials in; the generations they can share are made now."""
        order = {trial: k for k, trial in enumerate(self.models.order([t for t, _ in items]))}
        items = sorted(items, key=lambda item: order[item[0]])
        self.status(f"generating for {len(items)} trials")
        started = time.perf_counter()
        shared = self.models.prefetch([t for t, _ in items], generation_jobs(self.plan, self.eval_cfg),
                                      lambda backend: generation_cache(backend, self.eval_cfg))
        if shared:
            log(f"generated for {shared} trials in shared engine calls in {time.perf_counter() - started:.1f}s")
        return items

    def run(self, trial: Trial) -> tuple[dict, Measured]:
        started = time.perf_counter()
        self.status(f"{trial.label}: merging")
        backend, fingerprint = self.models.backend(trial)
        merged = time.perf_counter()
        self.status(f"{trial.label}: generating")
        measured = generate_and_score(backend, self.plan, self.eval_cfg, lambda description, total: lambda n: None)
        generated = time.perf_counter()
        if self.judge is None:
            self.judge = build_judge(self.plan.judge_spec, self.eval_cfg, self.device)
        self.status(f"{trial.label}: judging")
        judge_all(measured, self.plan, self.judge, lambda description, total: lambda n: None)
        seconds = {"merge": merged - started, "generate": generated - merged,
                   "judge": sum(v for k, v in measured.seconds.items() if k.startswith("judge/")),
                   "score": sum(v for k, v in measured.seconds.items() if k.startswith("score/")),
                   "total": time.perf_counter() - started}
        seconds["generate"] -= seconds["score"]  # scoring happens inside generate_and_score
        generated_by = f"{backend.name} {backend.precision}"
        return trial_record(trial, fingerprint, generated_by, measured, seconds), measured

    def close(self) -> None:
        """Free the models (engines are shut down), and the judge's."""
        self.models.close()
        judge_backend = getattr(self.judge, "backend", None)
        if judge_backend is not None:
            release(getattr(judge_backend, "backend", judge_backend))  # inside its cache
        self.judge = None


def trial_record(trial: Trial, fingerprint: str, generated_by: str, measured: Measured, seconds: dict) -> dict:
    safety: dict[str, dict] = {}
    for name, record in measured.safety.items():
        base, part = name.rsplit("/", 1)
        kept = {k: v for k, v in record.items() if k not in ("generation", "source", "responses", "judgements")}
        if not base.startswith("xstest"):  # the paired safety test compares verdicts prompt by prompt
            kept["verdicts"] = choosing.verdict_string(measured.records[record["judgements"]])
        safety.setdefault(base, {})[part] = kept
    tasks: dict[str, dict] = {"val": {}, "test": {}}
    for name, record in measured.tasks.items():
        role, task = name.split("/", 1)
        tasks[role][task] = {"primary": record["primary"], "metrics": record["metrics"], "n": record["n"]}
    record = {"kind": trial.kind, "method": trial.method, "lam": trial.lam, "density": trial.density, "seed": trial.seed,
              "finetuned": list(trial.finetuned), "label": trial.label, "fingerprint": fingerprint,
              "generated_by": generated_by, "safety": safety, "tasks": tasks, "val_score": mean_primary(tasks["val"]),
              "test_score": mean_primary(tasks["test"]), "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    return jsonable(record)


def mean_primary(tasks: dict[str, dict]) -> float | None:
    values = [t["metrics"][t["primary"]].value for t in tasks.values()]
    if not values or any(v is None or math.isnan(v) for v in values):
        return None
    return math.fsum(values) / len(values)


class TrialStore:
    """RUN/trials/<key>/: trial.json plus the trial's responses and judgements, each trial
    directory published atomically, so a kill never leaves half a trial behind."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, key: str) -> dict | None:
        path = self.root / key / "trial.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, record: dict, measured: Measured) -> None:
        from safemerge.checkpoints.writer import atomic_directory

        with atomic_directory(self.root / key, force=True) as tmp:
            write_outputs(tmp, record, measured.records, name="trial.json")


class Executor(Protocol):
    """Runs trials (each a Trial and its key: self-contained, serialisable) and returns their
    records in order, reusing stored ones; ``on_done`` sees each record as it is ready."""

    def run(self, items: Iterable[tuple[Trial, str]], on_done: Callable[[dict], None]) -> list[dict]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs trials one after the other in this process; the runner is built at the first trial
    that is not already stored."""

    def __init__(self, cfg: SweepConfig, store: TrialStore, log: Callable[[str], None], status=lambda text: None):
        self.cfg, self.store, self.log, self.status = cfg, store, log, status
        self.runner: TrialRunner | None = None

    def run(self, items: Iterable[tuple[Trial, str]], on_done: Callable[[dict], None] = lambda r: None) -> list[dict]:
        items = list(items)
        records: dict[str, dict] = {}
        for trial, key in items:
            record = self.store.get(key)
            if record is not None and key not in records:
                records[key] = record
                self.log(f"reused {key} {trial.label}")
                on_done(record)
        pending = list({key: (trial, key) for trial, key in items if key not in records}.values())
        if pending:
            self.runner = self.runner or TrialRunner(self.cfg, self.status)
            for trial, key in self.runner.prepare(pending, self.log):
                record, measured = self.runner.run(trial)
                records[key] = record = {"key": key, **record}
                self.store.put(key, record, measured)
                self.log(f"evaluated {key} {trial.label} in {record['seconds']['total']:.1f}s")
                on_done(record)
        return [records[key] for _, key in items]

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner = None


# --- the sweep -----------------------------------------------------------------------------


@dataclass
class SweepResult:
    out: Path
    results: dict


def sweep(cfg: SweepConfig, *, progress: bool = True, invoked_as: str | None = None) -> SweepResult:
    from safemerge.backends.models import pick_device
    from safemerge.checkpoints.readers import open_source

    check_run_directory(cfg.out)
    if cfg.backend == "vllm":
        from safemerge.backends.vllm import require_vllm

        require_vllm()  # one line now, not after the inputs are fingerprinted
    device = pick_device(cfg.device)
    plan = sweep_plan(cfg, device)  # every input file checked before anything runs
    if cfg.judge == "auto":  # decided here, once: workers on other devices judge alike
        cfg = cfg.model_copy(update={"judge": plan.judge_spec})
    fingerprints = {CFG_ALIGNED: open_source(cfg.aligned, allow_pickle=cfg.allow_pickle).fingerprint()}
    for f in cfg.finetuned:
        fingerprints[f] = open_source(f, allow_pickle=cfg.allow_pickle).fingerprint()
    identity = evaluation_identity(cfg, plan)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    store = TrialStore(out / "trials")

    def keyed(trials: list[Trial]) -> list[tuple[Trial, str]]:
        return [(t, trial_key(t, fingerprints, identity)) for t in trials]

    with sweep_progress(progress, estimated_trials(cfg)) as bar, open(out / "sweep.log", "a") as log_file:
        def log(line: str) -> None:
            log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
            log_file.flush()

        search_log, breaches = [], []
        with closing(make_executor(cfg, store, log, bar.status)) as executor:
            if cfg.search == "grid":  # one call, so that parallel workers never wait for the baselines
                records = executor.run(keyed(baselines(cfg) + grid_trials(cfg)), bar.advance)
                if cfg.refines:
                    records += refine(cfg, executor, keyed, records, bar, search_log)
            else:
                records = executor.run(keyed(baselines(cfg)), bar.advance)
                for method_trials in bisect_groups(cfg):
                    records += run_bisection(cfg, method_trials, executor, keyed, records[0], bar, search_log,
                                             breaches)
    shutil.rmtree(out / "scratch", ignore_errors=True)  # vLLM workers' merges and scaled adapters, killed ones' too
    results = assemble(cfg, records, search_log, breaches, invoked_as)
    finish(cfg, results, progress)
    return SweepResult(out, results)


def make_executor(cfg: SweepConfig, store: TrialStore, log, status) -> Executor:
    if cfg.executor == "ray":
        from safemerge.sweeps.ray import RayExecutor

        return RayExecutor(cfg, store, log, status, address=cfg.address, num_workers=cfg.num_workers,
                           gpus_per_trial=cfg.gpus_per_trial, cpus_per_trial=cfg.cpus_per_trial)
    return LocalExecutor(cfg, store, log, status)


def check_run_directory(out: Path) -> None:
    """A new directory, or one a sweep wrote (to resume or extend it); never someone's model."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "sweep.json").exists())):
        raise ConfigError(f"{out} exists and is not a sweep's run directory; choose another --out")


def bisect_groups(cfg: SweepConfig):
    """(method, seed) pairs to bisect; methods without λ are evaluated once."""
    from safemerge.merging.methods import METHODS

    for method in cfg.method_list:
        m = METHODS[method]
        if "lam" not in m.parameters:
            yield method, None, False
        else:
            for seed in ([None] if m.min_models > 1 else range(len(cfg.finetuned))):
                yield method, seed, True


def lambda_settings(cfg: SweepConfig) -> list[tuple[str, list[int | None]]]:
    """The methods with a λ axis and the seeds each is merged with."""
    from safemerge.merging.methods import METHODS

    return [(method, [None] if METHODS[method].min_models > 1 else list(range(len(cfg.finetuned))))
            for method in cfg.method_list if "lam" in METHODS[method].parameters]


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
            lam = choosing.refinement_lambda(passes_by_lambda(records + added, method, aligned, cfg.max_asr_increase),
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

    found = choosing.bisect_lambda(evaluate, meets, tolerance=cfg.tolerance)
    where = f"{method}" + ("" if seed is None else f" seed {seed}")
    by_key = {r["key"]: r for r in evaluated}
    search_log += [{"phase": "bisect", "method": method, "seed": seed, **entry,
                    "asr_upper": choosing.upper_bounds(by_key[entry["trial"]], aligned, cfg.max_asr_increase)}
                   for entry in found["log"]]
    breaches += [f"{where}: {b}" for b in found["breaches"]]
    return evaluated


def assemble(cfg: SweepConfig, records: list[dict], search_log: list, breaches: list, invoked_as) -> dict:
    from safemerge.merging.card import command_line, version

    unique = list({r["key"]: r for r in records}.values())
    choice = choosing.choose(unique, policy=cfg.policy, max_asr_increase=cfg.max_asr_increase)
    chosen = next(r for r in unique if r["key"] == choice["chosen"]["trial"])
    reproduce = None
    if choice["chosen"]["kind"] == "merge":
        reproduce = command_line(trial_of(chosen).merge_config(cfg, cfg.out / "merged"))
    return {
        "safemerge_version": version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": invoked_as,
        "config": cfg.model_dump(mode="json"),
        "trials": unique,
        "search_log": search_log,
        "monotonicity_breaches": breaches,
        "choice": choice,
        "reproduce": reproduce,
        "merged": None,
    }


def trial_of(record: dict) -> Trial:
    return Trial(record["kind"], record["method"], record["lam"], record["density"], record["seed"],
                 tuple(record["finetuned"]))


def finish(cfg: SweepConfig, results: dict, progress: bool) -> None:
    """Write the chosen model(s), results.json and the report."""
    from safemerge.merging.stream import run as run_merge
    from safemerge.report.document import write_report

    choice = results["choice"]
    records = {r["key"]: r for r in results["trials"]}
    keep = []
    if cfg.keep == "chosen" and choice["chosen"]["kind"] == "merge":
        keep = [(records[choice["chosen"]["trial"]], cfg.out / "merged")]
    elif cfg.keep == "all":
        keep = [(r, cfg.out / "models" / trial_of(r).slug) for r in results["trials"] if r["kind"] == "merge"]
    for record, where in keep:
        note = (f"Chosen by `safemerge sweep`: {choice['reason']} See the sweep's report: "
                f"[report.md]({Path('..') / 'report.md' if where.parent == cfg.out else Path('../..') / 'report.md'}).")
        merge_cfg = trial_of(record).merge_config(cfg, where).model_copy(update={"force": True})
        run_merge(merge_cfg, progress=progress, note=note)
    if cfg.keep == "chosen" and keep:
        results["merged"] = "merged"
    write_json(cfg.out / "results.json", results)
    write_report(cfg.out, results)


def write_json(path: Path, data: dict) -> None:
    from safemerge.checkpoints.writer import write_file

    tmp = path.with_name(f".{path.name}.tmp")
    write_file(tmp, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)


def rebuild_report(run_dir: Path) -> dict:
    """`safemerge report RUN`: results.json and the report again from the stored trials."""
    config = run_dir / "sweep.json"
    if not config.exists():
        raise ConfigError(f"{run_dir} holds no sweep.json; give the directory a `safemerge sweep` wrote")
    cfg = SweepConfig(**json.loads(config.read_text()))
    previous = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    wanted = [r["key"] for r in previous.get("trials", [])] or sorted(p.name for p in (run_dir / "trials").iterdir())
    store = TrialStore(run_dir / "trials")
    records = [r for r in map(store.get, wanted) if r is not None]
    if not records:
        raise ConfigError(f"{run_dir} holds no finished trials yet")
    results = assemble(cfg, records, previous.get("search_log", []), previous.get("monotonicity_breaches", []),
                       previous.get("command"))
    results["merged"] = previous.get("merged")
    write_json(run_dir / "results.json", results)
    from safemerge.report.document import write_report

    write_report(run_dir, results)
    return results


# --- the plan, without running it --------------------------------------------------------------


def dry_run(cfg: SweepConfig, tokens_per_second: float = 2500.0) -> dict:
    """What a sweep would do, from the sets and tasks alone (no model is loaded): trials,
    generations, judge calls, and an upper bound of the generated tokens with the GPU hours they
    take at an ASSUMED generation throughput (tokens/s per GPU; a guess to replace with a measured one)."""
    from safemerge.checkpoints.readers import open_source

    for spec in (cfg.aligned, *cfg.finetuned):
        open_source(spec, allow_pickle=cfg.allow_pickle)  # headers only: the inputs exist and are readable
    plan = sweep_plan(cfg, "cpu" if cfg.device == "cpu" else "cuda")  # a sweep that size runs on GPUs
    trials = estimated_trials(cfg)
    safety = sum(len(p.prompts) for p in plan.safety.values())
    tasks = {name: len(t.items) * int(t.generation.get("num_samples", 1)) for name, t in plan.tasks.items()}
    per_trial = safety + sum(tasks.values())
    judge_model = not plan.judge_spec.startswith(("keyword", "compliance"))
    judge_calls = trials * safety if judge_model else 0
    generated = trials * per_trial * cfg.max_new_tokens + judge_calls * 128
    engines = None
    if cfg.backend == "vllm":
        from safemerge.sweeps.vllm import engine_plan

        engines = engine_plan(cfg, planned_trials(cfg))
    return {
        "trials": trials, "refinement_trials": len(refinement_estimate(cfg)) if cfg.refines else 0,
        "search": cfg.search, "methods": cfg.method_list, "lambdas": cfg.lambdas,
        "seeds": len(cfg.finetuned), "safety_prompts_per_trial": safety, "task_generations_per_trial": tasks,
        "generations": trials * per_trial, "judge": plan.judge_spec, "judge_calls": judge_calls,
        "max_generated_tokens": generated, "assumed_tokens_per_second": tokens_per_second,
        "gpu_hours_upper_bound": generated / tokens_per_second / 3600, "vllm": engines,
    }


# --- progress --------------------------------------------------------------------------------


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


class Bar:
    def __init__(self, progress=None, task=None):
        self.progress, self.task = progress, task

    def advance(self, record: dict) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, 1)

    def status(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)


@contextmanager
def sweep_progress(enabled: bool, total: int):
    """One bar across all trials, with an ETA (bisection's total is an estimate)."""
    if not (enabled and sys.stderr.isatty()):
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as progress:
        yield Bar(progress, progress.add_task("sweep", total=total))
