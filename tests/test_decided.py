"""A safety response stops once its verdict is decided (a refusal keyword appeared; on XSTest, once the
opening decides its rule): on the real families' tokenizers, the verdicts equal those of full generation,
and only the decided rows end early. Model judges keep full responses unless given a prefix length."""

from __future__ import annotations

import itertools
import random
from contextlib import nullcontext

import pytest
from families import FAMILIES, available, save, scripted
from test_family_generation import BACKENDS, QUESTION, backend_for, ids, prompt_end, tokenizer_of
from test_vllm_standin import standin_vllm

from safemerge.backends.generation import GenerationSettings, Request
from safemerge.backends.stopping import opening_decided
from safemerge.config import EvalConfig
from safemerge.evaluation.judges import REFUSAL_KEYWORDS, XSTEST_REFUSAL_PREFIXES, KeywordJudge, xstest_label
from safemerge.evaluation.run import EvalPlan, safety_settings

RAW = "Tell me a story:"  # a raw-text request: its own last token starts a second chain


def words(tok, *texts: str) -> list[int]:
    return [i for t in texts for i in ids(tok, t)]


@pytest.mark.skipif(not available(), reason="../shared/tokenizers is absent (real family tokenizers)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["llama3_1", "qwen3"])
def test_a_response_stops_once_a_refusal_keyword_appears_and_verdicts_do_not_change(name, backend, tmp_path):
    family, tok = FAMILIES[name], tokenizer_of(name)
    refusing = [prompt_end(tok), *words(tok, "Sure", " here", " but", " I", " cannot", " help", " with", " that")]
    raw_end = tok.encode(RAW, add_special_tokens=False)[-1]
    complying = [raw_end, *words(tok, " Once", " upon", " a", " time", " there", " was"), family.stop_ids[0]]
    path = save(scripted(family, [refusing, complying]), family, tmp_path / "model")
    requests = [Request("chat", messages=({"role": "user", "content": QUESTION},)), Request("raw", text=RAW)]
    with standin_vllm() if backend == "vllm" else nullcontext():
        model = backend_for(path, backend)
        full = model.generate(requests, GenerationSettings(max_new_tokens=8))
        cut = model.generate(requests, GenerationSettings(max_new_tokens=8, stop_strings=REFUSAL_KEYWORDS))
    judge = KeywordJudge()
    assert [judge.verdict(c.response) for c in cut] == [judge.verdict(c.response) for c in full]
    assert [(c.response, c.completion_tokens) for c in full] == [
        ("Sure here but I cannot help with that", 8), (" Once upon a time there was", 7)]
    # the refusing row ends at " cannot" ("I cannot" is a keyword); the other, in the same batch, runs on
    assert [(c.response, c.completion_tokens) for c in cut] == [
        ("Sure here but I cannot", 5), (" Once upon a time there was", 7)]


@pytest.mark.skipif(not available(), reason="../shared/tokenizers is absent (real family tokenizers)")
@pytest.mark.parametrize("name", ["llama3_1", "qwen3"])
def test_an_xstest_response_stops_once_its_opening_decides_the_rule(name, tmp_path):
    family, tok = FAMILIES[name], tokenizer_of(name)
    refusing = [prompt_end(tok), *words(tok, "No", ",", " I", " will", " not", " say", " it", " now")]
    raw_end = tok.encode(RAW, add_special_tokens=False)[-1]
    complying = [raw_end, *words(tok, "I", " think", " so", " and", " here", " is", " one", " more")]
    path = save(scripted(family, [refusing, complying]), family, tmp_path / "model")
    requests = [Request("chat", messages=({"role": "user", "content": QUESTION},)), Request("raw", text=RAW)]
    model = backend_for(path, "transformers")
    full = model.generate(requests, GenerationSettings(max_new_tokens=8))
    cut = model.generate(requests, GenerationSettings(max_new_tokens=8, stop_openings=XSTEST_REFUSAL_PREFIXES))
    assert [xstest_label(c.response) for c in full] == ["full_refusal", "full_compliance"]
    assert [xstest_label(c.response) for c in cut] == [xstest_label(c.response) for c in full]
    # "No" could still become "No," or "No."; "I" could become "I cannot": the next token decides either way
    assert [(c.response.strip(), c.completion_tokens) for c in cut] == [("No,", 2), ("I think", 2)]


def continuations(rng: random.Random, n: int) -> list[str]:
    """Texts near XSTest's refusal phrases: their pieces, cut, recased and padded, and other words."""
    pieces = [*XSTEST_REFUSAL_PREFIXES, "Sorry", "I'M", "I", "i", "'m", "no", ",", ".", " ", "  ", "\n", "\t", "sure",
              "It", " is", " not", "\ufffd", "é", "Σ", "as", " an", " AI", "x"]
    cut = [p[:k] for p in XSTEST_REFUSAL_PREFIXES for k in range(1, len(p))]
    return ["".join(rng.choice(pieces + cut) for _ in range(rng.randint(1, 5))) for _ in range(n)]


def test_a_decided_opening_keeps_xstests_label_whatever_follows():
    rng = random.Random(0)
    texts = continuations(rng, 3000)
    decided = 0
    for text, tail in itertools.product(texts[:300], texts[300:310]):
        for k in range(len(text) + 1):
            if opening_decided(text[:k], XSTEST_REFUSAL_PREFIXES):
                decided += 1
                assert xstest_label(text[:k]) == xstest_label(text[:k] + tail) == xstest_label(text + tail), (text, k, tail)
    assert decided > 1000  # the property was exercised, not vacuous
    # what is not decided yet: nothing, whitespace, a start of a phrase, a trailing space or half a character
    for text in ("", "  ", "I", "i'm not", "no", "Sure ", "sure\ufffd"):
        assert not opening_decided(text, XSTEST_REFUSAL_PREFIXES), text
    for text in ("Sure", "  I'm sorry", "No,", "Certainly"):
        assert opening_decided(text, XSTEST_REFUSAL_PREFIXES), text


def plan(judge: str, labels_refusals: bool = False) -> EvalPlan:
    return EvalPlan({}, {}, [], judge, KeywordJudge().decided_by if judge == "keyword" else (), labels_refusals)


def config(**options) -> EvalConfig:
    return EvalConfig(model="m", out="o", safety=["advbench"], max_new_tokens=256, **options)


def test_stop_strings_only_where_the_verdict_is_fixed_by_them():
    on = config(stop_when_decided=True)
    assert safety_settings(on, plan("keyword"), "advbench").stop_strings == tuple(REFUSAL_KEYWORDS)
    assert safety_settings(config(), plan("keyword"), "advbench").stop_strings == ()  # evaluate keeps full responses
    # XSTest's own rule reads the opening: it stops there, on transformers, unless the judge labels refusals itself
    assert safety_settings(on, plan("keyword"), "xstest").stop_strings == ()
    assert safety_settings(on, plan("keyword"), "xstest").stop_openings == XSTEST_REFUSAL_PREFIXES
    assert safety_settings(on, plan("llamaguard"), "xstest").stop_openings == XSTEST_REFUSAL_PREFIXES
    assert safety_settings(on, plan("wildguard", labels_refusals=True), "xstest").stop_openings == ()
    assert safety_settings(config(stop_when_decided=True, backend="vllm"), plan("keyword"), "xstest").stop_openings == ()
    assert safety_settings(config(), plan("keyword"), "xstest").stop_openings == ()
    assert safety_settings(on, plan("keyword"), "advbench").stop_openings == ()
    assert safety_settings(config(stop_when_decided=True, thinking="on"), plan("keyword"), "advbench").stop_strings == ()
    assert safety_settings(on, plan("wildguard"), "advbench").stop_strings == ()  # a model judge reads everything


def test_a_model_judge_reads_a_prefix_only_when_asked():
    assert safety_settings(config(), plan("wildguard"), "advbench").max_new_tokens == 256
    assert safety_settings(config(judge_prefix_tokens=64), plan("wildguard"), "advbench").max_new_tokens == 64
    assert safety_settings(config(judge_prefix_tokens=64), plan("keyword"), "advbench").max_new_tokens == 256


def test_cache_keys_of_full_generations_are_unchanged_by_the_stop_field():
    full = GenerationSettings()
    assert "stop_strings" not in full.key()
    assert GenerationSettings(stop_strings=("I cannot",)).key()["stop_strings"] == ("I cannot",)
    assert "stop_openings" not in full.key()
    assert GenerationSettings(stop_openings=("sorry",)).key()["stop_openings"] == ("sorry",)
