"""Tasks by name: a spec such as gsm8k[:PATH] or file:PATH[:SCORER] is looked up here."""

from __future__ import annotations

from collections.abc import Callable

from safemerge.errors import ConfigError
from safemerge.evaluation.prompts import split_path_option
from safemerge.evaluation.tasks.base import Task
from safemerge.evaluation.tasks.builtin import load_bbh, load_file_task, load_gsm8k
from safemerge.evaluation.tasks.scorers import BERTSCORE_OPTIONS

HUMANEVAL_OPTIONS = ("samples", "temperature", "ks", "allow_code_execution", "timeout", "memory_mb")


def _gsm8k(path: str | None, options: dict) -> Task:
    return load_gsm8k(path, split=options.get("split") or "test")


def _humaneval(path: str | None, options: dict) -> Task:
    from safemerge.evaluation.tasks.humaneval import load_humaneval  # lazily: only this task needs the sandbox

    return load_humaneval(path, **{k: v for k, v in options.items() if k in HUMANEVAL_OPTIONS and v is not None})


def _bbh(path: str, options: dict) -> Task:
    return load_bbh(*split_path_option(path))


def _file(path: str, options: dict) -> Task:
    file, scorer = split_path_option(path)
    return load_file_task(file, scorer or "exact", **{k: v for k, v in options.items() if k in BERTSCORE_OPTIONS})


# name -> (loader, usage, whether PATH is required)
TASKS: dict[str, tuple[Callable[[str | None, dict], Task], str, bool]] = {
    "gsm8k": (_gsm8k, "gsm8k[:PATH]", False),
    "bbh": (_bbh, "bbh:PATH[:TASK]", True),
    "humaneval": (_humaneval, "humaneval[:PATH]", False),
    "file": (_file, "file:PATH[:SCORER]", True),
}
KNOWN_TASKS = ", ".join(usage for _, usage, _ in TASKS.values())


def load_task(spec: str, **options) -> Task:
    """A task from its spec: gsm8k[:PATH], bbh:PATH[:TASK], humaneval[:PATH], file:PATH[:SCORER].

    options: split (gsm8k); samples, temperature, ks, allow_code_execution, timeout, memory_mb
    (humaneval; None means the loader's default); bertscore_model, bertscore_layer (file:PATH:bertscore).
    Options a task does not use are ignored, so one set of options can serve every task."""
    unknown = set(options) - {"split", *HUMANEVAL_OPTIONS, *BERTSCORE_OPTIONS}
    if unknown:
        raise TypeError(f"load_task got unknown options: {', '.join(sorted(unknown))}")
    name, _, rest = spec.partition(":")
    name, path = name.strip().lower(), rest or None
    if name not in TASKS:
        raise ConfigError(f"unknown task {spec!r}; available: {KNOWN_TASKS}")
    loader, usage, needs_path = TASKS[name]
    if needs_path and path is None:
        raise ConfigError(f"{name}: needs a path: {usage}")
    return loader(path, options)
