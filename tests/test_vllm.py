"""The vLLM backend. Here (no vLLM, no GPU) run: the prompt rendering and token ids against the
transformers backend, the stop tokens, the SamplingParams mapping as plain data, the decoding of
outputs and the error without vLLM. The engine itself runs only where vllm and a GPU are present."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch
from conftest import build_model, lora_adapter, save_model
from test_generation import NO_SYSTEM_TEMPLATE, chat, words

import safemerge
from safemerge.backends.generation import GenerationSettings, Request, TransformersBackend
from safemerge.backends.models import load_model
from safemerge.backends.vllm import MISSING_VLLM, PromptRenderer, completions, sampling_kwargs, stop_token_ids
from safemerge.errors import ConfigError

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model = build_model("llama", seed=3)
    model.generation_config.eos_token_id = [2, 5]  # several stop tokens, as Llama-3's
    return save_model(model, root / "llama", torch.float32)


@pytest.fixture(scope="module")
def transformers_backend(tiny):
    loaded = load_model(str(tiny), device="cpu")
    return TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.fingerprint)


def requests() -> list[Request]:
    return [chat(0, 3), chat(1, 5, system=None), Request("raw", text=words(4)),
            Request("multi", messages=({"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"},
                                       {"role": "user", "content": "w7 w8"}), system="w9")]


@pytest.mark.parametrize("template", ["system_turn", "folded_into_user"])
def test_rendering_and_tokens_match_the_transformers_backend(tiny, template):
    loaded = load_model(str(tiny), device="cpu")
    if template == "folded_into_user":
        loaded.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    reference = TransformersBackend(loaded.model, loaded.tokenizer, model_id="m")
    renderer = PromptRenderer(loaded.tokenizer, "m")
    assert renderer.system_mode == reference.system_mode == template
    for r in requests():
        assert renderer.render(r) == reference.render(r)
        assert renderer.encode(r) == reference.encode(r)


def test_stop_tokens_match_the_transformers_backend(tiny, transformers_backend, tmp_path):
    assert stop_token_ids(tiny, transformers_backend.tokenizer) == transformers_backend.stop_ids() == {2, 5}
    bare = save_model(build_model("llama"), tmp_path / "bare", torch.float32)
    (bare / "generation_config.json").unlink()  # then config.json's eos_token_id, as transformers does
    loaded = load_model(str(bare), device="cpu")
    assert stop_token_ids(bare, loaded.tokenizer) == TransformersBackend(loaded.model, loaded.tokenizer, model_id="m").stop_ids()


def test_sampling_params_mapping():
    greedy = sampling_kwargs(GenerationSettings(), [5, 2])
    assert greedy == {"n": 1, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.2, "max_tokens": 512,
                      "seed": 0, "stop_token_ids": [2, 5], "detokenize": False}
    sampled = sampling_kwargs(GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9, num_samples=4,
                                                 max_new_tokens=64, repetition_penalty=1.0, seed=11), {2})
    assert sampled == {"n": 4, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.0, "max_tokens": 64,
                       "seed": 11, "stop_token_ids": [2], "detokenize": False}
    with pytest.raises(ValueError, match="do_sample"):
        sampling_kwargs(GenerationSettings(num_samples=2), [2])


@dataclass
class Output:  # the two fields of vLLM's CompletionOutput that the backend reads
    index: int
    token_ids: list[int]


def test_outputs_become_completions_like_the_transformers_backend(transformers_backend):
    tok = transformers_backend.tokenizer
    r = chat(0, 3)
    prompt, ids = transformers_backend.render(r), transformers_backend.encode(r)
    outs = [Output(1, [10, 11, 5, 12]), Output(0, [13, 14, 15])]  # out of order; sample 1 stops at token 5
    got = completions(r, prompt, ids, outs, {2, 5}, lambda t: tok.decode(t, skip_special_tokens=True))
    assert [(c.sample, c.response, c.completion_tokens, c.prompt_tokens) for c in got] == [
        (0, tok.decode([13, 14, 15]), 3, len(ids)), (1, tok.decode([10, 11, 5], skip_special_tokens=True), 3, len(ids))]
    assert all(c.prompt == prompt and c.id == "p0" for c in got)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here; this checks the error where it is not")
def test_without_vllm_a_config_error_says_how_to_get_it(tiny):
    from safemerge.backends.vllm import VllmBackend

    with pytest.raises(ConfigError) as e:
        VllmBackend(str(tiny), model_id="m")
    assert str(e.value) == MISSING_VLLM


# --- with vLLM (GPU machines) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm():
    module = pytest.importorskip("vllm", reason="vllm is not installed (pip install 'safemerge[vllm]' on a GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    return module


def test_sampling_kwargs_are_valid_vllm_sampling_params(vllm):
    params = vllm.SamplingParams(**sampling_kwargs(GenerationSettings(do_sample=True, num_samples=3), [2]))
    assert params.n == 3 and params.stop_token_ids == [2]


def test_vllm_greedy_equals_transformers(vllm, tiny, transformers_backend):
    from safemerge.backends.vllm import VllmBackend

    backend = VllmBackend(str(tiny), model_id=transformers_backend.model_id, dtype="float32", gpu_memory_utilization=0.3)
    settings = GenerationSettings(max_new_tokens=12)
    ours = backend.generate(requests(), settings)
    theirs = transformers_backend.generate(requests(), settings)
    assert [(c.id, c.prompt, c.prompt_tokens) for c in ours] == [(c.id, c.prompt, c.prompt_tokens) for c in theirs]
    assert [c.response for c in ours] == [c.response for c in theirs]


def test_one_engine_serves_every_lambda(vllm, tmp_path):
    from safemerge.backends.vllm import VllmBackend

    base = build_model("llama", seed=3)
    aligned = save_model(base, tmp_path / "aligned", torch.float32)
    adapter = lora_adapter(base, tmp_path / "adapter", seed=0)
    engine = VllmBackend(str(aligned), model_id="aligned", dtype="float32", enable_lora=True, max_lora_rank=8,
                         gpu_memory_utilization=0.3)
    settings = GenerationSettings(max_new_tokens=8)
    lams = [0.3, 0.7]
    loras = [engine.lora_request(adapter, lam, tmp_path / "scratch") for lam in lams]
    grid = engine.generate_grid(requests(), settings, loras)
    for lam, got in zip(lams, grid):
        merged = safemerge.merge(str(aligned), [str(adapter)], tmp_path / f"m{lam}", method="linear", lam=lam, progress=False)
        loaded = load_model(str(merged.out), device="cuda", dtype="float32")
        want = TransformersBackend(loaded.model, loaded.tokenizer, model_id="m").generate(requests(), settings)
        assert [c.response for c in got] == [c.response for c in want]
        view = engine.for_lambda(adapter, lam, model_id=loaded.fingerprint, scratch=tmp_path / "scratch")
        assert [c.response for c in view.generate(requests(), settings)] == [c.response for c in got]


def test_vllm_sweep_serves_lambda_trials_as_lora_requests(vllm, tmp_path, sweep_inputs):
    """The sweep on real vLLM: the linear λ trials of a LoRA fine-tune are generated as LoRA requests
    of the aligned engine, and give what `safemerge merge` at that λ generates (fp32, greedy)."""
    import json

    from safemerge.config import SweepConfig
    from safemerge.sweeps.run import sweep

    base = build_model("llama", seed=3)
    aligned = save_model(base, tmp_path / "aligned", torch.float32)
    adapter = lora_adapter(base, tmp_path / "adapter", seed=0)
    cfg = SweepConfig(aligned=str(aligned), finetuned=[str(adapter)], out=tmp_path / "run", methods=["linear"],
                      lambdas=[0.5], safety=[f"file:{sweep_inputs['harmful']}"], judge=f"keyword:{sweep_inputs['keywords']}",
                      task_val=[f"gsm8k:{sweep_inputs['root'] / 'val.jsonl'}"], policy="paper", max_new_tokens=8,
                      backend="vllm", dtype="float32", device="cuda", gpu_memory_utilization=0.3,
                      judge_gpu_memory_utilization=0.3)
    trials = {t["label"]: t for t in sweep(cfg, progress=False).results["trials"]}
    lam = trials["linear λ=0.5 (seed 0)"]
    assert lam["generated_by"].endswith("/lora")
    merged = safemerge.merge(str(aligned), [str(adapter)], tmp_path / "m", method="linear", lam=0.5, progress=False)
    loaded = load_model(str(merged.out), device="cuda", dtype="float32")
    want = TransformersBackend(loaded.model, loaded.tokenizer, model_id="m")
    rows = [json.loads(line) for line in (tmp_path / "run" / "trials" / lam["key"] / "responses" /
                                          "file_harmful.csv_selection.jsonl").read_text().splitlines()]
    got = want.generate([Request(r["id"], messages=({"role": "user", "content": r["prompt"]},),
                                 system=cfg.evaluation.system_prompt) for r in rows], GenerationSettings(max_new_tokens=8))
    assert [r["response"] for r in rows] == [c.response for c in got]
