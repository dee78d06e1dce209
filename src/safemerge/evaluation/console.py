"""What `safemerge evaluate` shows in the terminal: its progress bar and the summary table."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from safemerge.evaluation.stats import format_estimate


@contextmanager
def progress_bar(enabled: bool):
    """Yield bar(description, total) -> advance(n): one line per phase, with prompts/s and ETA."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda description, total: (lambda n: None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TimeRemainingColumn

    class Rate(ProgressColumn):
        def render(self, task):
            return f"{task.speed or 0:.2f} prompts/s"

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), Rate(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as progress:
        def bar(description: str, total: int):
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)
        yield bar


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(set, metric, value [95% interval], notes) for the terminal table."""
    rows = []
    for name, r in results["safety"].items():
        for metric in ("asr", "over_refusal", "unsafe_compliance"):
            if metric in r:
                est = r[metric]
                notes = f"n={r.get('n')}" + (f", {r['parse_errors']} parse errors" if r.get("parse_errors") else "")
                rows.append((name, metric.upper() if metric == "asr" else metric.replace("_", "-"), format_estimate(est), notes))
    for name, r in results["tasks"].items():
        for metric, est in r["metrics"].items():
            rows.append((name, metric, format_estimate(est), f"n={r['n']}"))
    return rows


def print_summary(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['model']['spec']}  (judge: {results['judge']['name']})")
    for column in ("set", "metric", "value [95% CI]", "notes"):
        table.add_column(column)
    for row in summary_rows(results):
        table.add_row(*row)
    Console().print(table)
