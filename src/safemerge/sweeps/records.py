"""The schema of what a sweep writes: each trial's record (RUN/trials/KEY/trial.json) and the run's
results (RUN/results.json). Both are written and read through these models, so a record that lacks a
field or carries a stray one is caught where it is read, with the file and the field named.

Optional fields are left out of a record when they were never set (an XSTest part has no ASR, an ASR
part no over-refusal): records are dumped with ``exclude_unset``, so the files hold what was measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from safemerge.errors import ConfigError


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Estimate(Record):
    """A rate or mean with its 95% interval (value null: nothing could be measured)."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    interval: str


class CategoryRate(Record):
    asr: Estimate
    n: int
    parse_errors: int


class Look(Record):
    n: int  # prompts judged so far
    worse: int
    better: int
    statistic: float  # Tango's Z at the margin
    decision: Literal["pass", "fail", "continue"]


class Sequential(Record):
    """An adaptive merge's group-sequential paired test (sweeps/adaptive.py)."""

    alpha: float
    margin: float
    looks: list[int]  # planned cumulative sizes
    efficacy: list[float | None]  # pass when Z <= -c (null: no pass possible at that look)
    futility: list[float | None]  # fail when Z >= b
    spending: str
    order_seed: int
    steps: list[Look]  # the looks taken
    decision: Literal["pass", "fail"]


class SafetyPart(Record):
    """One part (selection or report) of one safety set, as judged."""

    sha256: str
    n: int
    cache_hits: int
    asr: Estimate | None = None  # harmful sets
    over_refusal: Estimate | None = None  # XSTest
    unsafe_compliance: Estimate | None = None
    n_safe: int | None = None
    n_unsafe: int | None = None
    parse_errors: int
    miss_rate: float | None = None
    refusal_rate: Estimate | None = None
    by_category: dict[str, CategoryRate] | None = None
    judge: str
    verdicts: str | None = None  # one character per prompt, for the paired test (harmful sets); - not judged
    judged: int | None = None  # adaptive: prompts judged before the test decided (of n)
    sequential: Sequential | None = None


class TaskScore(Record):
    primary: str
    metrics: dict[str, Estimate]
    n: int


class TaskScores(Record):
    val: dict[str, TaskScore]
    test: dict[str, TaskScore]


class TrialRecord(Record):
    key: str
    kind: Literal["aligned", "finetuned", "merge"]
    method: str
    lam: float | None
    density: float | None
    seed: int | None
    finetuned: list[str]
    label: str
    fingerprint: str
    generated_by: str
    safety: dict[str, dict[str, SafetyPart]]  # set -> "selection" / "report" -> part
    tasks: TaskScores
    val_score: float | None
    test_score: float | None
    seconds: dict[str, float]
    # how the chat template placed the system prompt: system_turn, template_folds, folded_into_user
    system_prompt: str | None = None


class MeanSd(Record):
    mean: float | None
    sd: float | None


class AsrSummary(MeanSd):
    max_upper: float | None


class Group(Record):
    """One merge setting (method, λ, density) over its seeds."""

    method: str
    lam: float | None
    density: float | None
    label: str
    n_seeds: int
    trials: list[str]
    val_score: MeanSd
    test_score: MeanSd
    asr_selection: dict[str, AsrSummary]
    qualifies: bool
    why_not: str | None


class Chosen(Record):
    kind: Literal["aligned", "merge"]
    method: str | None
    lam: float | None
    density: float | None
    seed: int | None
    trial: str
    label: str | None


class MethodBest(Record):
    lam: float | None
    density: float | None
    trial: str
    qualifies: bool
    label: str


class Choice(Record):
    policy: Literal["constrained", "paper"]
    max_asr_increase: float
    confidence: float
    test: str
    aligned: str
    chosen: Chosen
    reason: str
    groups: list[Group]
    best_per_method: dict[str, MethodBest]


class RefineStep(Record):
    phase: Literal["refine"]
    method: str
    seed: int | None
    lam: float
    meets: bool
    asr_upper: dict[str, float | None]
    trial: str


class BisectStep(Record):
    phase: Literal["bisect"]
    method: str
    seed: int | None
    lam: float
    meets: bool
    asr: dict[str, Estimate | None]
    trial: str
    asr_upper: dict[str, float | None]


class PrunedTrial(Record):
    """A grid trial the adaptive sweep did not run: a smaller λ of its method failed the safety test."""

    method: str
    lam: float
    seed: int | None
    reason: str


class SweepResults(Record):
    safemerge_version: str
    created: str
    command: str | None
    config: dict[str, Any]  # the sweep's settings, spelled flat (SweepConfig reads them back)
    trials: list[TrialRecord]
    search_log: list[Annotated[RefineStep | BisectStep, Field(discriminator="phase")]]
    monotonicity_breaches: list[str]
    pruned: list[PrunedTrial] = []  # adaptive grid only
    choice: Choice
    reproduce: str | None
    merged: str | None


def checked(schema: type[Record], data, where: Path | str) -> dict:
    """DATA as the schema writes it (the same keys, in the schema's order), or one line naming the field."""
    try:
        return schema.model_validate(data).model_dump(mode="json", exclude_unset=True)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "the record"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{where}: {field}: {err['msg']}{more}; was it edited by hand? rerun the sweep with the "
                          "same command to write it again") from None
