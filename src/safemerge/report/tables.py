"""The report's tables: the paper-style table, every trial, the search log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from safemerge.evaluation.stats import format_estimate
from safemerge.report.formatting import (
    CHOSEN_MARK,
    FAILS_MARK,
    MISSING,
    format_float,
    format_lam,
    format_mean_sd,
)
from safemerge.report.reading import Run, asr_of, dig, over_refusal_of, read_run, task_metric


@dataclass
class Row:
    name: str
    lam: float | None
    trials: list[dict]
    chosen: bool = False
    why_not: str | None = None  # set when the row's merge does not meet the safety constraint


@dataclass
class Column:
    header: str
    estimate: Callable[[dict], dict | None]


def _columns(run: Run) -> list[Column]:
    split = run.table_split
    columns = [Column(f"{task} {primary} ({split})", lambda t, a=task, p=primary: task_metric(t, split, a, p))
               for task, primary in run.table_tasks]
    columns += [Column(f"ASR {s}", lambda t, s=s: asr_of(t, s)) for s in run.asr_sets]
    columns += [Column(f"over-refusal {s}", lambda t, s=s: over_refusal_of(t, s)) for s in run.xstest_sets]
    return columns


def _group_of(run: Run, trial_key) -> dict | None:
    return next((g for g in run.choice["groups"] if trial_key in g["trials"]), None)


def _merge_row(run: Run, method: str, trial_key) -> Row:
    """One (method, λ, density) at the mean over its seeds, from the choice's group holding trial_key."""
    by_key = run.by_key()
    group = _group_of(run, trial_key) or {"trials": [trial_key]}
    trials = [by_key[k] for k in group["trials"] if k in by_key]
    first = by_key.get(trial_key) or (trials[0] if trials else {"lam": None, "density": None})
    density = first["density"]
    name = method if density is None else f"{method} (density {density:g})"
    why_not = None
    if group.get("qualifies") is False:  # a trial outside every group has no verdict
        name += f" {FAILS_MARK}"
        why_not = group["why_not"] or "does not meet the safety constraint"
    return Row(name, first["lam"], trials, why_not=why_not)


def _rows(run: Run) -> list[Row]:
    chosen = run.choice["chosen"]
    aligned = run.kind("aligned") or [t for t in run.trials if t["key"] == run.choice["aligned"]]
    rows = [Row("aligned", 0.0, aligned, chosen=chosen["kind"] == "aligned"),
            Row("fine-tuned", 1.0, run.kind("finetuned"))]
    for method, pick in run.choice["best_per_method"].items():
        row = _merge_row(run, method, pick["trial"])
        if not pick["qualifies"] and row.why_not is None:
            row.name, row.why_not = f"{row.name} {FAILS_MARK}", "does not meet the safety constraint"
        rows.append(row)
    if chosen["kind"] == "merge":
        hit = next((r for r in rows[2:] if chosen["trial"] in {t["key"] for t in r.trials}), None)
        if hit is None:  # the chosen merge is not a method's best: show it too, never leave it out
            hit = _merge_row(run, str(chosen["method"]), chosen["trial"])
            rows.append(hit)
        hit.chosen = True
    return rows


def paper_table_of(run: Run) -> tuple[list[str], list[list[str]], list[Row]]:
    columns = _columns(run)
    header = ["chosen", "model", "λ", "seeds"] + [c.header for c in columns]
    rows = _rows(run)
    cells = [[CHOSEN_MARK if r.chosen else "", r.name, format_lam(r.lam), str(len(r.trials))]
             + [format_mean_sd([dig(c.estimate(t), "value") for t in r.trials]) for c in columns] for r in rows]
    return header, cells, rows


def paper_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The paper's table: aligned, fine-tuned, each method at its chosen λ; mean ± sd over seeds; the chosen row ✓."""
    header, cells, _ = paper_table_of(read_run(results))
    return header, cells


def trials_table(run: Run) -> tuple[list[str], list[list[str]], int | None]:
    chosen_key = run.choice["chosen"]["trial"]
    header = ["chosen", "trial", "key", "kind", "method", "λ", "density", "seed", "val score", "test score"]
    header += [f"ASR {s} {part}" for s in run.asr_sets for part in ("selection", "report")]
    header += [f"over-refusal {s} {part}" for s in run.xstest_sets for part in ("selection", "report")]
    header += ["seconds"]
    rows, highlight = [], None
    for i, t in enumerate(run.trials):
        chosen = t["key"] == chosen_key
        highlight = i if chosen else highlight
        seed = t["seed"]
        row = [CHOSEN_MARK if chosen else "", t["label"], t["key"][:8], t["kind"], t["method"], format_lam(t["lam"]),
               format_lam(t["density"]), "all" if seed is None else str(seed), format_float(t["val_score"]),
               format_float(t["test_score"])]
        row += [format_estimate(asr_of(t, s, part)) for s in run.asr_sets for part in ("selection", "report")]
        row += [format_estimate(over_refusal_of(t, s, part)) for s in run.xstest_sets for part in ("selection", "report")]
        row += [format_float(t["seconds"].get("total"), 1)]
        rows.append(row)
    return header, rows, highlight


def search_table(run: Run) -> tuple[list[str], list[list[str]]]:
    header = ["search", "method", "seed", "λ", "passes the safety test", "upper bound of ASR − aligned ASR", "trial"]
    rows = []
    for step in run.results["search_log"]:
        bounds = "; ".join(f"{s}: {format_float(v)}" for s, v in step["asr_upper"].items())
        rows.append([step["phase"], step["method"], "all" if step["seed"] is None else str(step["seed"]),
                     format_lam(step["lam"]), "yes" if step["meets"] else "no", bounds or MISSING, step["trial"][:8]])
    return header, rows
