"""The `safemerge` command: a thin typer layer over the Python API, with one error boundary."""

from __future__ import annotations

import functools
import signal
import sys

import typer

from safemerge.cli import evaluate, finetune, merge, sweep
from safemerge.errors import SafemergeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Merge a safety-aligned LLM with its fine-tuned version to restore its safety. "
    "λ is always the weight of the fine-tuned model: merged = (1-λ)·aligned + λ·finetuned.",
)


def error_boundary(command):
    """What every command's errors become: a SafemergeError one line on stderr and exit code 1, an
    interrupt (Ctrl-C, SIGTERM) exit code 128 + the signal; with --debug both are raised as they are."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SafemergeError as e:
            if kwargs.get("debug"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            if kwargs.get("debug"):
                raise
            typer.echo("error: interrupted; nothing was written", err=True)
            raise typer.Exit(128 + getattr(e, "signum", signal.SIGINT)) from None

    return guarded


COMMANDS = [  # (name, function, examples)
    ("merge", merge.merge, merge.EXAMPLES),
    ("evaluate", evaluate.evaluate, evaluate.EXAMPLES),
    ("sweep", sweep.sweep, sweep.EXAMPLES),
    ("run", sweep.run_config, None),
    ("report", sweep.report, None),
    ("finetune", finetune.finetune, finetune.EXAMPLES),
    ("demo", finetune.demo, None),
    ("methods", merge.methods, None),
]
for name, function, examples in COMMANDS:
    app.command(name, epilog=examples)(error_boundary(function))


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so that temporary output is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="safemerge")


if __name__ == "__main__":
    sys.exit(main())
