"""The built-in tasks: GSM8K, BIG-Bench-Hard and a user's JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

from safemerge.errors import ConfigError
from safemerge.evaluation.prompts import existing_file, field_text, hub_rows, read_jsonl
from safemerge.evaluation.tasks.base import Task, TaskItem
from safemerge.evaluation.tasks.scorers import (
    FILE_SCORERS,
    BBHScorer,
    NumericScorer,
    extract_number,
    make_scorer,
    number_after_mark,
)

# --- loaders ------------------------------------------------------------------------------------

GSM8K_HUB, GSM8K_CONFIG = "openai/gsm8k", "main"
# appended to each question after a blank line; the "####" line is what extract_number reads first
GSM8K_INSTRUCTION = 'Solve the problem step by step, then give the final answer on the last line as "#### <number>".'
BBH_QUESTION = "\n\nQ: {input}\nA: Let's think step by step."  # appended to the 3-shot CoT prompt


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
