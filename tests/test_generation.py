"""The transformers backend and the response cache, on tiny real models.

Greedy outputs are checked against an independent token-by-token decode written here."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, make_tokenizer, save_model

from safemerge.backends.generation import (
    CachedBackend,
    GenerationSettings,
    Request,
    TransformersBackend,
    system_prompt_mode,
)
from safemerge.backends.models import load_model

NO_SYSTEM_TEMPLATE = (  # like Gemma's: a system turn is an error
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def words(n: int, start: int = 4) -> str:
    return " ".join(f"w{start + (7 * i) % 80}" for i in range(n))


def chat(i: int, n: int, system: str | None = "w1 w2") -> Request:
    return Request(f"p{i}", messages=({"role": "user", "content": words(n, i)},), system=system)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama whose generation_config.json asks for sampling, as Llama-3's does."""
    path = tmp_path_factory.mktemp("gen") / "llama"
    model = build_model("llama", seed=3)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.generation_config.eos_token_id = 2
    return save_model(model, path, torch.float32)


@pytest.fixture(scope="module")
def backend(tiny):
    loaded = load_model(str(tiny), device="cpu")
    return TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.fingerprint, batch_size=4)


def reference_greedy(model, ids: list[int], max_new: int, penalty: float, stop: int) -> list[int]:
    """Greedy decoding one token at a time with the CTRL repetition penalty, no padding, no cache."""
    seq = list(ids)
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].double()
        seen = torch.tensor(sorted(set(seq)))
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        token = int(logits.argmax())
        seq.append(token)
        if token == stop:
            break
    return seq[len(ids):]


def test_greedy_batched_matches_an_independent_decode(backend):
    requests = [chat(i, n) for i, n in enumerate([3, 11, 6, 1, 9, 2])]  # lengths differ: left padding
    settings = GenerationSettings(max_new_tokens=12, repetition_penalty=1.3)
    completions = backend.generate(requests, settings)
    assert [c.id for c in completions] == [r.id for r in requests]  # request order, though sorted by length inside
    for request, completion in zip(requests, completions):
        ids = backend.encode(request)
        expected = reference_greedy(backend.model, ids, 12, 1.3, stop=2)
        assert completion.response == backend.tokenizer.decode(expected, skip_special_tokens=True)
        assert completion.completion_tokens == len(expected)
        assert completion.prompt_tokens == len(ids)
        assert completion.prompt == backend.render(request)


def test_batching_does_not_change_greedy_outputs(backend, tiny):
    requests = [chat(i, n) for i, n in enumerate([5, 2, 13, 7, 1, 4, 9])]
    settings = GenerationSettings(max_new_tokens=10)
    batched = [c.response for c in backend.generate(requests, settings)]
    one_by_one = TransformersBackend(backend.model, backend.tokenizer, model_id="x", batch_size=1)
    assert batched == [c.response for c in one_by_one.generate(requests, settings)]


def test_model_generation_config_is_not_inherited(backend):
    config = backend.generation_config(GenerationSettings())
    assert config.do_sample is False and config.repetition_penalty == 1.2 and config.max_new_tokens == 512
    assert 2 in config.eos_token_id


def test_sampling_gives_n_samples_reproducibly(backend):
    requests = [chat(i, 4) for i in range(3)]
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, num_samples=4, seed=7)
    first = backend.generate(requests, settings)
    assert [(c.id, c.sample) for c in first] == [(r.id, s) for r in requests for s in range(4)]
    assert len({c.response for c in first}) > 1  # temperature 1.5 on a random model: samples differ
    assert [c.response for c in backend.generate(requests, settings)] == [c.response for c in first]
    with pytest.raises(ValueError, match="do_sample"):
        backend.generate(requests, GenerationSettings(num_samples=2))


def test_system_prompt_is_a_turn_or_folded(tiny):
    tokenizer = make_tokenizer(96)
    assert system_prompt_mode(tokenizer) == "system_turn"
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    assert system_prompt_mode(tokenizer) == "folded_into_user"
    model = build_model("gemma")
    folded = TransformersBackend(model, tokenizer, model_id="x")
    assert folded.system_mode == "folded_into_user"
    assert folded.render(chat(0, 2, system="w1 w2")) == "<|user|>w1 w2\n\nw0 w7<|end|><|assistant|>"
    loaded = load_model(str(tiny), device="cpu")
    with_turn = TransformersBackend(loaded.model, loaded.tokenizer, model_id="x")
    assert with_turn.render(chat(0, 2)) == "<|system|>w1 w2<|end|><|user|>w0 w7<|end|><|assistant|>"
    assert with_turn.render(chat(0, 2, system=None)) == "<|user|>w0 w7<|end|><|assistant|>"


def test_raw_text_gets_bos_and_chat_is_verbatim(backend):
    from tokenizers import processors

    tokenizer = make_tokenizer(96)  # adds BOS like Llama's and Mistral's tokenizers
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    with_bos = TransformersBackend(backend.model, tokenizer, model_id="x")
    assert with_bos.encode(Request("r", text="w5 w6")) == [1, 9, 10]  # the judges' raw formats need it
    rendered = with_bos.render(chat(0, 2))
    assert rendered.startswith("<|system|>")
    assert with_bos.encode(chat(0, 2)) == tokenizer(rendered, add_special_tokens=False)["input_ids"]  # no second BOS


class Counting:
    """The real backend, counting the requests that reach it."""

    def __init__(self, backend):
        self.inner, self.asked = backend, []
        self.name, self.model_id, self.batch_size = backend.name, backend.model_id, backend.batch_size
        self.precision = backend.precision

    def render(self, request):
        return self.inner.render(request)

    def generate(self, requests, settings, on_batch=None):
        self.asked += [r.id for r in requests]
        return self.inner.generate(requests, settings, on_batch)


def test_cache_serves_a_repeat_and_misses_on_any_change(backend, tmp_path):
    counting = Counting(backend)
    cached = CachedBackend(counting, tmp_path)
    requests = [chat(i, 3 + i) for i in range(5)]
    settings = GenerationSettings(max_new_tokens=6)
    first = cached.generate(requests, settings)
    assert len(counting.asked) == 5
    assert cached.generate(requests, settings) == first
    assert len(counting.asked) == 5 and cached.hits == 5
    cached.generate(requests, GenerationSettings(max_new_tokens=7))  # another setting
    cached.generate(requests[:4] + [chat(9, 2)], settings)  # another prompt
    other_system = [Request(r.id, messages=r.messages, system="w3") for r in requests]
    cached.generate(other_system, settings)
    assert len(counting.asked) == 20
    rows = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert set(rows[0]) == {"id", "sample", "prompt", "response", "prompt_tokens", "completion_tokens"}


def test_cache_resumes_after_an_interrupted_run(backend, tmp_path):
    requests = [chat(i, 2 + i) for i in range(10)]
    settings = GenerationSettings(max_new_tokens=5)
    seen = []

    def stop_after_two_batches(batch):
        seen.append(batch)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        CachedBackend(backend, tmp_path).generate(requests, settings, on_batch=stop_after_two_batches)
    assert not list(tmp_path.glob("*[0-9a-f].jsonl")) and len(list(tmp_path.glob("*.partial.jsonl"))) == 1
    counting = Counting(backend)
    resumed = CachedBackend(counting, tmp_path).generate(requests, settings)
    assert len(counting.asked) == 10 - 8  # two batches of 4 were kept
    fresh = backend.generate(requests, settings)
    assert [c.response for c in resumed] == [c.response for c in fresh]
    assert not list(tmp_path.glob("*.partial.jsonl"))


@pytest.fixture(scope="module")
def second_backend(tmp_path_factory):
    path = save_model(build_model("llama", seed=4), tmp_path_factory.mktemp("gen2") / "llama", torch.float32)
    loaded = load_model(str(path), device="cpu")
    return TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.fingerprint, batch_size=4)


def test_shared_generation_fills_each_models_cache(backend, second_backend, tmp_path):
    """generate_shared (how one vLLM engine serves every λ) fills one cache per model from shared
    calls; each cache then answers exactly what its model generates, and asks nothing again."""
    from safemerge.backends.generation import generate_shared

    models = [Counting(backend), Counting(second_backend)]
    caches = [CachedBackend(m, tmp_path) for m in models]
    requests = [chat(i, 2 + i) for i in range(6)]
    settings = GenerationSettings(max_new_tokens=5)
    calls = []

    def grid(todo, settings, members, on_batch):  # one "engine call" per member list
        calls.append((members, [r.id for r in todo]))
        for k in members:
            models[k].generate(todo, settings, lambda batch, k=k: on_batch(k, batch))

    # model 0 was stopped after 2 requests: its cache keeps them, so it misses other requests than model 1
    with caches[0].partial_sink(requests, settings) as keep:
        keep(backend.generate(requests[:2], settings))
    generate_shared(caches, requests, settings, grid)
    assert calls == [([0], [r.id for r in requests[2:]]), ([1], [r.id for r in requests])]
    generate_shared(caches, requests, settings, grid)  # everything is cached now
    assert len(calls) == 2
    for model, inner in zip(models, (backend, second_backend)):
        asked = len(model.asked)
        fresh = CachedBackend(model, tmp_path)
        got = fresh.generate(requests, settings)
        assert fresh.hits == len(requests) and len(model.asked) == asked
        assert [c.response for c in got] == [c.response for c in inner.generate(requests, settings)]
    assert not list(tmp_path.glob("*.partial.jsonl"))

    # two fresh caches that miss the same requests share one call; a model given twice generates once
    calls.clear()
    other = GenerationSettings(max_new_tokens=4)
    generate_shared([CachedBackend(m, tmp_path) for m in (*models, models[0])], requests, other, grid)
    assert calls == [([0, 1], [r.id for r in requests])]
    again = CachedBackend(models[0], tmp_path)
    assert len(again.generate(requests, other)) == len(requests) and again.hits == len(requests)
