"""Progress on stderr for the long stages of finetune and the demo: one rich bar per stage
(description, bar, steps done of total, elapsed time, ETA), a transient status line for short
waits, and the libraries' own bars and logs switched off meanwhile.

On a terminal the bar redraws in place; when stderr is a file or a pipe rich draws nothing while
the stage runs and writes the finished bar once, so a log gets one line per stage. A bar that is
not enabled is a no-op object, so callers never branch on ``progress``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Bar:
    """A running bar (or, without a rich Progress, one that does nothing)."""

    def __init__(self, progress=None, task=None):
        self.progress, self.task = progress, task

    def advance(self, steps: int = 1, description: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=steps, **described(description))

    def update(self, completed: int, description: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, **described(description))

    def close(self) -> None:
        """Draw the final state and give the terminal back; safe to call twice."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def described(description: str | None) -> dict:
    return {} if description is None else {"description": description}


def open_bar(description: str, total: int, enabled: bool = True) -> Bar:
    """A started bar; the caller closes it (``progress_bar`` does so in a with-block)."""
    if not enabled:
        return Bar()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
    progress.start()
    return Bar(progress, progress.add_task(description, total=total))


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Bar]:
    bar = open_bar(description, total, enabled)
    try:
        yield bar
    finally:  # also on an error, so the terminal gets its cursor back
        bar.close()


@contextmanager
def status(text: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with ``text`` while the block runs, gone afterwards (nothing at all off a terminal)."""
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield


@contextmanager
def libraries_silenced() -> Iterator[None]:
    """datasets' map/filter bars, transformers' bars (loading, saving shards) and both libraries'
    info and warning logs are off inside the block, so safemerge's bar is the only output; their
    previous settings come back afterwards."""
    import datasets
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    levels = ds_logging.get_verbosity(), hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    ds_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(levels[0])
        hf_logging.set_verbosity(levels[1])
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            hf_logging.enable_progress_bar()
