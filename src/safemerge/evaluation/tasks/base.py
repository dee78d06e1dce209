"""What a task is: its items, the scores of a model's responses, and the scorer protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from safemerge.evaluation.stats import Estimate


@dataclass(frozen=True)
class TaskItem:
    id: str
    prompt: str  # the user turn sent to the model (few-shot examples included)
    reference: str  # the expected answer (for code: the test program)
    data: dict = field(default_factory=dict)  # what else a scorer needs (HumanEval: entry_point, ...)


@dataclass
class TaskScore:
    metrics: dict[str, Estimate]  # e.g. {"accuracy": ...} or {"pass@1": ..., "pass@10": ...}
    primary: str  # the metric the sweep optimises
    per_item: list[dict]  # one JSON-able record per item (extracted answer, correct, ...)


class Scorer(Protocol):
    name: str

    def score(self, items: Sequence[TaskItem], responses: Sequence[Sequence[str]]) -> TaskScore:
        """responses[i] holds the completions (num_samples of them) of items[i]."""


@dataclass(frozen=True)
class Task:
    name: str  # e.g. "gsm8k", "bbh/date_understanding"
    source: str  # the path or Hub id it was read from
    items: tuple[TaskItem, ...]
    scorer: Scorer
    # overrides of the generation settings this task needs (HumanEval sampling: do_sample, num_samples)
    generation: dict = field(default_factory=dict)
    system_prompt: bool = True  # False: the task's prompt stands alone (few-shot formats)
