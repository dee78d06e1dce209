"""`safemerge sweep`: merge by every method and λ, evaluate each merge, choose one, write it.

A *trial* is one model to evaluate: the aligned model (λ = 0), a fine-tuned model (λ = 1) or a
merge. Trials are self-contained and serialisable (a Trial plus the SweepConfig), so an executor
can run them anywhere; the local executor runs them one after the other in this process, with
the aligned model loaded once and each trial's weights set in place by the merge stream that
`safemerge merge` runs (or, with vLLM, on engines: see sweeps/vllm.py). A finished trial is stored atomically under RUN/trials/<key>/, keyed by
the inputs' content fingerprints, the method, its parameters and the evaluation settings: a
sweep stopped at any point and started again redoes no finished trial.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from safemerge.config import SweepConfig, validate
from safemerge.errors import ConfigError
from safemerge.sweeps import choose as choosing
from safemerge.sweeps.dry_run import estimated_trials
from safemerge.sweeps.executors import make_executor
from safemerge.sweeps.prune import pruned_grid, prunes
from safemerge.sweeps.records import SweepResults, checked
from safemerge.sweeps.runner import reference_verdicts
from safemerge.sweeps.refine import bisect_groups, refine, run_bisection
from safemerge.sweeps.store import TrialStore
from safemerge.sweeps.trials import (
    CFG_ALIGNED,
    Trial,
    baselines,
    evaluation_identity,
    grid_trials,
    sweep_plan,
    trial_key,
    trial_of,
)


@dataclass
class SweepResult:
    out: Path
    results: dict


def sweep(cfg: SweepConfig, *, progress: bool = True, invoked_as: str | None = None) -> SweepResult:
    """Run the sweep CFG describes (resuming its finished trials). progress=False prints nothing: no bar of
    safemerge's, none of the libraries' (loading and saving weights), no library logs."""
    from safemerge.progress import libraries_silenced

    with nullcontext() if progress else libraries_silenced():
        return run_sweep(cfg, progress=progress, invoked_as=invoked_as)


def run_sweep(cfg: SweepConfig, *, progress: bool, invoked_as: str | None) -> SweepResult:
    from safemerge.backends.models import pick_device
    from safemerge.checkpoints.readers import open_source

    check_run_directory(cfg.out)
    if cfg.evaluation.backend == "vllm":
        from safemerge.backends.vllm import require_vllm

        require_vllm()  # one line now, not after the inputs are fingerprinted
    device = pick_device(cfg.evaluation.device)
    plan = sweep_plan(cfg, device)  # every input file checked before anything runs
    if cfg.evaluation.judge == "auto":  # decided here, once: workers on other devices judge alike
        cfg = cfg.updated(judge=plan.judge_spec)
    fingerprints = {CFG_ALIGNED: open_source(cfg.aligned, allow_pickle=cfg.evaluation.allow_pickle).fingerprint()}
    for f in cfg.finetuned:
        fingerprints[f] = open_source(f, allow_pickle=cfg.evaluation.allow_pickle).fingerprint()
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

        search_log, breaches, pruned = [], [], []
        with closing(make_executor(cfg, store, log, bar.status)) as executor:
            if cfg.search == "grid" and prunes(cfg):  # λ in ascending waves, after the baselines
                records = run_baselines(cfg, executor, keyed, bar)
                grid, pruned = pruned_grid(cfg, executor, keyed, records[0], bar)
                records += grid
                if cfg.refines:
                    records += refine(cfg, executor, keyed, records, bar, search_log)
            elif cfg.search == "grid":  # one call, so that parallel workers never wait for the baselines
                records = executor.run(keyed(baselines(cfg) + grid_trials(cfg)), bar.advance)
                if cfg.refines:
                    records += refine(cfg, executor, keyed, records, bar, search_log)
            else:
                records = run_baselines(cfg, executor, keyed, bar)
                for method_trials in bisect_groups(cfg):
                    records += run_bisection(cfg, method_trials, executor, keyed, records[0], bar, search_log,
                                             breaches)
    shutil.rmtree(out / "scratch", ignore_errors=True)  # vLLM workers' merges and scaled adapters, killed ones' too
    results = assemble(cfg, records, search_log, breaches, invoked_as, pruned)
    finish(cfg, results, progress)
    return SweepResult(out, results)


def run_baselines(cfg: SweepConfig, executor, keyed, bar) -> list[dict]:
    """The aligned and fine-tuned models, in full; the aligned one's verdicts then let merges stop early."""
    records = executor.run(keyed(baselines(cfg)), bar.advance)
    if cfg.sequential:
        executor.reference = reference_verdicts(records[0])
    return records


def check_run_directory(out: Path) -> None:
    """A new directory, or one a sweep wrote (to resume or extend it); never someone's model."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "sweep.json").exists())):
        raise ConfigError(f"{out} exists and is not a sweep's run directory; choose another --out")


def assemble(cfg: SweepConfig, records: list[dict], search_log: list, breaches: list, invoked_as,
             pruned: list | None = None) -> dict:
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
        **({"pruned": pruned} if pruned else {}),
        "choice": choice,
        "reproduce": reproduce,
        "merged": None,
    }


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
    write_results(cfg.out / "results.json", results)
    write_report(cfg.out, results)


def write_results(path: Path, results: dict) -> None:
    """results.json, through its schema."""
    from safemerge.checkpoints.writer import write_file

    tmp = path.with_name(f".{path.name}.tmp")
    data = checked(SweepResults, results, path)
    write_file(tmp, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)


def rebuild_report(run_dir: Path) -> dict:
    """`safemerge report RUN`: results.json and the report again from the stored trials."""
    config = run_dir / "sweep.json"
    if not config.exists():
        raise ConfigError(f"{run_dir} holds no sweep.json; give the directory a `safemerge sweep` wrote")
    settings = read_run_json(config)
    if not isinstance(settings, dict):
        raise ConfigError(f"{config} must hold the sweep's settings as a JSON object")
    try:
        cfg = validate(SweepConfig, **settings)
    except ConfigError as e:
        raise ConfigError(f"{config}: {e}") from None
    previous = read_run_json(run_dir / "results.json") if (run_dir / "results.json").exists() else {}
    wanted = [r["key"] for r in previous.get("trials", [])] or sorted(p.name for p in (run_dir / "trials").iterdir())
    store = TrialStore(run_dir / "trials")
    records = [r for r in map(store.get, wanted) if r is not None]
    if not records:
        raise ConfigError(f"{run_dir} holds no finished trials yet")
    results = assemble(cfg, records, previous.get("search_log", []), previous.get("monotonicity_breaches", []),
                       previous.get("command"), previous.get("pruned"))
    results["merged"] = previous.get("merged")
    write_results(run_dir / "results.json", results)
    from safemerge.report.document import write_report

    write_report(run_dir, results)
    return results


def read_run_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}; was it edited by hand? `safemerge sweep` writes it again") from None


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
