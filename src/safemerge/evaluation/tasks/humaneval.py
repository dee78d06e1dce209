"""HumanEval (Chen et al., 2021): write a Python function from its signature and docstring; scored by
running the problem's unit tests on each sample, as pass@k with the unbiased estimator.

The model gets a chat instruction (INSTRUCTION) followed by the problem's prompt (imports, signature and
docstring) in a ```python block, and is asked for the complete function in a ```python block. From each
response the scorer takes the first ```python block that defines the entry point (else the first block,
else the whole text); code that does not define the entry point at top level is taken as a body-only
completion and appended to the prompt, as in the original harness. The program then run is

    __name__ = "solution"          (so a demo `if __name__ == "__main__":` block does not run)
    <code>
    <test>
    check(<entry_point>)

in the sandbox (safemerge.evaluation.tasks.sandbox), and only when code execution was allowed explicitly.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safemerge.errors import ConfigError, hub_errors
from safemerge.evaluation.stats import bootstrap_mean
from safemerge.evaluation.tasks.base import Task, TaskItem, TaskScore
from safemerge.evaluation.tasks.sandbox import ExecResult, run_programs

HUB_ID = "openai/openai_humaneval"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
CODE_EXECUTION_REFUSED = (
    "HumanEval runs model-written code: pass --allow-code-execution to allow it "
    "(each program runs in its own subprocess with time and memory limits)"
)
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, its signature and the imports "
    "it needs included, in a single ```python code block."
)
SOLUTION_MODULE = "solution"
FENCED_CODE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples contains a passing one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_humaneval(path: str | None, *, samples: int = 1, temperature: float = 0.8, ks: tuple[int, ...] = (1,),
                   allow_code_execution: bool = False, timeout: float = 10.0, memory_mb: int = 1024) -> Task:
    """The HumanEval task from a .jsonl / .jsonl.gz file (the original HumanEval.jsonl.gz), or from the Hub."""
    if not allow_code_execution:
        raise ConfigError(CODE_EXECUTION_REFUSED)
    ks = tuple(ks)
    _check_settings(samples, temperature, ks, timeout, memory_mb)
    rows = _read_file(Path(path)) if path else _read_hub()
    items = tuple(_item(row) for row in rows)
    scorer = HumanEvalScorer(ks=ks, allow_code_execution=True, timeout=timeout, memory_mb=memory_mb)
    return Task(
        name="humaneval",
        source=str(path) if path else HUB_ID,
        items=items,
        scorer=scorer,
        generation={"do_sample": samples > 1, "temperature": temperature, "num_samples": samples},
        system_prompt=True,
    )


def _check_settings(samples: int, temperature: float, ks: tuple[int, ...], timeout: float, memory_mb: int) -> None:
    if samples < 1:
        raise ConfigError(f"HumanEval samples must be at least 1, got {samples}")
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"HumanEval k values must be at least 1, got {list(ks)}")
    too_large = [k for k in ks if k > samples]
    if too_large:
        raise ConfigError(f"pass@{too_large[0]} needs at least {too_large[0]} samples per problem, but samples is "
                          f"{samples}: raise --samples or drop that k from --pass-k")
    if temperature <= 0:
        raise ConfigError(f"HumanEval temperature must be positive, got {temperature}")
    if timeout <= 0 or memory_mb <= 0:
        raise ConfigError(f"HumanEval timeout and memory limit must be positive, got {timeout} s and {memory_mb} MB")


def _read_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give the HumanEval problems as .jsonl or .jsonl.gz "
                          "(HumanEval.jsonl.gz of github.com/openai/human-eval)")
    rows: list[dict] = []
    seen: set[str] = set()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    rows.append(_parse_row(line, f"{path}, line {number}", seen))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as {'gzip-compressed ' if opener is gzip.open else ''}"
                          f"UTF-8 JSON lines ({e})") from e
    if not rows:
        raise ConfigError(f"{path}: no HumanEval problems in the file")
    return rows


def _parse_row(line: str, where: str, seen: set[str]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    return _checked_row(row, where, seen)


def _checked_row(row, where: str, seen: set[str]) -> dict:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}")
    for name in FIELDS:
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise ConfigError(f"{where}: field {name!r} is missing or not a non-empty string "
                              f"(HumanEval rows need {', '.join(FIELDS)})")
    if not row["entry_point"].isidentifier():
        raise ConfigError(f"{where}: field 'entry_point' is {row['entry_point']!r}, not a Python function name")
    if row["task_id"] in seen:
        raise ConfigError(f"{where}: task_id {row['task_id']!r} appears twice")
    seen.add(row["task_id"])
    return row


def _read_hub() -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"HumanEval without a PATH is read from the Hub ({HUB_ID}) with the `datasets` package, "
                          "which is not installed: pip install datasets, or give the file: humaneval:PATH") from e
    try:
        dataset = datasets.load_dataset(HUB_ID, split="test")
    except hub_errors() as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot load {HUB_ID} from the Hub ({cause}); give the file instead: humaneval:PATH") from e
    seen: set[str] = set()
    return [_checked_row(dict(row), f"{HUB_ID}, row {number}", seen) for number, row in enumerate(dataset)]


def _item(row: dict) -> TaskItem:
    return TaskItem(
        id=row["task_id"],
        prompt=f"{INSTRUCTION}\n\n```python\n{row['prompt'].rstrip()}\n```",
        reference=row["test"],
        data={"entry_point": row["entry_point"], "prompt": row["prompt"],
              "canonical_solution": row["canonical_solution"]},
    )


def extract_code(response: str, prompt: str, entry_point: str) -> str:
    """The program text of a response: a ```python block if any, completed by the prompt if body-only."""
    blocks = FENCED_CODE.findall(response)
    if blocks:
        code = next((block for block in blocks if _defines(block, entry_point)), blocks[0])
    else:
        code = response
    return code if _defines(code, entry_point) else prompt + code


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", code, re.MULTILINE) is not None


def build_program(code: str, test: str, entry_point: str) -> str:
    """The program the sandbox runs: the solution, the problem's tests, and the call of check."""
    return f"__name__ = {SOLUTION_MODULE!r}\n" + code + "\n\n" + test + f"\n\ncheck({entry_point})\n"


@dataclass(frozen=True)
class HumanEvalScorer:
    """Runs every sample's program in the sandbox; pass@k per k, with a bootstrap interval over problems."""

    ks: tuple[int, ...] = (1,)
    allow_code_execution: bool = False
    timeout: float = 10.0
    memory_mb: int = 1024
    workers: int | None = None  # parallel programs; default one per CPU
    name: str = field(default="humaneval", init=False)

    def score(self, items: Sequence[TaskItem], responses: Sequence[Sequence[str]]) -> TaskScore:
        if not self.allow_code_execution:
            raise ConfigError(CODE_EXECUTION_REFUSED)
        if len(items) != len(responses):
            raise ValueError(f"{len(items)} HumanEval items but responses for {len(responses)}")
        for item, samples in zip(items, responses):
            if len(samples) < max(self.ks):
                raise ValueError(f"{item.id}: {len(samples)} samples, pass@{max(self.ks)} needs {max(self.ks)}")
        programs = [build_program(extract_code(response, item.data["prompt"], item.data["entry_point"]),
                                  item.reference, item.data["entry_point"])
                    for item, samples in zip(items, responses) for response in samples]
        results = iter(run_programs(programs, timeout=self.timeout, memory_mb=self.memory_mb, workers=self.workers))
        per_item = [_item_record(item, [next(results) for _ in samples]) for item, samples in zip(items, responses)]
        metrics = {
            f"pass@{k}": bootstrap_mean([pass_at_k(r["samples"], r["passed"], k) for r in per_item], seed=0)
            for k in self.ks
        }
        return TaskScore(metrics=metrics, primary=f"pass@{self.ks[0]}", per_item=per_item)


def _item_record(item: TaskItem, results: list[ExecResult]) -> dict:
    statuses = [result.status for result in results]
    return {"id": item.id, "passed": statuses.count("passed"), "samples": len(statuses), "statuses": statuses}
