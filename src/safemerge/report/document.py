"""The sweep's report: a paper-style table, trade-off plots, and the same content as Markdown and self-contained HTML.

Everything is rendered from RUN/results.json alone, so `safemerge report RUN` can rebuild it, and the bytes depend on
nothing but the results (no clock, no absolute paths, no matplotlib version stamp).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from safemerge.checkpoints.writer import disk_error, write_file
from safemerge.errors import ConfigError

MISSING = "n/a"
NO_LAMBDA = "—"
CHOSEN_MARK = "✓"
FAILS_MARK = "†"
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
SETTING_KEYS = ("aligned", "finetuned", "methods", "lambdas", "search", "policy", "max_asr_increase", "judge", "safety",
                "task_val", "task_test", "generation")


# ---------------------------------------------------------------- reading the results


def _number(value) -> float | None:
    """A measured number, or None for null / NaN (nothing could be measured)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _dig(data, *keys):
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def is_xstest(safety_set: str) -> bool:
    return safety_set.startswith("xstest")


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
        return self.results.get("choice") or {}

    def by_key(self) -> dict[str, dict]:
        return {t.get("key"): t for t in self.trials}

    def colour(self, method: str) -> str:
        return TAB10[self.methods.index(method) % len(TAB10)] if method in self.methods else "#7f7f7f"

    def merges(self, method: str) -> list[dict]:
        return [t for t in self.trials if t.get("kind") == "merge" and t.get("method") == method]

    def kind(self, kind: str) -> list[dict]:
        return [t for t in self.trials if t.get("kind") == kind]


def _read_run(results: dict, where: str = "results") -> Run:
    if not isinstance(results, dict):
        raise ConfigError(f"{where}: expected a JSON object; rebuild it with `safemerge sweep` (same command, it resumes)")
    for key, kind in (("trials", list), ("choice", dict)):
        if not isinstance(results.get(key), kind):
            raise ConfigError(f"{where}: field '{key}' is missing or not a {kind.__name__}; "
                              "rerun the sweep with the same command to rebuild it")
    trials = [t for t in results["trials"] if isinstance(t, dict)]
    sets = list(dict.fromkeys(s for t in trials for s in (t.get("safety") or {})))
    table_split, table_tasks = "test", []
    for split in ("test", "val"):
        tasks = {name: str(entry.get("primary")) for t in trials
                 for name, entry in (_dig(t, "tasks", split) or {}).items() if isinstance(entry, dict)}
        if tasks:
            table_split, table_tasks = split, list(tasks.items())
            break
    score_split = "test" if any(_number(t.get("test_score")) is not None for t in trials) else "val"
    methods = list(dict.fromkeys(str(t.get("method")) for t in trials if t.get("kind") == "merge"))
    return Run(results, trials, [s for s in sets if not is_xstest(s)], [s for s in sets if is_xstest(s)],
               table_split, table_tasks, score_split, methods)


def _asr(trial: dict, safety_set: str, part: str = "report") -> dict | None:
    return _dig(trial, "safety", safety_set, part, "asr")


def _over_refusal(trial: dict, safety_set: str, part: str = "report") -> dict | None:
    return _dig(trial, "safety", safety_set, part, "over_refusal")


def _task_metric(trial: dict, split: str, task: str, primary: str) -> dict | None:
    return _dig(trial, "tasks", split, task, "metrics", primary)


def _task_score(trial: dict, split: str) -> dict:
    """The trial's task score as an estimate; it has an interval only when one task makes the score."""
    tasks = _dig(trial, "tasks", split) or {}
    if len(tasks) == 1:
        (entry,) = tasks.values()
        est = _dig(entry, "metrics", entry.get("primary")) if isinstance(entry, dict) else None
        if isinstance(est, dict):
            return est
    return {"value": trial.get(f"{split}_score")}


# ---------------------------------------------------------------- formatting


def _fmt_lam(lam) -> str:
    lam = _number(lam)
    return NO_LAMBDA if lam is None else f"{lam:g}"


def _fmt_float(value, digits: int = 3) -> str:
    value = _number(value)
    return MISSING if value is None else f"{value:.{digits}f}"


def _fmt_estimate(est) -> str:
    """'0.120 [0.080, 0.170]': the value with its 95% interval."""
    value = _number(_dig(est, "value"))
    if value is None:
        return MISSING
    low, high = _number(est.get("low")), _number(est.get("high"))
    return f"{value:.3f}" if low is None or high is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def mean_sd(values: list) -> str:
    """Over seeds: '0.612 ± 0.021' (sample sd), '0.612' for one value, 'n/a' for none; unmeasured seeds are said."""
    measured = [v for v in (_number(v) for v in values) if v is not None]
    if not measured:
        return MISSING
    text = f"{measured[0]:.3f}" if len(measured) == 1 else \
        f"{statistics.mean(measured):.3f} ± {statistics.stdev(measured):.3f}"
    return text if len(measured) == len(values) else f"{text} ({len(measured)} of {len(values)} measured)"


# ---------------------------------------------------------------- the paper-style table


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
    columns = [Column(f"{task} {primary} ({split})", lambda t, a=task, p=primary: _task_metric(t, split, a, p))
               for task, primary in run.table_tasks]
    columns += [Column(f"ASR {s}", lambda t, s=s: _asr(t, s)) for s in run.asr_sets]
    columns += [Column(f"over-refusal {s}", lambda t, s=s: _over_refusal(t, s)) for s in run.xstest_sets]
    return columns


def _group_of(run: Run, trial_key) -> dict | None:
    return next((g for g in run.choice.get("groups") or [] if trial_key in (g.get("trials") or [])), None)


def _merge_row(run: Run, method: str, trial_key) -> Row:
    """One (method, λ, density) at the mean over its seeds, from the choice's group holding trial_key."""
    by_key = run.by_key()
    group = _group_of(run, trial_key) or {"trials": [trial_key]}
    trials = [by_key[k] for k in group.get("trials") or [] if k in by_key]
    first = by_key.get(trial_key) or (trials[0] if trials else {})
    density = _number(first.get("density"))
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
        row = _merge_row(run, method, _dig(pick, "trial"))
        if _dig(pick, "qualifies") is False and row.why_not is None:
            row.name, row.why_not = f"{row.name} {FAILS_MARK}", "does not meet the safety constraint"
        rows.append(row)
    if chosen.get("kind") == "merge":
        hit = next((r for r in rows[2:] if chosen.get("trial") in {t.get("key") for t in r.trials}), None)
        if hit is None:  # the chosen merge is not a method's best: show it too, never leave it out
            hit = _merge_row(run, str(chosen.get("method")), chosen.get("trial"))
            rows.append(hit)
        hit.chosen = True
    return rows


def _table(run: Run) -> tuple[list[str], list[list[str]], list[Row]]:
    columns = _columns(run)
    header = ["chosen", "model", "λ", "seeds"] + [c.header for c in columns]
    rows = _rows(run)
    cells = [[CHOSEN_MARK if r.chosen else "", r.name, _fmt_lam(r.lam), str(len(r.trials))]
             + [mean_sd([_dig(c.estimate(t), "value") for t in r.trials]) for c in columns] for r in rows]
    return header, cells, rows


def paper_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The paper's table: aligned, fine-tuned, each method at its chosen λ; mean ± sd over seeds; the chosen row ✓."""
    header, cells, _ = _table(_read_run(results))
    return header, cells


# ---------------------------------------------------------------- the other tables


def _trials_table(run: Run) -> tuple[list[str], list[list[str]], int | None]:
    chosen_key = _dig(run.choice, "chosen", "trial") or (
        run.choice.get("aligned") if _dig(run.choice, "chosen", "kind") == "aligned" else None)
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
               str(t.get("method", "")), _fmt_lam(t.get("lam")), _fmt_lam(t.get("density")),
               "all" if seed is None else str(seed), _fmt_float(t.get("val_score")), _fmt_float(t.get("test_score"))]
        row += [_fmt_estimate(_asr(t, s, part)) for s in run.asr_sets for part in ("selection", "report")]
        row += [_fmt_estimate(_over_refusal(t, s, part)) for s in run.xstest_sets for part in ("selection", "report")]
        row += [_fmt_float(_dig(t, "seconds", "total"), 1)]
        rows.append(row)
    return header, rows, highlight


def _search_table(run: Run) -> tuple[list[str], list[list[str]]]:
    header = ["search", "method", "seed", "λ", "passes the safety test", "upper bound of ASR − aligned ASR", "trial"]
    rows = []
    for step in run.results.get("search_log") or []:
        uppers = step.get("asr_upper") or {}
        bounds = "; ".join(f"{s}: {_fmt_float(v)}" for s, v in uppers.items()) if isinstance(uppers, dict) \
            else _fmt_float(uppers)
        meets = step.get("meets")
        rows.append([str(step.get("phase", "bisect")), str(step.get("method", "")),
                     "all" if step.get("seed") is None else str(step.get("seed")),
                     _fmt_lam(step.get("lam")), MISSING if meets is None else ("yes" if meets else "no"),
                     bounds or MISSING, str(step.get("trial", ""))[:8]])
    return header, rows


# ---------------------------------------------------------------- plots


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (task score, ASR) points no other point beats: higher score and lower ASR are better."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front, best = [], None
    for i in order:
        if best is None or points[i][0] > best[0] or points[i] == best:
            front.append(i)
            best = points[i]
    return sorted(front)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same results, same bytes
    return buffer.getvalue()


def _yerr(ests: list[dict]) -> list[list[float]]:
    """Asymmetric error bars from each estimate's interval; none where it has no interval."""
    below, above = [], []
    for est in ests:
        value, low, high = (_number(est.get(k)) for k in ("value", "low", "high"))
        below.append(max(0.0, value - low) if low is not None else 0.0)
        above.append(max(0.0, high - value) if high is not None else 0.0)
    return [below, above]


def _tradeoff_points(run: Run) -> list[tuple[float, float, dict]]:
    if not run.asr_sets:
        return []
    points = []
    for t in run.trials:
        x, y = _number(t.get(f"{run.score_split}_score")), _number(_dig(_asr(t, run.asr_sets[0]), "value"))
        if x is not None and y is not None:
            points.append((x, y, t))
    return points


def _tradeoff_plot(run: Run) -> bytes:
    fig = _figure(7.5, 5.5)
    ax = fig.add_subplot()
    points = _tradeoff_points(run)
    for method in run.methods:
        mine = [(x, y, t) for x, y, t in points if t.get("kind") == "merge" and t.get("method") == method]
        if mine:
            ax.scatter([p[0] for p in mine], [p[1] for p in mine], color=run.colour(method), label=method, zorder=3)
        for x, y, t in mine:
            if _number(t.get("lam")) is not None:
                ax.annotate(_fmt_lam(t.get("lam")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for kind, style in (("aligned", {"marker": "*", "s": 220, "color": "black"}),
                        ("finetuned", {"marker": "X", "s": 110, "color": "#555555"})):
        mine = [(x, y) for x, y, t in points if t.get("kind") == kind]
        if mine:
            ax.scatter(*zip(*mine), label="fine-tuned" if kind == "finetuned" else kind, zorder=4, **style)
    if points:
        front = sorted((points[i][0], points[i][1]) for i in pareto_front([(x, y) for x, y, _ in points]))
        ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color="#999999", linestyle="--",
                label="Pareto front", zorder=2)
        chosen = _chosen_point(run, points)
        if chosen is not None:
            ax.scatter([chosen[0]], [chosen[1]], s=480, facecolors="none", edgecolors="red", linewidths=2,
                       label="chosen", zorder=5)
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no trial has both a task score and an ASR", transform=ax.transAxes, ha="center")
    asr_set = run.asr_sets[0] if run.asr_sets else "(no ASR set)"
    ax.set_xlabel(f"task score ({run.score_split}; higher is better)")
    ax.set_ylabel(f"ASR on {asr_set}, report part (lower is better)")
    ax.set_title("Safety against task score, every trial (labels: λ)")
    ax.grid(alpha=0.3)
    return _png(fig)


def _chosen_point(run: Run, points: list[tuple[float, float, dict]]) -> tuple[float, float] | None:
    chosen = run.choice.get("chosen") or {}
    key = run.choice.get("aligned") if chosen.get("kind") == "aligned" else chosen.get("trial")
    for x, y, t in points:
        if t.get("key") == key or (chosen.get("kind") == "aligned" and key is None and t.get("kind") == "aligned"):
            return x, y
    return None


def lambda_methods(run: Run) -> list[str]:
    """Methods with a λ axis; model_stock sets its own interpolation and is drawn as a band instead."""
    return [m for m in run.methods if any(_number(t.get("lam")) is not None for t in run.merges(m))]


def _lambda_panel(ax, run: Run, method: str, estimate: Callable[[dict], dict | None], ylabel: str) -> None:
    trials = [t for t in run.merges(method) if _number(t.get("lam")) is not None]
    seeds = sorted({t.get("seed") for t in trials}, key=lambda s: (s is not None, s if s is not None else 0))
    densities = sorted({_number(t.get("density")) for t in trials}, key=lambda d: (d is not None, d or 0.0))
    several = len(seeds) > 1
    colour = run.colour(method)
    for di, density in enumerate(densities):
        style = ("-", "--", ":", "-.")[di % 4]
        name = method if density is None else f"{method} density {density:g}"
        mine = [t for t in trials if _number(t.get("density")) == density]
        for si, seed in enumerate(seeds):
            pts = sorted(((t["lam"], estimate(t) or {}) for t in mine if t.get("seed") == seed), key=lambda p: p[0])
            pts = [(lam, est) for lam, est in pts if _number(est.get("value")) is not None]
            if not pts:
                continue
            shift = (si - (len(seeds) - 1) / 2) * 0.008  # seeds side by side, so their bars stay readable
            ax.errorbar([lam + shift for lam, _ in pts], [est["value"] for _, est in pts],
                        yerr=_yerr([est for _, est in pts]), fmt="o", linestyle="none" if several else style,
                        color=colour, alpha=0.35 if several else 1.0, capsize=2, markersize=4,
                        label=None if several else name)
        if several:
            by_lam: dict[float, list[float]] = {}
            for t in mine:
                value = _number(_dig(estimate(t), "value"))
                if value is not None:
                    by_lam.setdefault(float(t["lam"]), []).append(value)
            lams = sorted(by_lam)
            ax.plot(lams, [statistics.mean(by_lam[lam]) for lam in lams], linestyle=style, color=colour, linewidth=2,
                    label=f"{name}, mean of {len(seeds)} seeds")
    _reference_markers(ax, run, estimate)
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("λ (weight of the fine-tuned model)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _reference_markers(ax, run: Run, estimate: Callable[[dict], dict | None]) -> None:
    """Aligned at λ=0, fine-tuned at λ=1, and each method without λ as a horizontal band."""
    for kind, lam, style, label in (("aligned", 0.0, {"fmt": "*", "color": "black", "markersize": 11}, "aligned (λ=0)"),
                                    ("finetuned", 1.0, {"fmt": "X", "color": "#555555", "markersize": 8},
                                     "fine-tuned (λ=1)")):
        ests = [e for e in (estimate(t) or {} for t in run.kind(kind)) if _number(e.get("value")) is not None]
        for i, est in enumerate(ests):
            ax.errorbar([lam], [est["value"]], yerr=_yerr([est]), capsize=3, label=label if i == 0 else None, **style)
    for method in [m for m in run.methods if m not in lambda_methods(run)]:
        ests = [e for e in (estimate(t) or {} for t in run.merges(method)) if _number(e.get("value")) is not None]
        if not ests:
            continue
        colour = run.colour(method)
        mean = statistics.mean(e["value"] for e in ests)
        ax.axhline(mean, color=colour, linestyle=":", linewidth=1.5, label=f"{method} (no λ)")
        if len(ests) == 1 and _number(ests[0].get("low")) is not None and _number(ests[0].get("high")) is not None:
            ax.axhspan(ests[0]["low"], ests[0]["high"], color=colour, alpha=0.12, linewidth=0)


def _lambda_plot(run: Run, method: str) -> bytes:
    fig = _figure(11, 4.2)
    ax_asr, ax_task = fig.subplots(1, 2)
    if run.asr_sets:
        asr_set = run.asr_sets[0]
        _lambda_panel(ax_asr, run, method, lambda t: _asr(t, asr_set), f"ASR on {asr_set}, report part")
    else:
        ax_asr.text(0.5, 0.5, "no ASR measured", transform=ax_asr.transAxes, ha="center")
    _lambda_panel(ax_task, run, method, lambda t: _task_score(t, run.score_split), f"task score ({run.score_split})")
    fig.suptitle(f"{method}: safety and task score against λ (95% intervals)")
    return _png(fig)


def _plot_name(method: str) -> str:
    return "lambda_" + re.sub(r"[^A-Za-z0-9_.-]", "_", method) + ".png"


def _plots(run: Run) -> dict[str, bytes]:
    import matplotlib.style

    with matplotlib.style.context("default"):  # the user's matplotlibrc must not change the report
        plots = {"tradeoff.png": _tradeoff_plot(run)}
        for method in lambda_methods(run):
            plots[_plot_name(method)] = _lambda_plot(run, method)
    return plots


# ---------------------------------------------------------------- one document, two renderings


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    link: tuple[str, str] | None = None  # (text, relative href) appended to the paragraph


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    highlight: set[int] = field(default_factory=set)


@dataclass
class Image:
    alt: str
    path: str  # relative to the run directory
    data: bytes


@dataclass
class Code:
    text: str
    lang: str = ""


@dataclass
class Bullets:
    items: list[str]


def _document(run: Run, plots: dict[str, bytes]) -> list:
    results = run.results
    header, cells, rows = _table(run)
    blocks: list = [Heading("safemerge sweep report", 1)]
    made = " ".join(x for x in (f"Created {results['created']}" if results.get("created") else "",
                                f"by safemerge {results['safemerge_version']}" if results.get("safemerge_version")
                                else "") if x)
    if made:
        blocks.append(Para(made + "."))
    blocks.append(Para("Choice: " + str(run.choice.get("reason") or "no reason was recorded.")))
    if run.choice.get("test") and run.choice.get("policy") == "constrained":
        blocks.append(Para("The safety test: " + str(run.choice["test"])))
    breaches = results.get("monotonicity_breaches") or []
    if breaches:
        blocks.append(Para(f"Warning: {len(breaches)} breach(es) of the assumption that ASR grows with λ; "
                           "see 'Monotonicity breaches' below."))
    if results.get("merged"):
        blocks.append(Para("The chosen model is written to", link=(str(results["merged"]), _href(results["merged"]))))
    split_note = "test" if run.table_split == "test" else "validation (there is no test task)"
    blocks += [Heading("Results"),
               Para(f"Task scores on the {split_note} split; ASR and over-refusal on the report part of each safety "
                    "set, not the part used to choose. Mean ± sample standard deviation over fine-tuning seeds. "
                    f"{CHOSEN_MARK} marks the chosen model."),
               Table(header, cells, {i for i, r in enumerate(rows) if r.chosen})]
    notes = [f"{r.name}: {r.why_not}" for r in rows if r.why_not]
    if notes:
        blocks += [Para(f"{FAILS_MARK} does not meet the safety constraint:"), Bullets(notes)]
    reproduce = results.get("reproduce")
    blocks += [Heading("Reproduce"), Code(str(reproduce), "bash") if reproduce else
               Para("No merge was chosen, so there is nothing to write: use the aligned model as it is.")]
    blocks += _plot_blocks(run, plots)
    t_header, t_rows, t_chosen = _trials_table(run)
    blocks += [Heading("Trials"), Para(f"{len(run.trials)} trials, in the order they were evaluated; estimates are "
                                       "value [95% interval]."),
               Table(t_header, t_rows, set() if t_chosen is None else {t_chosen})]
    s_header, s_rows = _search_table(run)
    if s_rows:
        blocks += [Heading("Search log"),
                   Para("λ values the search added: refine bisects each method between its largest λ that passes "
                        "the safety test and the next λ tried; bisect searches [0, 1]."), Table(s_header, s_rows)]
    if breaches:
        blocks += [Heading("Monotonicity breaches"),
                   Para("The bisection assumes ASR grows with λ; these measurements contradict it, so its answer "
                        "for these methods may be wrong:"), Bullets([str(b) for b in breaches])]
    return blocks + _settings_blocks(results)


def _plot_blocks(run: Run, plots: dict[str, bytes]) -> list:
    blocks: list = [Heading("Plots"), Image("ASR against task score", "plots/tradeoff.png", plots["tradeoff.png"])]
    missing = len(run.trials) - len(_tradeoff_points(run))
    if missing:
        blocks.append(Para(f"{missing} trial(s) lack a task score or an ASR and are not drawn."))
    for method in lambda_methods(run):
        name = _plot_name(method)
        blocks.append(Image(f"{method}: ASR and task score against λ", f"plots/{name}", plots[name]))
    return blocks


def _settings_blocks(results: dict) -> list:
    config = results.get("config") or {}
    items = [f"{k}: {json.dumps(config[k], ensure_ascii=False, sort_keys=True)}" for k in SETTING_KEYS if k in config]
    blocks: list = [Heading("Settings"), Bullets(items or ["no configuration was recorded"])]
    if results.get("command"):
        blocks += [Para("The command that ran the sweep:"), Code(str(results["command"]), "bash")]
    if config:
        blocks += [Heading("Full configuration", 3), Code(json.dumps(config, indent=2, ensure_ascii=False), "json")]
    return blocks


def _href(target) -> str:
    return quote(str(target).rstrip("/") + "/")


def _md_text(text: str) -> str:
    """Plain text inside Markdown: characters that would start markup are escaped; newlines become spaces."""
    text = re.sub(r"([\\`*<>|])", r"\\\1", " ".join(str(text).split()))
    return re.sub(r"\[(?=[^\]]*\][(\[])", r"\\[", text)  # a bracket only where it would open a link


def _fence(text: str) -> str:
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return ticks


def _md_table(table: Table) -> list[str]:
    out = ["| " + " | ".join(_md_text(h) for h in table.header) + " |", "|" + "|".join("---" for _ in table.header) + "|"]
    for i, row in enumerate(table.rows):
        cells = [_md_text(c) for c in row]
        if i in table.highlight:  # bold the chosen row; the ** is markup, so it is added after escaping
            cells = [f"**{c}**" if c else c for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    return out


def to_markdown(blocks: list) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _md_text(b.text))
        elif isinstance(b, Para):
            link = f" [{_md_text(b.link[0])}]({b.link[1]})." if b.link else ""
            out.append(_md_text(b.text) + link)
        elif isinstance(b, Table):
            out.append("\n".join(_md_table(b)))
        elif isinstance(b, Image):
            out.append(f"![{_md_text(b.alt)}]({b.path})")
        elif isinstance(b, Code):
            fence = _fence(b.text)
            out.append(f"{fence}{b.lang}\n{b.text}\n{fence}")
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {_md_text(item)}" for item in b.items))
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; }
tr.chosen td { background: #fff3b0; font-weight: 600; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; }
figure { margin: 1em 0; }
img { max-width: 100%; height: auto; }
""".strip()


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "\n".join(
        ("<tr class=\"chosen\">" if i in table.highlight else "<tr>")
        + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(table.rows))
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def to_html(blocks: list) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "safemerge report")
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            link = f" <a href=\"{html.escape(b.link[1])}\">{html.escape(b.link[0])}</a>." if b.link else ""
            out.append(f"<p>{html.escape(b.text)}{link}</p>")
        elif isinstance(b, Table):
            out.append(_html_table(b))
        elif isinstance(b, Image):
            data = base64.b64encode(b.data).decode("ascii")
            out.append(f"<figure><img alt=\"{html.escape(b.alt)}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{html.escape(b.alt)}</figcaption></figure>")
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Bullets):
            out.append("<ul>\n" + "\n".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "\n</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(out) + "\n</body>\n</html>\n")


# ---------------------------------------------------------------- writing


def _write_atomic(path: Path, data: bytes) -> None:
    """A reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, path.parent) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(run_dir: Path, results: dict) -> dict[str, Path]:
    """Write RUN/report.md, RUN/report.html and RUN/plots/*.png from results; returns {relative name: path}."""
    run_dir = Path(run_dir)
    run = _read_run(results, str(run_dir / "results.json"))
    plots = _plots(run)
    blocks = _document(run, plots)
    plot_dir = run_dir / "plots"
    try:
        plot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, run_dir) from None
    written: dict[str, Path] = {}
    for name, data in plots.items():
        _write_atomic(plot_dir / name, data)
        written[f"plots/{name}"] = plot_dir / name
    for stale in sorted(plot_dir.glob("lambda_*.png")):  # a method dropped from the sweep leaves no old picture
        if stale.name not in plots:
            stale.unlink(missing_ok=True)
    for name, text in (("report.md", to_markdown(blocks)), ("report.html", to_html(blocks))):
        _write_atomic(run_dir / name, text.encode("utf-8"))
        written[name] = run_dir / name
    return written
