"""Task data and scorers: what the fine-tune is for, scored on the model's responses."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Protocol

from .errors import ConfigError
from .prompts import existing_file, field_text, hub_rows, read_jsonl, split_path_option
from .stats import Estimate, wilson


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


# --- loaders ------------------------------------------------------------------------------------

KNOWN_TASKS = "gsm8k[:PATH], bbh:PATH[:TASK], humaneval[:PATH], file:PATH[:SCORER]"
GSM8K_HUB, GSM8K_CONFIG = "openai/gsm8k", "main"
# appended to each question after a blank line; the "####" line is what extract_number reads first
GSM8K_INSTRUCTION = 'Solve the problem step by step, then give the final answer on the last line as "#### <number>".'
BBH_QUESTION = "\n\nQ: {input}\nA: Let's think step by step."  # appended to the 3-shot CoT prompt
HUMANEVAL_OPTIONS = ("samples", "temperature", "ks", "allow_code_execution", "timeout", "memory_mb")
BERTSCORE_OPTIONS = ("bertscore_model", "bertscore_layer", "bertscore_device")  # for the file scorer "bertscore"
FILE_SCORERS = (*SCORERS, "bertscore")


def _nonempty(task: Task) -> Task:
    if not task.items:
        raise ConfigError(f"{task.source}: no items found for the task {task.name}")
    return task


def load_gsm8k(path: str | None, *, split: str = "test") -> Task:
    """GSM8K: JSONL with question/answer (the reference is the number after "####"); PATH may be
    the file or a folder holding {split}.jsonl; without PATH the Hub dataset openai/gsm8k (main)."""
    if path is None:
        source = GSM8K_HUB
        rows = [(f"row {i}", row) for i, row in enumerate(hub_rows(GSM8K_HUB, split, GSM8K_CONFIG))]
    else:
        folder = Path(path)
        file = existing_file(folder / f"{split}.jsonl" if folder.is_dir() else folder, "GSM8K file")
        source, rows = str(file), read_jsonl(file)
    items = []
    for i, (where, row) in enumerate(rows):
        question = field_text(source, where, row, "question").strip()
        answer = field_text(source, where, row, "answer")
        reference = number_after_mark(answer)
        if reference is None:
            raise ConfigError(f"{source} {where}: field 'answer' has no '#### <number>' final answer")
        items.append(TaskItem(f"gsm8k/{i}", f"{question}\n\n{GSM8K_INSTRUCTION}", reference))
    return _nonempty(Task("gsm8k", source, tuple(items), NumericScorer()))


def read_cot_prompt(file: Path) -> str:
    """A BBH chain-of-thought prompt without its header (the canary line and the "-----" separator)."""
    try:
        lines = file.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise ConfigError(f"cannot read {file}: {e.strerror}") from None
    separator = next((k for k, line in enumerate(lines[:3]) if line.strip() == "-----"), None)
    body = lines[separator + 1:] if separator is not None else [x for x in lines if "canary GUID" not in x]
    return "\n".join(body).strip()


def bbh_subtasks(root: Path) -> list[str]:
    if not (root / "bbh").is_dir() or not (root / "cot-prompts").is_dir():
        raise ConfigError(f"{root} is not a BIG-Bench-Hard folder: it needs bbh/*.json and cot-prompts/*.txt "
                          "(a checkout of github.com/suzgunmirac/BIG-Bench-Hard)")
    return sorted(f.stem for f in (root / "bbh").glob("*.json"))


def _bbh_items(root: Path, subtask: str) -> list[TaskItem]:
    data_file, cot_file = root / "bbh" / f"{subtask}.json", root / "cot-prompts" / f"{subtask}.txt"
    if not cot_file.is_file():
        raise ConfigError(f"{cot_file} is missing: every BBH subtask needs its chain-of-thought prompt")
    cot = read_cot_prompt(cot_file)
    try:
        examples = json.loads(data_file.read_text(encoding="utf-8"))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{data_file} is not a BBH task file (a JSON object with 'examples'): {e}") from None
    items = []
    for i, example in enumerate(examples):
        where = f"example {i}"
        question, target = field_text(data_file, where, example, "input"), field_text(data_file, where, example, "target")
        items.append(TaskItem(f"{subtask}/{i}", cot + BBH_QUESTION.format(input=question), target.strip(),
                              {"subtask": subtask}))
    return items


def load_bbh(path: str, task: str | None = None) -> Task:
    """BIG-Bench-Hard with its 3-shot chain-of-thought prompts: one subtask, or all when task is None."""
    root = Path(path)
    available = bbh_subtasks(root)
    if task is not None and task not in available:
        raise ConfigError(f"unknown BBH subtask {task!r} in {root}; available: {', '.join(available)}")
    chosen = [task] if task is not None else available
    items = tuple(item for subtask in chosen for item in _bbh_items(root, subtask))
    name = f"bbh/{task}" if task is not None else "bbh"
    return _nonempty(Task(name, str(root), items, BBHScorer(), system_prompt=False))


def load_file_task(path: str, scorer: str = "exact", **bertscore_options) -> Task:
    """A user's task: JSONL of {"prompt", "reference"} (+ optional "id") scored by exact, numeric, bbh
    or bertscore (bertscore_model / bertscore_layer choose its model and layer). Rows in the
    formats `safemerge finetune` reads (`messages`, `prompt`/`response`, `instruction`/`output`)
    work too, so the validation split a fine-tune keeps (OUT/val.jsonl) can choose λ as it is."""
    if scorer not in FILE_SCORERS:
        raise ConfigError(f"unknown scorer {scorer!r} for {path}; available: {', '.join(FILE_SCORERS)}")
    file = existing_file(path, "task file")
    items, seen = [], set()
    for i, (where, row) in enumerate(read_jsonl(file)):
        prompt, reference = prompt_and_reference(file, where, row)
        if scorer == "numeric" and extract_number(reference) is None:
            raise ConfigError(f"{file} {where}: the reference holds no number, which the numeric scorer needs")
        item_id = str(row["id"]) if row.get("id") is not None else f"{file.stem}/{i}"
        if item_id in seen:
            raise ConfigError(f"{file} {where}: id {item_id!r} appears twice; ids must be unique")
        seen.add(item_id)
        items.append(TaskItem(item_id, prompt, reference))
    return _nonempty(Task(f"file:{file.name}", str(file), tuple(items), make_scorer(scorer, **bertscore_options)))


def prompt_and_reference(file: Path, where: str, row: dict) -> tuple[str, str]:
    if "messages" in row and isinstance(row["messages"], list):
        turns = [m for m in row["messages"] if isinstance(m, dict)]
        users = [m for m in turns if m.get("role") == "user"]
        if not users or not turns or turns[-1].get("role") != "assistant":
            raise ConfigError(f"{file} {where}: `messages` needs a user turn and must end with the assistant's reply")
        return field_text(file, where, users[-1], "content"), field_text(file, where, turns[-1], "content")
    if "instruction" in row:
        extra = row.get("input")
        prompt = field_text(file, where, row, "instruction") + (f"\n\n{extra}" if extra else "")
        return prompt, field_text(file, where, row, "output")
    answer = "response" if "response" in row and "reference" not in row else "reference"
    return field_text(file, where, row, "prompt"), field_text(file, where, row, answer)


def make_scorer(name: str, bertscore_model: str | None = None, bertscore_layer: int | None = None,
                bertscore_device: str | None = None) -> Scorer:
    if name != "bertscore":
        return SCORERS[name]()
    from .bertscore import BertScoreScorer  # lazily: bert-score is an optional extra

    chosen = {"model": bertscore_model, "layer": bertscore_layer, "device": bertscore_device}
    return BertScoreScorer(**{k: v for k, v in chosen.items() if v is not None})


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
    if name == "gsm8k":
        return load_gsm8k(path, split=options.get("split") or "test")
    if name == "humaneval":
        from .humaneval import load_humaneval  # lazily: only this task needs it

        chosen = {k: v for k, v in options.items() if k in HUMANEVAL_OPTIONS and v is not None}
        return load_humaneval(path, **chosen)
    if name in ("bbh", "file") and path is None:
        raise ConfigError(f"{name}: needs a path: {'bbh:PATH[:TASK]' if name == 'bbh' else 'file:PATH[:SCORER]'}")
    if name == "bbh":
        return load_bbh(*split_path_option(path))
    if name == "file":
        file, scorer = split_path_option(path)
        chosen = {k: v for k, v in options.items() if k in BERTSCORE_OPTIONS}
        return load_file_task(file, scorer or "exact", **chosen)
    raise ConfigError(f"unknown task {spec!r}; known: {KNOWN_TASKS}")
