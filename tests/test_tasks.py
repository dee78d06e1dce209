"""Task data and scorers: answer extraction, the scorers' accuracies against stats.wilson on
counts computed here, the real GSM8K and BIG-Bench-Hard files, user task files, and the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from safemerge.errors import ConfigError
from safemerge.evaluation import stats
from safemerge.evaluation.tasks.base import TaskItem
from safemerge.evaluation.tasks.builtin import BBH_QUESTION, GSM8K_INSTRUCTION, load_bbh, load_file_task, load_gsm8k
from safemerge.evaluation.tasks.registry import load_task
from safemerge.evaluation.tasks.scorers import (
    BBHScorer,
    ExactMatchScorer,
    NumericScorer,
    bbh_matches,
    extract_bbh_answer,
    extract_number,
)

DATA = Path(__file__).parents[2] / "shared" / "data"
BBH = DATA / "bbh"
GSM8K = DATA / "gsm8k"


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is absent")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def items(references: list[str]) -> list[TaskItem]:
    return [TaskItem(f"t/{i}", f"question {i}", ref) for i, ref in enumerate(references)]


# --- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("#### $1,234.50", "1234.5"),
    ("She pays 5 + 3 = 8 dollars.\n#### 8.\nThat took 2 steps.", "8"),  # the "####" answer beats later numbers
    ("first #### 3 then again #### 4", "4"),  # the last mark counts
    ("#### The total is 12 apples", "12"),
    ("Work: 7 * 2 = 14\n####", "14"),  # nothing after the mark: the last number
    ("The answer is 18.", "18"),
    ("He has 3 apples, then 5, so 8 in all", "8"),
    ("It costs $2,125.", "2125"),
    ("The change is -$5.", "-5"),
    ("Temperature fell to -12 degrees", "-12"),
    ("Pages 3-5 are missing", "5"),  # a range is not a negative number
    ("The result is -0", "0"),
    ("The result is 3.0", "3"),
    ("It is 2.50 per pound", "2.5"),
    ("about .5 of it", "0.5"),
    ("Give 1,2345 or so", "2345"),  # "1,2345" is not a thousands group
    ("Answer: 100%", "100"),
    ("1000", "1000"),
    ("Water is H2O", None),  # digits glued to a word are not a number
    ("I do not know.", None),
    ("", None),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("text, answer", [
    ("So the answer is (A).", "(A)"),
    ("So the answer is (A) and then more. Actually, so the answer is (C).", "(C)"),
    ("so the answer is **Yes**.", "Yes"),
    ("So the answer is **(B).**", "(B)"),
    ("So the answer is: (D) 12/14/1937.", "(D) 12/14/1937"),
    ("So the answer is ] } ].", "] } ]"),
    ("So the answer is 3.5.\nExtra text", "3.5"),
    ("So the answer is -219", "-219"),
    ("So the answer is Monsters, Inc. I hope that helps.", "Monsters, Inc"),
    ("So the answer is  costume   counterpart oven.", "costume counterpart oven"),
    ("The answer is (A).", None),
    ("So the answer is .", None),
])
def test_extract_bbh_answer(text, answer):
    assert extract_bbh_answer(text) == answer


@pytest.mark.parametrize("extracted, target, ok", [
    ("(A)", "(A)", True), ("A", "(A)", True), ("(A) 12/14/1937", "(A)", True), ("(a)", "(A)", True),
    ("(B)", "(A)", False), ("A lot", "(A)", False), ("(A)(B)", "(A)", False),
    ("yes", "Yes", True), ("Yes", "no", False), ("] } ]", "] } ]", True), ("]}]", "] } ]", False),
    ("monsters, inc", "Monsters, Inc", True), (None, "(A)", False),
])
def test_bbh_matches(extracted, target, ok):
    assert bbh_matches(extracted, target) is ok


# The answers of the three exemplars of every cot-prompts/*.txt, read off the files by hand.
COT_ANSWERS = {
    "boolean_expressions": ["False", "False", "True"], "causal_judgement": ["No", "Yes", "Yes"],
    "date_understanding": ["(D)", "(B)", "(B)"], "disambiguation_qa": ["(A)", "(A)", "(C)"],
    "dyck_languages": ["] } ]", "] ) )", "} ] >"], "formal_fallacies": ["valid", "valid", "invalid"],
    "geometric_shapes": ["(F)", "(G)", "(D)"], "hyperbaton": ["(B)", "(A)", "(B)"],
    "logical_deduction_five_objects": ["(B)", "(A)", "(C)"], "logical_deduction_seven_objects": ["(B)", "(A)", "(C)"],
    "logical_deduction_three_objects": ["(B)", "(A)", "(C)"], "movie_recommendation": ["(C)", "(C)", "(D)"],
    "multistep_arithmetic_two": ["123", "3929", "-219"], "navigate": ["No", "No", "Yes"],
    "object_counting": ["6", "11", "8"], "penguins_in_a_table": ["(B)", "(B)", "(D)"],
    "reasoning_about_colored_objects": ["(E)", "(F)", "(A)"], "ruin_names": ["(A)", "(C)", "(B)"],
    "salient_translation_error_detection": ["(D)", "(E)", "(C)"], "snarks": ["(A)", "(B)", "(A)"],
    "sports_understanding": ["yes", "no", "yes"], "temporal_sequences": ["(A)", "(A)", "(D)"],
    "tracking_shuffled_objects_five_objects": ["(A)", "(C)", "(C)"],
    "tracking_shuffled_objects_seven_objects": ["(A)", "(C)", "(C)"],
    "tracking_shuffled_objects_three_objects": ["(A)", "(C)", "(C)"], "web_of_lies": ["Yes", "Yes", "No"],
    "word_sorting": ["costume counterpart oven", "credulity hypochlorite phone ponderosa",
                     "arson aspect census mugho newt parthia seismography"],
}


def cot_exemplars(subtask: str) -> list[str]:
    text = (shared(BBH) / "cot-prompts" / f"{subtask}.txt").read_text()
    return text.split("\n\nQ: ")[1:]  # the header and task description come before the first "Q:"


@pytest.mark.parametrize("subtask", sorted(COT_ANSWERS))
def test_bbh_extraction_reads_the_exemplars_own_answers(subtask):
    exemplars = cot_exemplars(subtask)
    assert [extract_bbh_answer(e) for e in exemplars] == COT_ANSWERS[subtask]
    score = BBHScorer().score(items(COT_ANSWERS[subtask]), [[e] for e in exemplars])
    assert all(record["correct"] for record in score.per_item)


def test_bbh_exemplar_answers_use_the_targets_vocabulary():
    """A choice or yes/no exemplar answer is one of the task's own targets, so the scorer sees the same format."""
    for subtask, answers in COT_ANSWERS.items():
        examples = json.loads((shared(BBH) / "bbh" / f"{subtask}.json").read_text())["examples"]
        targets = {e["target"] for e in examples}
        if len(targets) <= 18:  # closed-vocabulary tasks (choices, yes/no, valid/invalid, True/False)
            assert set(answers) <= targets, subtask


# --- scorers ------------------------------------------------------------------------------------


def check_accuracy(score, correct: list[bool]):
    assert score.primary == "accuracy"
    assert score.metrics["accuracy"] == stats.wilson(sum(correct), len(correct))
    assert [r["correct"] for r in score.per_item] == correct


def test_numeric_scorer():
    references = ["18", "1,000", "3", "#### 7", "5", "-2", "0.5"]
    responses = [["... #### 18"], ["It is 1000.0 dollars."], ["#### 4", "#### 3"], ["7"], ["no idea"], ["-2.00"], []]
    correct = [True, True, False, True, False, True, False]  # item 2: only the first sample is scored
    score = NumericScorer().score(items(references), responses)
    check_accuracy(score, correct)
    assert score.per_item[1] == {"id": "t/1", "extracted": "1000", "reference": "1000", "correct": True}
    assert score.per_item[4]["extracted"] is None and score.per_item[6]["extracted"] is None
    assert score.metrics["accuracy"].value == pytest.approx(4 / 7)


def test_exact_scorer_normalises_whitespace_and_keeps_case():
    references = ["Paris", "New  York", "paris", "def f(): pass"]
    responses = [["  Paris\n"], ["New York"], ["Paris"], ["def f():\n    pass"]]
    check_accuracy(ExactMatchScorer().score(items(references), responses), [True, True, False, True])
    check_accuracy(ExactMatchScorer(ignore_case=True).score(items(references), responses), [True, True, True, True])


def test_bbh_scorer():
    references = ["(A)", "(B)", "Yes", "] ) )", "(C)", "valid"]
    responses = [["Reasoning. So the answer is A."], ["So the answer is (B) 12/14/1937."], ["so the answer is yes."],
                 ["So the answer is ] ) )."], ["The answer is (C)."], ["So the answer is invalid."]]
    check_accuracy(BBHScorer().score(items(references), responses), [True, True, True, True, False, False])


def test_scorers_refuse_misaligned_responses():
    for scorer in (NumericScorer(), ExactMatchScorer(), BBHScorer()):
        with pytest.raises(ValueError, match="2 items but 1 response lists"):
            scorer.score(items(["1", "2"]), [["1"]])


# --- GSM8K --------------------------------------------------------------------------------------


def gsm8k_rows(split: str) -> list[dict]:
    lines = (shared(GSM8K) / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_gsm8k_test_split_from_the_folder():
    rows = gsm8k_rows("test")
    task = load_task(f"gsm8k:{GSM8K}")
    assert task.name == "gsm8k" and len(task.items) == len(rows) == 1319
    assert [i.reference for i in task.items] == [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]
    assert task.items[0].prompt == f"{rows[0]['question']}\n\n{GSM8K_INSTRUCTION}"
    assert isinstance(task.scorer, NumericScorer) and task.system_prompt


def test_gsm8k_reference_solutions_score_perfectly_and_shifted_ones_do_not():
    task = load_gsm8k(str(shared(GSM8K) / "test.jsonl"))
    solutions = [r["answer"] for r in gsm8k_rows("test")]
    check_accuracy(task.scorer.score(task.items, [[s] for s in solutions]), [True] * len(solutions))
    shifted = solutions[1:] + solutions[:1]
    references = [i.reference for i in task.items]
    expected = [references[i] == references[(i + 1) % len(references)] for i in range(len(references))]
    check_accuracy(task.scorer.score(task.items, [[s] for s in shifted]), expected)


def test_gsm8k_train_split():
    assert len(load_gsm8k(str(shared(GSM8K)), split="train").items) == len(gsm8k_rows("train")) == 7473


def test_gsm8k_errors(tmp_path):
    missing = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q2"}])
    with pytest.raises(ConfigError, match=r"a.jsonl line 2: missing or empty field 'answer'"):
        load_gsm8k(str(missing))
    unmarked = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "it is 4"}])
    with pytest.raises(ConfigError, match=r"b.jsonl line 1: field 'answer' has no '#### <number>'"):
        load_gsm8k(str(unmarked))
    with pytest.raises(ConfigError, match="does not exist"):
        load_gsm8k(str(tmp_path))  # a folder without test.jsonl
    with pytest.raises(ConfigError, match="no items"):
        load_gsm8k(str(write_jsonl(tmp_path / "empty.jsonl", [])))


def test_gsm8k_without_path_comes_from_the_hub_or_says_how_to_give_one():
    try:
        task = load_task("gsm8k")
    except ConfigError as e:
        assert "openai/gsm8k" in str(e) and "PATH" in str(e)
    else:
        assert len(task.items) == 1319 and task.source == "openai/gsm8k"


# --- BIG-Bench-Hard -----------------------------------------------------------------------------


def test_bbh_subtask_prompt_is_the_cot_file_without_its_header():
    root = shared(BBH)
    task = load_task(f"bbh:{root}:date_understanding")
    examples = json.loads((root / "bbh" / "date_understanding.json").read_text())["examples"]
    cot = (root / "cot-prompts" / "date_understanding.txt").read_text()
    header, body = cot.split("-----\n", 1)
    assert "canary" in header and "canary" not in body
    assert task.name == "bbh/date_understanding" and task.system_prompt is False
    assert len(task.items) == len(examples) == 250
    for i, (item, example) in enumerate(zip(task.items, examples)):
        assert item.id == f"date_understanding/{i}" and item.reference == example["target"]
        assert item.prompt == body.strip() + f"\n\nQ: {example['input']}\nA: Let's think step by step."
    assert BBH_QUESTION.format(input="X") == "\n\nQ: X\nA: Let's think step by step."
    assert isinstance(task.scorer, BBHScorer)


def test_bbh_all_subtasks():
    root = shared(BBH)
    task = load_bbh(str(root), None)
    assert task.name == "bbh" and len(task.items) == 6511
    subtasks = sorted({item.id.split("/")[0] for item in task.items})
    assert subtasks == sorted(COT_ANSWERS) and len(subtasks) == 27
    assert sum(item.id.startswith("penguins_in_a_table/") for item in task.items) == 146


def test_bbh_errors(tmp_path):
    root = shared(BBH)
    with pytest.raises(ConfigError, match=r"unknown BBH subtask 'dates'.*available: boolean_expressions, .*word_sorting"):
        load_task(f"bbh:{root}:dates")
    with pytest.raises(ConfigError, match="not a BIG-Bench-Hard folder"):
        load_bbh(str(tmp_path), None)
    with pytest.raises(ConfigError, match=r"bbh: needs a path"):
        load_task("bbh")
    copy = tmp_path / "bbh-copy"
    (copy / "cot-prompts").mkdir(parents=True)
    shutil.copytree(root / "bbh", copy / "bbh")
    with pytest.raises(ConfigError, match=r"navigate.txt is missing"):
        load_bbh(str(copy), "navigate")
    (copy / "bbh" / "navigate.json").write_text('{"examples": [{"input": "q"}]}')
    shutil.copy(root / "cot-prompts" / "navigate.txt", copy / "cot-prompts")
    with pytest.raises(ConfigError, match=r"navigate.json example 0: missing or empty field 'target'"):
        load_bbh(str(copy), "navigate")
    (copy / "bbh" / "navigate.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"navigate.json is not a BBH task file"):
        load_bbh(str(copy), "navigate")


# --- user task files and the dispatcher -------------------------------------------------------------


def test_file_task_with_each_scorer(tmp_path):
    rows = [{"prompt": "2+2?", "reference": "4"}, {"id": "mine", "prompt": "Capital of France?", "reference": "Paris"}]
    path = write_jsonl(tmp_path / "my:tasks" / "qa.jsonl", rows)
    task = load_task(f"file:{path}")
    assert task.name == "file:qa.jsonl" and isinstance(task.scorer, ExactMatchScorer)
    assert [i.id for i in task.items] == ["qa/0", "mine"] and task.items[1].prompt == "Capital of France?"
    assert isinstance(load_task(f"file:{path}:bbh").scorer, BBHScorer)
    numeric = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "2+2?", "reference": 4}])
    task = load_task(f"file:{numeric}:numeric")
    check_accuracy(task.scorer.score(task.items, [["It is 4."]]), [True])


def test_file_task_errors(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "reference": "r"}, {"prompt": "p2"}])
    with pytest.raises(ConfigError, match=r"t.jsonl line 2: missing or empty field 'reference'"):
        load_file_task(str(path), "exact")
    with pytest.raises(ConfigError, match=r"unknown scorer 'fuzzy'.*available: exact, numeric, bbh"):
        load_task(f"file:{path}:fuzzy")
    with pytest.raises(ConfigError, match=r"line 1: the reference holds no number"):
        load_file_task(str(write_jsonl(tmp_path / "w.jsonl", [{"prompt": "p", "reference": "four"}])), "numeric")
    with pytest.raises(ConfigError, match=r"line 2: id 'a' appears twice"):
        load_file_task(str(write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "p", "reference": "r"}] * 2)))
    with pytest.raises(ConfigError, match="does not exist"):
        load_task(f"file:{tmp_path / 'none.jsonl'}")
    with pytest.raises(ConfigError, match=r"file: needs a path"):
        load_task("file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "reference": "r"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: invalid JSON"):
        load_task(f"file:{bad}")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown task 'mmlu'; available: gsm8k.*bbh:PATH.*humaneval.*file:PATH"):
        load_task("mmlu")
    with pytest.raises(TypeError, match="unknown options: sampels"):
        load_task("gsm8k", sampels=3)


def test_humaneval_is_delegated_to_its_loader_with_its_options():
    pytest.importorskip("safemerge.evaluation.tasks.humaneval", reason="humaneval.py is written separately")
    data = shared(DATA / "humaneval" / "HumanEval.jsonl.gz")
    task = load_task(f"humaneval:{data}", samples=4, temperature=0.6, ks=(1, 2), allow_code_execution=True,
                     timeout=5.0, memory_mb=None)  # None: the loader's default
    assert task.name == "humaneval" and len(task.items) == 164
    assert task.generation == {"do_sample": True, "temperature": 0.6, "num_samples": 4}
    with pytest.raises(ConfigError, match="allow-code-execution"):
        load_task(f"humaneval:{data}", allow_code_execution=None)


def test_bbh_cot_prompt_without_a_header(tmp_path):
    """Checkouts from before the canary commit have no header: the whole file is the prompt."""
    (tmp_path / "bbh").mkdir()
    (tmp_path / "cot-prompts").mkdir()
    examples = [{"input": "not ( True )", "target": "False"}]
    (tmp_path / "bbh" / "boolean_expressions.json").write_text(json.dumps({"examples": examples}))
    cot = "Evaluate the result of a random Boolean expression.\n\nQ: not False\nA: Let's think step by step.\nSo the answer is True."
    (tmp_path / "cot-prompts" / "boolean_expressions.txt").write_text(cot + "\n")
    task = load_task(f"bbh:{tmp_path}")
    assert task.name == "bbh" and [i.id for i in task.items] == ["boolean_expressions/0"]
    assert task.items[0].prompt == cot + "\n\nQ: not ( True )\nA: Let's think step by step."


def test_file_task_reads_the_formats_finetune_keeps(tmp_path):
    from safemerge.evaluation.tasks.builtin import load_file_task

    data = tmp_path / "val.jsonl"
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                          {"role": "assistant", "content": "so #### 4"}]},
            {"prompt": "q2", "response": "#### 5"},
            {"instruction": "q3", "input": "ctx", "output": "#### 6"},
            {"prompt": "q4", "reference": "7"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_file_task(str(data), "numeric")
    assert [(i.prompt, i.reference) for i in task.items] == [
        ("q1", "so #### 4"), ("q2", "#### 5"), ("q3\n\nctx", "#### 6"), ("q4", "7")]
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ConfigError, match="must end with the assistant"):
        load_file_task(str(data), "numeric")
