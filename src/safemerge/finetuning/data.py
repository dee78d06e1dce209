"""A fine-tune's examples: read from JSONL in the common chat formats, checked against the template, split."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from safemerge.checkpoints.writer import write_file
from safemerge.errors import ConfigError


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the data file
    raw: str  # the line as the user wrote it (kept for train.jsonl / val.jsonl)
    prompt: list[dict]  # messages before the reply
    completion: list[dict]  # [{"role": "assistant", "content": ...}]


def read_examples(path: Path) -> list[Example]:
    """Every non-blank line of a JSONL file, checked and converted; one-line errors name the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data file {path} does not exist; give a JSONL file with --data") from None
    except IsADirectoryError:
        raise ConfigError(f"data file {path} is a directory; give a JSONL file with --data") from None
    except UnicodeDecodeError:
        raise ConfigError(f"data file {path} is not UTF-8 text; give a JSONL file with --data") from None
    except OSError as e:
        raise ConfigError(f"cannot read data file {path}: {e.strerror}") from None
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                              "each line must be one JSON object") from None
        prompt, reply = conversation(row, where)
        examples.append(Example(number, line.strip(), prompt, [{"role": "assistant", "content": reply}]))
    if not examples:
        raise ConfigError(f"data file {path} has no examples; it needs one JSON object per line")
    return examples


FORMATS = "'messages', or 'prompt' and 'response', or 'instruction' and 'output'"


def conversation(row, where: str) -> tuple[list[dict], str]:
    """(messages before the reply, the reply) from any of the three accepted row formats."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object with {FORMATS}, found {type(row).__name__}")
    if "messages" in row:
        return from_messages(row["messages"], where)
    if "prompt" in row or "response" in row:
        prompt, reply = text_fields(row, ("prompt", "response"), where)
        return [{"role": "user", "content": prompt}], reply
    if "instruction" in row or "output" in row:
        instruction, reply = text_fields(row, ("instruction", "output"), where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise ConfigError(f"{where}: field 'input' must be a string")
        return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}], reply
    raise ConfigError(f"{where}: no {FORMATS} field; found {', '.join(map(repr, row)) or 'an empty object'}")


def text_fields(row: dict, names: tuple[str, str], where: str) -> tuple[str, str]:
    for name in names:
        if name not in row:
            raise ConfigError(f"{where}: missing field '{name}' (a row with '{names[0]}' needs '{names[1]}' too)")
        if not isinstance(row[name], str) or not row[name].strip():
            what = "empty assistant turn" if name == names[1] else "empty prompt"
            raise ConfigError(f"{where}: {what}: field '{name}' must be a non-empty string")
    return row[names[0]], row[names[1]]


def from_messages(messages, where: str) -> tuple[list[dict], str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(f"{where}: 'messages' must be a list of at least two messages "
                          "(a user turn, then the assistant's reply)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {i} must be an object with string fields 'role' and 'content'")
    last = messages[-1]
    if last["role"] != "assistant":
        raise ConfigError(f"{where}: the last message must be the assistant's reply (role 'assistant'), "
                          f"found role '{last['role']}'")
    if not last["content"].strip():
        raise ConfigError(f"{where}: empty assistant turn: the last message has no content")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], last["content"]


def check_lengths(examples: list[Example], tokenizer, max_length: int, path: Path) -> None:
    """Render each row through the chat template as TRL will, and refuse rows it would truncate."""
    from jinja2 import TemplateError

    for ex in examples:
        where = f"{path}, line {ex.line}"
        try:
            ids = tokenizer.apply_chat_template(ex.prompt + ex.completion, tokenize=True, return_dict=True,
                                                **template_options(tokenizer))["input_ids"]
        except (TemplateError, ValueError) as e:  # roles or orders the template rejects
            first_line = str(e).splitlines()[0]
            raise ConfigError(f"{where}: the model's chat template cannot render this row: {first_line}") from None
        if len(ids) > max_length:
            raise ConfigError(f"{where}: {len(ids)} tokens with the chat template, over --max-length {max_length}; "
                              "raise --max-length or shorten this row")


def split(examples: list[Example], val_fraction: float, seed: int, path: Path) -> tuple[list[Example], list[Example]]:
    """A seeded random validation split (at least one row when val_fraction > 0); both keep file order."""
    n_val = max(1, round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    if len(examples) - n_val < 1:
        raise ConfigError(f"data file {path} has {len(examples)} example(s), too few to hold out a validation split; "
                          "add rows or pass --val-fraction 0")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def as_dataset(examples: list[Example], tokenizer):
    """The examples as TRL's conversational prompt-completion rows: TRL renders the prompt with the
    generation prompt and puts in the loss only what the full conversation adds after it."""
    from datasets import Dataset

    options = template_options(tokenizer)
    extra = {"chat_template_kwargs": options} if options else {}
    return Dataset.from_list([{"prompt": e.prompt, "completion": e.completion, **extra} for e in examples])


def template_options(tokenizer) -> dict:
    """What the chat template is rendered with. A template with a thinking mode (Qwen3) renders with
    it off, as evaluate prompts by default: its empty think block then ends the prompt (the
    generation prompt) and stays out of the loss, instead of being learnt as the reply's start."""
    from safemerge.backends.generation import has_thinking_mode

    return {"enable_thinking": False} if has_thinking_mode(tokenizer) else {}


def write_rows(path: Path, examples: list[Example]) -> None:
    write_file(path, "".join(e.raw + "\n" for e in examples))
