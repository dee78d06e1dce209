"""A sweep's results.json read into one typed view (Run) with the lookups every table and plot uses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from safemerge.evaluation.prompts import is_xstest
from safemerge.sweeps.records import SweepResults, checked

TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def number(value) -> float | None:
    """A measured number, or None for null / NaN (nothing could be measured)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def dig(data, *keys):
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


@dataclass
class Run:
    """The parts of results.json the report is built from, with the lookups it needs."""

    results: dict
    trials: list[dict]
    asr_sets: list[str]  # safety sets that carry an ASR, in the order the trials list them
    xstest_sets: list[str]  # XSTest sets, which carry over-refusal instead
    table_split: str  # "test", or "val" when there is no test task
    table_tasks: list[tuple[str, str]]  # (task, primary metric) of table_split
    score_split: str  # the split of the task score plotted: "test" if any trial has a test score, else "val"
    methods: list[str] = field(default_factory=list)  # merge methods, in the order they were evaluated

    @property
    def choice(self) -> dict:
        return self.results["choice"]

    def by_key(self) -> dict[str, dict]:
        return {t["key"]: t for t in self.trials}

    def colour(self, method: str) -> str:
        return TAB10[self.methods.index(method) % len(TAB10)] if method in self.methods else "#7f7f7f"

    def merges(self, method: str) -> list[dict]:
        return [t for t in self.trials if t["kind"] == "merge" and t["method"] == method]

    def kind(self, kind: str) -> list[dict]:
        return [t for t in self.trials if t["kind"] == kind]


def read_run(results: dict, where: str = "results") -> Run:
    """RESULTS read through the schema the sweep writes them with: a missing or edited field is one line."""
    results = checked(SweepResults, results, where)
    trials = results["trials"]
    sets = list(dict.fromkeys(s for t in trials for s in t["safety"]))
    table_split, table_tasks = "test", []
    for split in ("test", "val"):
        tasks = {name: entry["primary"] for t in trials for name, entry in t["tasks"][split].items()}
        if tasks:
            table_split, table_tasks = split, list(tasks.items())
            break
    score_split = "test" if any(t["test_score"] is not None for t in trials) else "val"
    methods = list(dict.fromkeys(t["method"] for t in trials if t["kind"] == "merge"))
    return Run(results, trials, [s for s in sets if not is_xstest(s)], [s for s in sets if is_xstest(s)],
               table_split, table_tasks, score_split, methods)


def asr_of(trial: dict, safety_set: str, part: str = "report") -> dict | None:
    return dig(trial, "safety", safety_set, part, "asr")


def over_refusal_of(trial: dict, safety_set: str, part: str = "report") -> dict | None:
    return dig(trial, "safety", safety_set, part, "over_refusal")


def task_metric(trial: dict, split: str, task: str, primary: str) -> dict | None:
    return dig(trial, "tasks", split, task, "metrics", primary)


def task_score(trial: dict, split: str) -> dict:
    """The trial's task score as an estimate; it has an interval only when one task makes the score."""
    tasks = trial["tasks"][split]
    if len(tasks) == 1:
        (entry,) = tasks.values()
        return entry["metrics"][entry["primary"]]
    return {"value": trial[f"{split}_score"]}
