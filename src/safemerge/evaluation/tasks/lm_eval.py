"""lm-evaluation-harness tasks run on a live model object, so a sweep can score an in-memory merge.

Each task (and each group the harness aggregates) becomes a TaskScore:
- metrics: every metric the harness reports, named as the harness names it without the ",none" filter
  suffix ("acc", "exact_match,strict-match"); value ± 1.96·stderr (z of 0.975; the harness's stderr), clipped to the
  metric's range, interval kind "normal"; without a stderr (one sample, bootstrap_iters=0) the bounds are nan.
- primary: "acc" for loglikelihood and multiple-choice tasks; "exact_match" under the task's first filter
  for generate-until tasks; otherwise (or when absent) the task's first reported metric. Mind that some
  of those (perplexities, ter) are lower-is-better.
- per_item: the harness's logged samples under the primary metric's filter.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safemerge.errors import ConfigError
from safemerge.evaluation.stats import Estimate, z_score
from safemerge.evaluation.tasks.base import TaskScore

MISSING_PACKAGE = "lm-evaluation-harness tasks need the lm-eval package: pip install 'safemerge[lm-eval]'"
PREFERRED = {"multiple_choice": "acc", "loglikelihood": "acc", "generate_until": "exact_match"}
UNIT_METRICS = ("acc", "exact_match", "em", "f1", "mc1", "mc2", "pass@", "prompt_level", "inst_level")
HUNDRED_METRICS = ("bleu", "chrf", "rouge")
UNBOUNDED_ABOVE = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter")


def run_lm_eval(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 1,
                include_path: str | None = None, num_fewshot: int | None = None, seed: int = 0,
                bootstrap_iters: int = 1000, apply_chat_template: bool = False) -> dict[str, TaskScore]:
    """Evaluate a loaded transformers model on harness tasks; {task name: TaskScore}.

    The model is used as it is (its device and dtype), never copied; the tokenizer is copied, since the
    harness may give it a pad token. ``bootstrap_iters`` only matters for the harness's bootstrapped
    metrics (bleu, f1, mcc, ...): means use the closed form. Seeds Python, numpy and torch globally.
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(MISSING_PACKAGE)
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ConfigError("no lm-eval tasks given: name at least one harness task")
    if limit is not None and limit < 1:
        raise ConfigError(f"lm-eval limit must be at least 1, got {limit}")
    task_manager = _task_manager(names, include_path)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=harness_model, tasks=names, task_manager=task_manager, limit=limit, num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters, log_samples=True, apply_chat_template=apply_chat_template,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as error:  # the datasets library, offline without a cached copy
        raise ConfigError(f"lm-eval could not fetch the data of {', '.join(names)} ({error}): "
                          "run once with network access so the datasets cache holds it") from error
    return _task_scores(results)


def check_tasks(names: Sequence[str], include_path: str | None = None) -> None:
    """Refuse a missing package or an unknown task before any model is loaded."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(MISSING_PACKAGE)
    _task_manager(list(names), include_path)


def _task_manager(names: list[str], include_path: str | None):
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"lm-eval include_path {include_path} is not a directory: give the folder of your task YAMLs")
    manager = _indexed_tasks(str(Path(include_path).resolve()) if include_path else None)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown lm-eval task {name!r}{hint}: use a task name of lm-evaluation-harness "
                              "or a task YAML under include_path")
    return manager


@functools.lru_cache(maxsize=4)
def _indexed_tasks(include_path: str | None):
    """The harness's task index (~6 s to build over its ~15k YAMLs), kept for the next trial of a sweep;
    task YAMLs added to include_path later in the same process are not seen."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _task_scores(results: dict[str, Any]) -> dict[str, TaskScore]:
    scores = {}
    for task, reported in results["results"].items():
        n = _sample_count(task, results)
        metrics = _metrics(reported, n)
        if not metrics:  # a group the harness lists without aggregating
            continue
        primary = _primary(metrics, _output_type(task, results))
        samples = results.get("samples", {}).get(task, [])
        scores[task] = TaskScore(metrics=metrics, primary=primary, per_item=_per_item(samples, primary))
    return scores


def _metrics(reported: dict[str, Any], n: int) -> dict[str, Estimate]:
    metrics = {}
    for key, value in reported.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else key
        stderr = reported.get(f"{metric}_stderr,{filter_name}")
        metrics[name] = _estimate(metric, float(value), stderr, n)
    return metrics


def _estimate(metric: str, value: float, stderr: Any, n: int) -> Estimate:
    if not isinstance(stderr, (int, float)) or math.isnan(stderr):
        return Estimate(value, math.nan, math.nan, n, "normal")
    low_bound, high_bound = _metric_range(metric)
    half = z_score(0.95) * float(stderr)
    return Estimate(value, max(low_bound, value - half), min(high_bound, value + half), n, "normal")


def _metric_range(metric: str) -> tuple[float, float]:
    if metric == "mcc":
        return -1.0, 1.0
    if metric.startswith(UNIT_METRICS):
        return 0.0, 1.0
    if metric.startswith(HUNDRED_METRICS):
        return 0.0, 100.0
    if metric in UNBOUNDED_ABOVE:
        return 0.0, math.inf
    return -math.inf, math.inf


def _primary(metrics: dict[str, Estimate], output_type: str | None) -> str:
    preferred = PREFERRED.get(output_type or "")
    if preferred:
        for name in metrics:  # in the harness's order: the task's first filter comes first
            if name.split(",", 1)[0] == preferred:
                return name
    return next(iter(metrics))


def _output_type(task: str, results: dict[str, Any]) -> str | None:
    """The task's output type; for a group, that of its first task."""
    configs, children = results.get("configs", {}), results.get("group_subtasks", {})
    while task not in configs and children.get(task):
        task = children[task][0]
    return configs.get(task, {}).get("output_type")


def _sample_count(task: str, results: dict[str, Any]) -> int:
    """Samples scored: the task's own, or for a group the sum over its tasks."""
    counts = results.get("n-samples", {})
    if task in counts:
        return int(counts[task]["effective"])
    return sum(_sample_count(child, results) for child in results.get("group_subtasks", {}).get(task, []))


def _per_item(samples: list[dict], primary: str) -> list[dict]:
    filter_name = primary.partition(",")[2] or "none"
    records = []
    for sample in samples:
        if sample.get("filter", "none") != filter_name:
            continue
        response = sample.get("filtered_resps")
        if isinstance(response, list) and len(response) == 1 and isinstance(response[0], str):
            response = response[0]  # a generation; multiple-choice responses stay [loglikelihood, is_greedy] pairs
        record = {"id": str(sample["doc_id"]), "target": _jsonable(sample.get("target")),
                  "response": _jsonable(response)}
        record.update({m: _jsonable(sample[m]) for m in sample.get("metrics", []) if m in sample})
        records.append(record)
    return records


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
