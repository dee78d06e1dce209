"""HumanEval: the pass@k estimator, the loader's checks, and the scorer end to end in the real sandbox."""

from __future__ import annotations

import gzip
import json
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from safemerge.errors import ConfigError
from safemerge.evaluation.tasks.humaneval import (
    CODE_EXECUTION_REFUSED,
    HUB_ID,
    INSTRUCTION,
    HumanEvalScorer,
    extract_code,
    load_humaneval,
    pass_at_k,
)

HUMANEVAL = Path(__file__).parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"

# two small problems in the HumanEval format, so the scorer runs without ../shared
MINI = [
    {
        "task_id": "Mini/0",
        "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(2, 3)\n    5\n    """\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "Mini/1",
        "prompt": 'def is_palindrome(text: str) -> bool:\n    """True when text reads the same backwards."""\n',
        "canonical_solution": "    return text == text[::-1]\n",
        "test": "def check(candidate):\n    assert candidate('abba')\n    assert not candidate('abc')\n"
                "    assert candidate('')\n",
        "entry_point": "is_palindrome",
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


# ---------------------------------------------------------------- pass@k


def test_pass_at_k_matches_the_exact_binomial_form():
    cases = [(n, c, k) for n in range(1, 21) for c in range(n + 1) for k in range(1, n + 1)]
    cases += [(200, 1, 1), (200, 1, 100), (200, 3, 10), (200, 199, 1), (1000, 7, 100)]
    for n, c, k in cases:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_special_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # any 3 of 5 contain a passing one when only 2 fail
    for n, c, k in [(3, 1, 4), (3, 4, 1), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ---------------------------------------------------------------- loading


def test_loading_needs_code_execution_allowed(tmp_path):
    path = write_jsonl(tmp_path / "mini.jsonl", MINI)
    with pytest.raises(ConfigError) as error:
        load_humaneval(str(path))
    assert str(error.value) == CODE_EXECUTION_REFUSED
    assert "--allow-code-execution" in str(error.value)


def test_scoring_needs_code_execution_allowed(tmp_path):
    task = load_humaneval(str(write_jsonl(tmp_path / "mini.jsonl", MINI)), allow_code_execution=True)
    with pytest.raises(ConfigError, match="--allow-code-execution"):
        HumanEvalScorer().score(task.items, [["    return a + b\n"], ["    return True\n"]])


def test_k_larger_than_samples_is_refused(tmp_path):
    path = str(write_jsonl(tmp_path / "mini.jsonl", MINI))
    with pytest.raises(ConfigError, match=r"pass@10 needs at least 10 samples"):
        load_humaneval(path, samples=5, ks=(1, 10), allow_code_execution=True)
    with pytest.raises(ConfigError, match="at least 1"):
        load_humaneval(path, samples=5, ks=(0,), allow_code_execution=True)


@pytest.mark.parametrize("name", ["mini.jsonl", "mini.jsonl.gz"])
def test_task_from_file(tmp_path, name):
    path = write_jsonl(tmp_path / name, MINI)
    task = load_humaneval(str(path), allow_code_execution=True)
    assert (task.name, task.source, task.system_prompt) == ("humaneval", str(path), True)
    assert task.generation == {"do_sample": False, "temperature": 0.8, "num_samples": 1}
    first = task.items[0]
    assert [item.id for item in task.items] == ["Mini/0", "Mini/1"]
    assert first.prompt == f"{INSTRUCTION}\n\n```python\n{MINI[0]['prompt'].rstrip()}\n```"
    assert first.reference == MINI[0]["test"]
    assert first.data == {"entry_point": "add", "prompt": MINI[0]["prompt"],
                          "canonical_solution": MINI[0]["canonical_solution"]}
    sampled = load_humaneval(str(path), samples=10, temperature=0.2, ks=(1, 10), allow_code_execution=True)
    assert sampled.generation == {"do_sample": True, "temperature": 0.2, "num_samples": 10}
    assert sampled.scorer.ks == (1, 10)


def test_bad_files_name_file_line_and_field(tmp_path):
    allowed = {"allow_code_execution": True}
    with pytest.raises(ConfigError, match="no such file"):
        load_humaneval(str(tmp_path / "absent.jsonl"), **allowed)

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(MINI[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match=rf"{bad_json}, line 2: not valid JSON"):
        load_humaneval(str(bad_json), **allowed)

    no_test = write_jsonl(tmp_path / "no_test.jsonl", [MINI[0], {k: v for k, v in MINI[1].items() if k != "test"}])
    with pytest.raises(ConfigError, match=rf"{no_test}, line 2: field 'test' is missing"):
        load_humaneval(str(no_test), **allowed)

    twice = write_jsonl(tmp_path / "twice.jsonl", [MINI[0], MINI[0]])
    with pytest.raises(ConfigError, match="line 2: task_id 'Mini/0' appears twice"):
        load_humaneval(str(twice), **allowed)

    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text(json.dumps(MINI[0]) + "\n")
    with pytest.raises(ConfigError, match="plain.jsonl.gz: cannot be read as gzip"):
        load_humaneval(str(not_gzip), **allowed)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="no HumanEval problems"):
        load_humaneval(str(empty), **allowed)


def test_hub_without_datasets_asks_for_a_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ConfigError, match="pip install datasets, or give the file"):
        load_humaneval(None, allow_code_execution=True)


def test_hub_offline_is_one_clear_error():
    pytest.importorskip("datasets")
    try:
        task = load_humaneval(None, allow_code_execution=True)
    except ConfigError as error:
        assert HUB_ID in str(error) and "humaneval:PATH" in str(error) and "\n" not in str(error)
    else:  # the dataset was in the local cache
        assert len(task.items) == 164 and task.source == HUB_ID


# ---------------------------------------------------------------- extraction and scoring


def test_extract_code():
    prompt, entry = MINI[0]["prompt"], "add"
    full = "def add(a, b):\n    return a + b\n"
    assert extract_code(f"Here it is:\n```python\n{full}```\nDone.", prompt, entry) == full
    assert extract_code(f"```python\nimport os\n```\nthen\n```py\n{full}```", prompt, entry) == full
    assert extract_code(f"```python\n{full}", prompt, entry) == full  # unclosed fence (cut off)
    assert extract_code("    return a + b\n", prompt, entry) == prompt + "    return a + b\n"
    assert extract_code("```python\n    return a + b\n```", prompt, entry) == prompt + "    return a + b\n"
    assert extract_code(full, prompt, entry) == full


def test_scorer_end_to_end(tmp_path):
    task = load_humaneval(str(write_jsonl(tmp_path / "mini.jsonl", MINI)), samples=4, ks=(1, 2, 4),
                          allow_code_execution=True, timeout=2)
    escape = tmp_path / "escaped.txt"
    responses = [
        [
            "Sure!\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```",  # fenced, complete
            "    return a + b\n",  # body only
            "I am sorry, I cannot help with that.",  # garbage
            "```python\ndef add(a, b):\n    return a - b\n```",  # wrong
        ],
        [
            (  # the demo block would fail on input(): it must not run
                "```python\ndef is_palindrome(text):\n    return text == ''.join(reversed(text))\n"
                "if __name__ == '__main__':\n    print(is_palindrome(input()))\n```"
            ),
            f"```python\nopen({str(escape)!r}, 'w').write('x')\ndef is_palindrome(text):\n    return True\n```",
            "    return text[0] == text[-1]\n",  # IndexError on ''
            "```python\ndef is_palindrome(text):\n    while True:\n        pass\n```",  # never returns
        ],
    ]
    score = task.scorer.score(task.items, responses)
    assert score.per_item == [
        {"id": "Mini/0", "passed": 2, "samples": 4, "statuses": ["passed", "passed", "failed", "failed"]},
        {"id": "Mini/1", "passed": 1, "samples": 4, "statuses": ["passed", "blocked", "failed", "timeout"]},
    ]
    assert not escape.exists()
    assert score.primary == "pass@1"
    for k in (1, 2, 4):
        expected = (exact_pass_at_k(4, 2, k) + exact_pass_at_k(4, 1, k)) / 2
        estimate = score.metrics[f"pass@{k}"]
        assert estimate.value == pytest.approx(float(expected), abs=1e-12)
        assert estimate.n == 2 and estimate.low <= estimate.value <= estimate.high
    assert score.metrics["pass@1"].value == pytest.approx(0.375)


def test_canonical_solutions_of_real_problems_pass_and_wrong_ones_fail():
    if not HUMANEVAL.is_file():
        pytest.skip(f"{HUMANEVAL} is absent (the shared data directory is not next to the repository)")
    task = load_humaneval(str(HUMANEVAL), allow_code_execution=True)
    assert len(task.items) == 164 and task.items[0].id == "HumanEval/0"
    items = [task.items[i] for i in (0, 2, 53, 162)]  # 162 imports hashlib
    responses = [[item.data["canonical_solution"], "    return None\n"] for item in items]
    score = HumanEvalScorer(ks=(1,), allow_code_execution=True, timeout=10).score(items, responses)
    assert [record["statuses"] for record in score.per_item] == [["passed", "failed"]] * 4
    assert score.metrics["pass@1"].value == pytest.approx(0.5)
