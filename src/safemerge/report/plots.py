"""The report's plots: ASR against task score, and each method's metrics against λ."""

from __future__ import annotations

import io
import re
import statistics
from collections.abc import Callable

from safemerge.report.formatting import format_lam
from safemerge.report.reading import Run, asr_of, dig, number, task_score


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
        value, low, high = (number(est.get(k)) for k in ("value", "low", "high"))
        below.append(max(0.0, value - low) if low is not None else 0.0)
        above.append(max(0.0, high - value) if high is not None else 0.0)
    return [below, above]


def tradeoff_points(run: Run) -> list[tuple[float, float, dict]]:
    if not run.asr_sets:
        return []
    points = []
    for t in run.trials:
        x, y = number(t[f"{run.score_split}_score"]), number(dig(asr_of(t, run.asr_sets[0]), "value"))
        if x is not None and y is not None:
            points.append((x, y, t))
    return points


def _tradeoff_plot(run: Run) -> bytes:
    fig = _figure(7.5, 5.5)
    ax = fig.add_subplot()
    points = tradeoff_points(run)
    for method in run.methods:
        mine = [(x, y, t) for x, y, t in points if t["kind"] == "merge" and t["method"] == method]
        if mine:
            ax.scatter([p[0] for p in mine], [p[1] for p in mine], color=run.colour(method), label=method, zorder=3)
        for x, y, t in mine:
            if number(t["lam"]) is not None:
                ax.annotate(format_lam(t["lam"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for kind, style in (("aligned", {"marker": "*", "s": 220, "color": "black"}),
                        ("finetuned", {"marker": "X", "s": 110, "color": "#555555"})):
        mine = [(x, y) for x, y, t in points if t["kind"] == kind]
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
    key = run.choice["chosen"]["trial"]
    for x, y, t in points:
        if t["key"] == key:
            return x, y
    return None


def lambda_methods(run: Run) -> list[str]:
    """Methods with a λ axis; model_stock sets its own interpolation and is drawn as a band instead."""
    return [m for m in run.methods if any(number(t["lam"]) is not None for t in run.merges(m))]


def _lambda_panel(ax, run: Run, method: str, estimate: Callable[[dict], dict | None], ylabel: str) -> None:
    trials = [t for t in run.merges(method) if number(t["lam"]) is not None]
    seeds = sorted({t["seed"] for t in trials}, key=lambda s: (s is not None, s if s is not None else 0))
    densities = sorted({number(t["density"]) for t in trials}, key=lambda d: (d is not None, d or 0.0))
    several = len(seeds) > 1
    colour = run.colour(method)
    for di, density in enumerate(densities):
        style = ("-", "--", ":", "-.")[di % 4]
        name = method if density is None else f"{method} density {density:g}"
        mine = [t for t in trials if number(t["density"]) == density]
        for si, seed in enumerate(seeds):
            pts = sorted(((t["lam"], estimate(t) or {}) for t in mine if t["seed"] == seed), key=lambda p: p[0])
            pts = [(lam, est) for lam, est in pts if number(est.get("value")) is not None]
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
                value = number(dig(estimate(t), "value"))
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
        ests = [e for e in (estimate(t) or {} for t in run.kind(kind)) if number(e.get("value")) is not None]
        for i, est in enumerate(ests):
            ax.errorbar([lam], [est["value"]], yerr=_yerr([est]), capsize=3, label=label if i == 0 else None, **style)
    for method in [m for m in run.methods if m not in lambda_methods(run)]:
        ests = [e for e in (estimate(t) or {} for t in run.merges(method)) if number(e.get("value")) is not None]
        if not ests:
            continue
        colour = run.colour(method)
        mean = statistics.mean(e["value"] for e in ests)
        ax.axhline(mean, color=colour, linestyle=":", linewidth=1.5, label=f"{method} (no λ)")
        if len(ests) == 1 and number(ests[0].get("low")) is not None and number(ests[0].get("high")) is not None:
            ax.axhspan(ests[0]["low"], ests[0]["high"], color=colour, alpha=0.12, linewidth=0)


def _lambda_plot(run: Run, method: str) -> bytes:
    fig = _figure(11, 4.2)
    ax_asr, ax_task = fig.subplots(1, 2)
    if run.asr_sets:
        asr_set = run.asr_sets[0]
        _lambda_panel(ax_asr, run, method, lambda t: asr_of(t, asr_set), f"ASR on {asr_set}, report part")
    else:
        ax_asr.text(0.5, 0.5, "no ASR measured", transform=ax_asr.transAxes, ha="center")
    _lambda_panel(ax_task, run, method, lambda t: task_score(t, run.score_split), f"task score ({run.score_split})")
    fig.suptitle(f"{method}: safety and task score against λ (95% intervals)")
    return _png(fig)


def plot_name(method: str) -> str:
    return "lambda_" + re.sub(r"[^A-Za-z0-9_.-]", "_", method) + ".png"


def all_plots(run: Run) -> dict[str, bytes]:
    import matplotlib.style

    with matplotlib.style.context("default"):  # the user's matplotlibrc must not change the report
        plots = {"tradeoff.png": _tradeoff_plot(run)}
        for method in lambda_methods(run):
            plots[plot_name(method)] = _lambda_plot(run, method)
    return plots
