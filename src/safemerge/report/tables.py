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
from safemerge.report.reading import Run, asr_of, dig, number, over_refusal_of, read_run, task_metric


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
    return next((g for g in run.choice.get("groups") or [] if trial_key in (g.get("trials") or [])), None)


def _merge_row(run: Run, method: str, trial_key) -> Row:
    """One (method, λ, density) at the mean over its seeds, from the choice's group holding trial_key."""
    by_key = run.by_key()
    group = _group_of(run, trial_key) or {"trials": [trial_key]}
    trials = [by_key[k] for k in group.get("trials") or [] if k in by_key]
    first = by_key.get(trial_key) or (trials[0] if trials else {})
    density = number(first.get("density"))
    name = method if density is None else f"{method} (density {density:g})"
    why_not = None
    if group.get("qualifies") is False:
        name += f" {FAILS_MARK}"
        why_not = group.get("why_not") or "does not meet the safety constraint"
    return Row(name, first.get("lam"), trials, why_not=why_not)


def _rows(run: Run) -> list[Row]:
    chosen = run.choice.get("chosen") or {}
    aligned = run.kind("aligned") or [t for t in run.trials if t.get("key") == run.choice.get("aligned")]
    rows = [Row("aligned", 0.0, aligned, chosen=chosen.get("kind") == "aligned"),
            Row("fine-tuned", 1.0, run.kind("finetuned"))]
    best = run.choice.get("best_per_method") or {}
    for method, pick in best.items():
        row = _merge_row(run, method, dig(pick, "trial"))
        if dig(pick, "qualifies") is False and row.why_not is None:
            row.name, row.why_not = f"{row.name} {FAILS_MARK}", "does not meet the safety constraint"
        rows.append(row)
    if chosen.get("kind") == "merge":
        hit = next((r for r in rows[2:] if chosen.get("trial") in {t.get("key") for t in r.trials}), None)
        if hit is None:  # the chosen merge is not a method's best: show it too, never leave it out
            hit = _merge_row(run, str(chosen.get("method")), chosen.get("trial"))
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
    chosen_key = dig(run.choice, "chosen", "trial") or (
        run.choice.get("aligned") if dig(run.choice, "chosen", "kind") == "aligned" else None)
    header = ["chosen", "trial", "key", "kind", "method", "λ", "density", "seed", "val score", "test score"]
    header += [f"ASR {s} {part}" for s in run.asr_sets for part in ("selection", "report")]
    header += [f"over-refusal {s} {part}" for s in run.xstest_sets for part in ("selection", "report")]
    header += ["seconds"]
    rows, highlight = [], None
    for i, t in enumerate(run.trials):
        chosen = chosen_key is not None and t.get("key") == chosen_key
        highlight = i if chosen else highlight
        seed = t.get("seed")
        row = [CHOSEN_MARK if chosen else "", str(t.get("label", "")), str(t.get("key", ""))[:8], str(t.get("kind", "")),
               str(t.get("method", "")), format_lam(t.get("lam")), format_lam(t.get("density")),
               "all" if seed is None else str(seed), format_float(t.get("val_score")), format_float(t.get("test_score"))]
        row += [format_estimate(asr_of(t, s, part)) for s in run.asr_sets for part in ("selection", "report")]
        row += [format_estimate(over_refusal_of(t, s, part)) for s in run.xstest_sets for part in ("selection", "report")]
        row += [format_float(dig(t, "seconds", "total"), 1)]
        rows.append(row)
    return header, rows, highlight


def search_table(run: Run) -> tuple[list[str], list[list[str]]]:
    header = ["search", "method", "seed", "λ", "passes the safety test", "upper bound of ASR − aligned ASR", "trial"]
    rows = []
    for step in run.results.get("search_log") or []:
        uppers = step.get("asr_upper") or {}
        bounds = "; ".join(f"{s}: {format_float(v)}" for s, v in uppers.items()) if isinstance(uppers, dict) \
            else format_float(uppers)
        meets = step.get("meets")
        rows.append([str(step.get("phase", "bisect")), str(step.get("method", "")),
                     "all" if step.get("seed") is None else str(step.get("seed")),
                     format_lam(step.get("lam")), MISSING if meets is None else ("yes" if meets else "no"),
                     bounds or MISSING, str(step.get("trial", ""))[:8]])
    return header, rows
