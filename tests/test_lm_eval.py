"""run_lm_eval on a live tiny Llama with two custom offline tasks (multiple choice and generate-until),
checked against loglikelihoods and greedy generations computed here with transformers directly."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from statistics import NormalDist

import pytest
import torch
from conftest import VOCAB, build_model, make_tokenizer

from safemerge.errors import ConfigError

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'safemerge[lm-eval]')")

ITEMS = 8
MAX_GEN = 4
STOP = "w50"


def question(i: int) -> str:
    return f"w{10 + i} w{20 + 2 * i} w{40 + 3 * i}"


def choices(i: int) -> list[str]:
    return [f"w{5 + i}", f"w{60 + i} w{7 + i}", f"w{80 + i}"]


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    context_ids = tok(context).input_ids
    ids = tok(context + continuation).input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(float(logprobs[pos - 1, ids[pos]]) for pos in range(len(context_ids), len(ids)))


def greedy_answer(model, tok, prompt: str) -> str:
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(STOP)[0]


def first_word(text: str) -> str:
    match = re.search(r"(w\d+)", text)
    return match.group(1) if match else "[invalid]"


def normal_interval(values: list[float]) -> tuple[float, float, float]:
    n, mean = len(values), sum(values) / len(values)
    half = NormalDist().inv_cdf(0.975) * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, its tokenizer, a task folder, and what the model itself does on each item."""
    model, tok = build_model("llama"), make_tokenizer(VOCAB)
    lls = [[continuation_logprob(model, tok, question(i), " " + c) for c in choices(i)] for i in range(ITEMS)]
    generations = [greedy_answer(model, tok, question(i)) for i in range(ITEMS)]
    best = [max(range(3), key=ll.__getitem__) for ll in lls]
    rows = [{"question": question(i), "choices": choices(i),
             # half the labels agree with the model's choice, half the answers with its first word
             "label": best[i] if i % 2 == 0 else (best[i] + 1) % 3,
             "answer": first_word(generations[i]) if i % 2 == 0 else "w3"} for i in range(ITEMS)]
    root = tmp_path_factory.mktemp("lm_eval")
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {root / 'cache'}\n"
              "test_split: test\ndoc_to_text: '{{question}}'\n")
    (tasks / "mc.yaml").write_text(
        "task: sm_tiny_mc\n" + source + "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "gen.yaml").write_text(
        "task: sm_tiny_gen\n" + source + "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: ['{STOP}']\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
        "filter_list:\n"
        "  - name: first-word\n    filter:\n      - function: regex\n        regex_pattern: '(w\\d+)'\n"
        "      - function: take_first\n"
        "  - name: whole\n    filter:\n      - function: take_first\n")
    return {"model": model, "tok": tok, "tasks": tasks, "rows": rows, "lls": lls, "generations": generations}


def harness_can_read(setup) -> None:
    try:
        import datasets

        datasets.load_dataset("json", data_files=str(setup["tasks"].parent / "data.jsonl"),
                              cache_dir=str(setup["tasks"].parent / "cache"))
    except Exception as error:  # noqa: BLE001 - any failure here means the environment, not our code
        pytest.skip(f"the datasets library cannot read a local JSON file offline here: {error}")


@needs_lm_eval
def test_metrics_match_direct_computation(setup):
    from safemerge.evaluation.tasks.lm_eval import run_lm_eval

    harness_can_read(setup)
    scores = run_lm_eval(setup["model"], setup["tok"], ["sm_tiny_mc", "sm_tiny_gen"],
                         include_path=str(setup["tasks"]), batch_size=1, seed=0)
    rows, lls, generations = setup["rows"], setup["lls"], setup["generations"]

    mc = scores["sm_tiny_mc"]
    assert mc.primary == "acc"
    acc = [float(max(range(3), key=ll.__getitem__) == r["label"]) for ll, r in zip(lls, rows)]
    acc_norm = [float(max(range(3), key=lambda k: ll[k] / len(r["choices"][k])) == r["label"])
                for ll, r in zip(lls, rows)]
    for name, values in (("acc", acc), ("acc_norm", acc_norm)):
        estimate = mc.metrics[name]
        assert (estimate.value, estimate.low, estimate.high) == pytest.approx(normal_interval(values), abs=1e-9)
        assert estimate.n == ITEMS and estimate.interval == "normal"
    assert [r["id"] for r in mc.per_item] == [str(i) for i in range(ITEMS)]
    for record, ll in zip(mc.per_item, lls):
        assert [pair[0] for pair in record["response"]] == pytest.approx(ll, abs=1e-4)

    gen = scores["sm_tiny_gen"]
    assert gen.primary == "exact_match,first-word"  # the task's first filter
    first = [float(first_word(g) == r["answer"]) for g, r in zip(generations, rows)]
    whole = [float(g == r["answer"]) for g, r in zip(generations, rows)]
    assert 0 < sum(first) < ITEMS  # a metric that can tell right from wrong
    assert gen.metrics["exact_match,first-word"].value == pytest.approx(sum(first) / ITEMS)
    assert gen.metrics["exact_match,whole"].value == pytest.approx(sum(whole) / ITEMS)
    low, high = gen.metrics["exact_match,first-word"].low, gen.metrics["exact_match,first-word"].high
    assert (low, high) == pytest.approx(normal_interval(first)[1:], abs=1e-9)
    assert [r["response"] for r in gen.per_item] == [first_word(g) for g in generations]
    assert [r["exact_match"] for r in gen.per_item] == first


@needs_lm_eval
def test_bad_input_is_a_config_error(setup):
    from safemerge.evaluation.tasks.lm_eval import run_lm_eval

    harness_can_read(setup)
    with pytest.raises(ConfigError, match="unknown lm-eval task 'sm_tiny_mcq'.*sm_tiny_mc"):
        run_lm_eval(setup["model"], setup["tok"], ["sm_tiny_mcq"], include_path=str(setup["tasks"]))
    with pytest.raises(ConfigError, match="is not a directory"):
        run_lm_eval(setup["model"], setup["tok"], ["sm_tiny_mc"], include_path=str(setup["tasks"] / "absent"))
    with pytest.raises(ConfigError, match="limit must be at least 1"):
        run_lm_eval(setup["model"], setup["tok"], ["sm_tiny_mc"], limit=0)


def test_missing_package_is_a_config_error(monkeypatch):
    from safemerge.evaluation.tasks.lm_eval import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without it looks like
    with pytest.raises(ConfigError, match=r"pip install 'safemerge\[lm-eval\]'"):
        run_lm_eval(None, None, ["sm_tiny_mc"])
