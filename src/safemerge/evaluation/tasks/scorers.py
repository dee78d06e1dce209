"""Scorers of task responses by name (exact, numeric, bbh, bertscore) and the answer extraction they use."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from safemerge.errors import ConfigError
from safemerge.evaluation.stats import wilson
from safemerge.evaluation.tasks.base import Scorer, TaskItem, TaskScore

# --- answer extraction --------------------------------------------------------------------------

# A number not glued to a preceding word ("H2O", "v3" are not answers): optional sign and "$",
# thousands separators only in groups of three ("1,234"; "3,4" is two numbers), optional decimals.
_NUMBER = re.compile(r"(?<![\w.])([-\u2212])?\$?(\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_ANSWER_MARK = "####"
_BBH_ANSWER = re.compile(r"so the answer is", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_CHOICE = re.compile(r"\(([A-Za-z])\)")


def _canonical_number(sign: str | None, digits: str) -> str:
    value = Decimal(digits.replace(",", ""))
    if sign:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # "3.0" -> "3", "-0" -> "0", no exponent for 1000
    return format(value.normalize(), "f")  # "2.50" -> "2.5"


def extract_number(text: str) -> str | None:
    """The answer number of a GSM8K-style response, canonical ("1,000.0" -> "1000"), or None.

    The first number after the last "####" when there is one, else the last number in the text.
    """
    return number_after_mark(text) or _last_number(text)


def number_after_mark(text: str) -> str | None:
    """The first number after the last "####", or None (no mark, or nothing numeric after it)."""
    if _ANSWER_MARK not in text:
        return None
    match = _NUMBER.search(text.rsplit(_ANSWER_MARK, 1)[1])
    return None if match is None else _canonical_number(match.group(1), match.group(2))


def _last_number(text: str) -> str | None:
    match = next(reversed(list(_NUMBER.finditer(text))), None)
    return None if match is None else _canonical_number(match.group(1), match.group(2))


def _normalise_answer(text: str) -> str:
    """Strip whitespace, trailing '.', a leading ':' and surrounding '**' until nothing changes."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().removesuffix(".").removeprefix(":").strip()
        if text.startswith("**") and text.endswith("**") and len(text) >= 4:
            text = text[2:-2]
        else:
            text = text.removeprefix("**").removesuffix("**")
    return " ".join(text.split())


def extract_bbh_answer(text: str) -> str | None:
    """The text after the last "So the answer is" (any case) up to the end of that sentence
    (a '.' before whitespace or the end, or a newline), normalised; None when the phrase is absent."""
    marks = list(_BBH_ANSWER.finditer(text))
    if not marks:
        return None
    tail = text[marks[-1].end():]
    end = _SENTENCE_END.search(tail)
    answer = _normalise_answer(tail[: end.start()] if end else tail)
    return answer or None


def bbh_matches(extracted: str | None, target: str) -> bool:
    """Case-insensitive, whitespace-normalised equality (as lm-evaluation-harness scores BBH);
    a choice target "(A)" also accepts "A" and "(A) <option text>"."""
    if extracted is None:
        return False
    got, want = " ".join(extracted.split()).casefold(), " ".join(target.split()).casefold()
    choice = _CHOICE.fullmatch(want)
    if choice:
        letter = choice.group(1)
        return got in (want, letter) or got.startswith(want + " ")
    return got == want


# --- scorers ------------------------------------------------------------------------------------


def _first_samples(items: Sequence[TaskItem], responses: Sequence[Sequence[str]]) -> list[str]:
    """The first completion of each item: these scorers judge one answer per item, so with
    num_samples > 1 the extra samples are ignored (sample 0 is the greedy one when sampling is off)."""
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} response lists")
    return [samples[0] if samples else "" for samples in responses]


def _accuracy(items: Sequence[TaskItem], extracted: list[str | None], references: list[str],
              correct: list[bool]) -> TaskScore:
    per_item = [{"id": item.id, "extracted": got, "reference": ref, "correct": ok}
                for item, got, ref, ok in zip(items, extracted, references, correct)]
    return TaskScore(metrics={"accuracy": wilson(sum(correct), len(items))}, primary="accuracy", per_item=per_item)


class NumericScorer:
    """Correct when the response's number (extract_number) equals the reference's as a Decimal."""

    name = "numeric"

    def score(self, items: Sequence[TaskItem], responses: Sequence[Sequence[str]]) -> TaskScore:
        extracted = [extract_number(r) for r in _first_samples(items, responses)]
        references = [extract_number(item.reference) or item.reference.strip() for item in items]
        correct = [got is not None and _same_number(got, ref) for got, ref in zip(extracted, references)]
        return _accuracy(items, extracted, references, correct)


def _same_number(a: str, b: str) -> bool:
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


class ExactMatchScorer:
    """The whole response equals the reference after collapsing whitespace (strip, runs -> one space).
    Case-sensitive by default, since references may be names or code; ignore_case=True relaxes that."""

    name = "exact"

    def __init__(self, ignore_case: bool = False):
        self.ignore_case = ignore_case

    def _normal(self, text: str) -> str:
        text = " ".join(text.split())
        return text.casefold() if self.ignore_case else text

    def score(self, items: Sequence[TaskItem], responses: Sequence[Sequence[str]]) -> TaskScore:
        extracted = [" ".join(r.split()) for r in _first_samples(items, responses)]
        references = [" ".join(item.reference.split()) for item in items]
        correct = [self._normal(got) == self._normal(ref) for got, ref in zip(extracted, references)]
        return _accuracy(items, extracted, references, correct)


class BBHScorer:
    """BIG-Bench-Hard chain of thought: the answer after the last "So the answer is" (bbh_matches)."""

    name = "bbh"

    def score(self, items: Sequence[TaskItem], responses: Sequence[Sequence[str]]) -> TaskScore:
        extracted = [extract_bbh_answer(r) for r in _first_samples(items, responses)]
        references = [item.reference for item in items]
        correct = [bbh_matches(got, ref) for got, ref in zip(extracted, references)]
        return _accuracy(items, extracted, references, correct)


SCORERS = {"exact": ExactMatchScorer, "numeric": NumericScorer, "bbh": BBHScorer}
BERTSCORE_OPTIONS = ("bertscore_model", "bertscore_layer", "bertscore_device")  # for the scorer "bertscore"
FILE_SCORERS = (*SCORERS, "bertscore")


def make_scorer(name: str, bertscore_model: str | None = None, bertscore_layer: int | None = None,
                bertscore_device: str | None = None) -> Scorer:
    if name not in FILE_SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; available: {', '.join(FILE_SCORERS)}")
    if name != "bertscore":
        return SCORERS[name]()
    from safemerge.evaluation.tasks.bertscore import BertScoreScorer  # lazily: bert-score is an optional extra

    chosen = {"model": bertscore_model, "layer": bertscore_layer, "device": bertscore_device}
    return BertScoreScorer(**{k: v for k, v in chosen.items() if v is not None})
