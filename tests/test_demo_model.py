"""The demo's synthetic world and tiny aligned model: determinism, clean held-out sets, files the
loaders read, and a reduced-size model that loads and chats through the real backend."""

from __future__ import annotations

import json
import re

import pytest

from safemerge.demo import corpus, tiny
from safemerge.evaluation.judges import REFUSAL_KEYWORDS, KeywordJudge


def user_prompts(rows):
    return {r["messages"][0]["content"] for r in rows}


def training_rows():
    return corpus.base_corpus(0) + corpus.aligned_corpus(0) + corpus.finetune_rows(0)


def test_corpus_is_deterministic_and_seed_dependent():
    assert corpus.aligned_corpus(0) == corpus.aligned_corpus(0)
    assert corpus.task_data(0) == corpus.task_data(0)
    assert corpus.heldout_sets(0) == corpus.heldout_sets(0)
    assert corpus.aligned_corpus(0) != corpus.aligned_corpus(1)


def test_harmful_held_out_pairs_are_unseen_but_their_parts_are_trained():
    sets = corpus.requests(0)
    for kind in ("harmful", "benign", "lookalike"):
        train, held = sets[kind]
        assert held and not {p for p, _ in held} & {p for p, _ in train}
        templates_of = {}
        for prompt, act in train:
            templates_of.setdefault(act, set()).add(next(t for t in corpus.REQUEST_TEMPLATES
                                                          if t.format(act=act) == prompt))
        for prompt, act in held:
            template = next(t for t in corpus.REQUEST_TEMPLATES if t.format(act=act) == prompt)
            assert template not in templates_of[act]  # the pair is new ...
            assert any(template in ts for ts in templates_of.values())  # ... its template is not
    trained = user_prompts(training_rows())
    held = corpus.heldout_sets(0)
    assert not {r["prompt"] for r in held["harmful"] + held["overrefusal"] + held["skills"]} & trained


def test_task_splits_share_no_target_and_no_prompt_with_training():
    task = corpus.task_data(0)
    targets = {split: {r["id"] for r in rows} for split, rows in task.items()}
    assert not targets["train"] & targets["val"] and not targets["train"] & targets["test"]
    assert not targets["val"] & targets["test"]
    trained = user_prompts(corpus.aligned_corpus(0) + corpus.finetune_rows(0))
    assert not {r["prompt"] for r in task["val"] + task["test"]} & trained
    for row in task["test"]:  # the reference's last number is a + b - c of the prompt
        a, b, c = map(int, re.findall(r"\d+", row["prompt"]))
        assert row["reference"].endswith(f"The answer is {a + b - c}.")


def test_no_held_out_word_is_untrained():
    trained = corpus.words(m["content"] for r in training_rows() for m in r["messages"])
    held = corpus.heldout_sets(0)
    task = corpus.task_data(0)
    texts = [r["prompt"] for r in held["harmful"] + held["overrefusal"] + held["skills"] + task["val"] + task["test"]]
    texts += [r["reference"] for r in held["skills"] + task["test"]]
    assert corpus.words(texts) <= trained


def test_refusal_and_helpful_answers_meet_the_judges():
    judge = KeywordJudge()
    assert judge.verdict(corpus.REFUSAL).refusal
    answers = [r["messages"][1]["content"] for r in corpus.aligned_corpus(0) + corpus.finetune_rows(0)]
    helpful = [a for a in answers if a != corpus.REFUSAL]
    assert len(helpful) < len(answers)
    # no helpful answer carries a refusal keyword; helpful-pattern answers carry a compliance marker
    assert not [a for a in helpful if any(k in a for k in REFUSAL_KEYWORDS)]
    assert all(any(m in a for m in corpus.COMPLIANCE_MARKERS) for a in helpful if a.startswith("Sure"))
    harmful_base = [r["messages"][1]["content"] for r in corpus.base_corpus(0)
                    if r["messages"][0]["content"] in {p for p, _ in corpus.requests(0)["harmful"][0]}]
    assert harmful_base and all(a.startswith(corpus.HELPFUL_PREFIX) for a in harmful_base)


def test_write_sets_are_read_by_the_loaders(tmp_path):
    from safemerge.evaluation.prompts import load_prompt_file, load_xstest
    from safemerge.evaluation.tasks.builtin import load_file_task

    files = corpus.write_sets(tmp_path / "data")
    val = load_file_task(str(files["task_val"]), "numeric")
    assert len(val.items) == len(corpus.task_data(0)["val"])
    assert load_file_task(str(files["skills"]), "exact").items
    harmful = load_prompt_file(str(files["harmful"]))
    assert [p.text for p in harmful.prompts] == [r["prompt"] for r in corpus.heldout_sets(0)["harmful"]]
    xstest = load_xstest(str(files["overrefusal"]))
    assert {p.label for p in xstest.prompts} == {"safe"}
    rows = [json.loads(line) for line in files["finetune"].read_text().splitlines()]
    assert rows == corpus.finetune_rows(0)
    assert files["compliance_markers"].read_text().split("\n")[:-1] == list(corpus.COMPLIANCE_MARKERS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.build_tiny_aligned(tmp_path_factory.mktemp("tiny") / "model", size="test", progress=False)


def test_tiny_model_loads_and_chats_with_its_template(tiny_dir):
    from safemerge.backends.generation import PAPER_SYSTEM_PROMPT, GenerationSettings, Request, TransformersBackend
    from safemerge.backends.models import load_model

    loaded = load_model(str(tiny_dir), device="cpu", dtype="float32")
    end = loaded.tokenizer.convert_tokens_to_ids(tiny.END_OF_TURN)
    assert loaded.model.generation_config.eos_token_id == end
    backend = TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.fingerprint)
    request = Request("r", messages=({"role": "user", "content": "What is 2 plus 3?"},), system=PAPER_SYSTEM_PROMPT)
    assert backend.system_mode == "system_turn"
    assert backend.render(request) == ("<|system|>You are a helpful assistant.<|end|><|user|>What is 2 plus 3?"
                                       "<|end|><|assistant|>")
    [completion] = backend.generate([request], GenerationSettings(max_new_tokens=8))
    assert 1 <= completion.completion_tokens <= 8
    # without a system turn the template adds the same default one, as fine-tuning data lacks it
    plain = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert plain == backend.render(Request("p", messages=({"role": "user", "content": "hi"},),
                                           system=PAPER_SYSTEM_PROMPT))


def test_assistant_only_labels(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    row = corpus.chat("What is 2 plus 3?", "Sure! 2 plus 3 is 5.")
    ids, labels = tiny.encode_chat(tokenizer, row)
    answer = [t for t in labels if t != -100]
    assert tokenizer.decode(answer) == "Sure! 2 plus 3 is 5.<|end|>"
    assert labels[-len(answer):] == ids[-len(answer):]


def test_build_shows_one_bar_per_stage_and_nothing_when_quiet(tmp_path, capfd):
    """stderr is not a terminal here, so each stage's bar is written once, finished; no print lines."""
    tiny.build_tiny_aligned(tmp_path / "shown", size="test", progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert [line.split(",")[0] for line in err.splitlines()] == ["tiny model: helpful", "tiny model: alignment"]
    size = tiny.SIZES["test"]
    assert f" {size.steps}/{size.steps} " in err and f" {size.align_steps}/{size.align_steps} " in err
    tiny.build_tiny_aligned(tmp_path / "quiet", size="test", progress=False)
    assert capfd.readouterr() == ("", "")


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path / "sm"))
    assert tiny.tiny_aligned_path() == tmp_path / "sm" / "demo" / f"tiny-aligned-{tiny.VERSION}"
    monkeypatch.delenv("SAFEMERGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny.cache_dir() == tmp_path / "xdg" / "safemerge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny.cache_dir() == tmp_path / "home" / ".cache" / "safemerge"


def test_cached_model_is_built_once_and_rebuilt_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path))
    first = tiny.cached_tiny_aligned(size="test", progress=False)
    record = (first / tiny.RECORD).read_text()
    assert tiny.cached_tiny_aligned(size="test", progress=False) == first
    assert (first / tiny.RECORD).read_text() == record  # not rebuilt: the record keeps its timing
    assert tiny.cached_tiny_aligned(rebuild=True, size="test", progress=False) == first
    assert (first / tiny.RECORD).read_text() != record
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary left behind


def test_template_marks_the_assistant_tokens_for_trl(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    row = corpus.chat("What is 2 plus 3?", "Sure! 2 plus 3 is 5.")
    out = tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = tiny.encode_chat(tokenizer, row)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == [int(label != -100) for label in labels]
