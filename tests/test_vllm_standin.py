"""The CPU stand-in for vLLM's offline API (tests/vllm_standin, test support only): its generations
equal Hugging Face decodes, base and LoRA, and it enforces vLLM's start-up and LoRA checks. It is
imported in-process under the name ``vllm`` only inside the ``standin`` fixture, so other tests still
see no vLLM."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, lora_adapter, save_model

STANDIN = str(Path(__file__).parent / "vllm_standin")
PROMPTS = [[1, 10, 20, 30], [1, 7], [1, 50, 51, 52, 53, 54], [1, 90, 4, 4, 4]]


def is_vllm(name: str) -> bool:
    return name == "vllm" or name.startswith("vllm.")


@contextlib.contextmanager
def standin_vllm():
    """The stand-in as ``vllm``; afterwards sys.path and sys.modules as they were."""
    saved = {k: v for k, v in sys.modules.items() if is_vllm(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, STANDIN)
    try:
        yield importlib.import_module("vllm")
    finally:
        sys.path.remove(STANDIN)
        for k in [k for k in sys.modules if is_vllm(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        importlib.invalidate_caches()


@pytest.fixture
def vllm():
    with standin_vllm() as module:
        yield module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    model = build_model("llama", seed=3)
    path = save_model(model, root / "llama", torch.float32)
    return {"model": path, "lora": lora_adapter(model, root / "lora", seed=5),
            "lora16": lora_adapter(model, root / "lora16", seed=6, r=16, lora_alpha=16)}


def hf_greedy(model, prompt: list[int], stops: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, repetition_penalty=1.2,
                             max_new_tokens=8, eos_token_id=stops, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy(vllm, stops=()):
    return vllm.SamplingParams(temperature=0.0, repetition_penalty=1.2, max_tokens=8, stop_token_ids=list(stops),
                               detokenize=False)


def prompts(vllm):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=p) for p in PROMPTS]


def test_greedy_equals_a_hugging_face_decode_and_stops(vllm, tiny):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32).eval()
    llm = vllm.LLM(str(tiny["model"]), gpu_memory_utilization=0.5)
    assert llm.llm_engine.model_config.dtype == torch.float32
    outs = llm.generate(prompts(vllm), greedy(vllm))
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt and [o.index for o in out.outputs] == [0]
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, [2])  # eos 2 (config) stops as in vLLM

    # a stop token taken from inside a generation: the output ends with it, finish_reason "stop"
    first = outs[0].outputs[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 8
    stop = first.token_ids[3]
    cut = llm.generate(prompts(vllm)[0], greedy(vllm, [stop]))[0].outputs[0]
    assert cut.token_ids == first.token_ids[:first.token_ids.index(stop) + 1] == hf_greedy(hf, PROMPTS[0], [2, stop])
    assert cut.finish_reason == "stop"


def test_lora_equals_the_merged_adapter(vllm, tiny):
    import peft
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32).eval()
    merged = peft.PeftModel.from_pretrained(base, tiny["lora"]).merge_and_unload().eval()
    llm = vllm.LLM(str(tiny["model"]), enable_lora=True, max_lora_rank=8, gpu_memory_utilization=0.5)
    lora = LoRARequest("l1", 1, str(tiny["lora"]))
    with_lora = llm.generate(prompts(vllm), greedy(vllm), lora_request=lora)
    assert [o.outputs[0].token_ids for o in with_lora] == [hf_greedy(merged, p, [2]) for p in PROMPTS]

    # one shared call, a LoRA (or None) per prompt, as safemerge's generate_grid sends them
    mixed = llm.generate(prompts(vllm) * 2, greedy(vllm), lora_request=[None] * 4 + [lora] * 4)
    base_out = [o.outputs[0].token_ids for o in llm.generate(prompts(vllm), greedy(vllm))]
    assert [o.outputs[0].token_ids for o in mixed] == base_out + [o.outputs[0].token_ids for o in with_lora]
    assert base_out != [o.outputs[0].token_ids for o in with_lora]  # the adapter changes the generations
    assert [c["loras"] for c in llm.calls] == [[1], [0, 1], [0]]


def test_two_engines_must_fit_in_the_gpu(vllm, tiny):
    first = vllm.LLM(str(tiny["model"]), gpu_memory_utilization=0.6)
    with pytest.raises(ValueError, match="not enough free GPU memory"):
        vllm.LLM(str(tiny["model"]), gpu_memory_utilization=0.6)
    first.llm_engine.engine_core.shutdown()
    second = vllm.LLM(str(tiny["model"]), gpu_memory_utilization=0.6)
    with pytest.raises(RuntimeError):
        first.generate(prompts(vllm), greedy(vllm))
    assert second.generate(prompts(vllm)[:1], greedy(vllm))[0].outputs[0].token_ids


def test_lora_and_argument_checks(vllm, tiny):
    from vllm.lora.request import LoRARequest

    with pytest.raises(ValueError, match="max_lora_rank"):
        vllm.LLM(str(tiny["model"]), enable_lora=True, max_lora_rank=12)
    with pytest.raises(TypeError):
        vllm.LLM(str(tiny["model"]), enable_prefix_caching_typo=True)
    with pytest.raises(TypeError):
        vllm.SamplingParams(max_new_tokens=8)
    with pytest.raises(ValueError):
        LoRARequest("zero", 0, str(tiny["lora"]))
    plain = vllm.LLM(str(tiny["model"]), gpu_memory_utilization=0.3)
    with pytest.raises(ValueError, match="LoRA"):
        plain.generate(prompts(vllm), greedy(vllm), lora_request=LoRARequest("l1", 1, str(tiny["lora"])))
    small = vllm.LLM(str(tiny["model"]), enable_lora=True, max_lora_rank=8, gpu_memory_utilization=0.3)
    with pytest.raises(ValueError, match="rank 16"):
        small.generate(prompts(vllm), greedy(vllm), lora_request=LoRARequest("l16", 2, str(tiny["lora16"])))


def test_sampling_is_seeded_and_telemetry_is_dumped(vllm, tiny, tmp_path):
    from vllm import standin

    llm = vllm.LLM(str(tiny["model"]), seed=7, gpu_memory_utilization=0.5)
    params = vllm.SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=6, detokenize=False)
    once, again = (llm.generate(prompts(vllm), params) for _ in range(2))
    samples = [[o.token_ids for o in out.outputs] for out in once]
    assert samples == [[o.token_ids for o in out.outputs] for out in again]
    assert any(len({tuple(s) for s in per}) > 1 for per in samples)  # the samples of a prompt differ
    llm.llm_engine.engine_core.shutdown()
    standin.dump(tmp_path / "log.json")
    assert json.loads((tmp_path / "log.json").read_text()) == [{
        "model": str(tiny["model"]), "enable_lora": False, "gpu_memory_utilization": 0.5, "closed": True,
        "calls": [{"prompts": 4, "loras": [0]}] * 2}]


def test_the_standin_does_not_leak():
    with standin_vllm() as module:
        assert module.__version__ == "0.0.0+safemerge-standin"
        assert importlib.util.find_spec("vllm") is not None
    assert importlib.util.find_spec("vllm") is None
    assert not any(is_vllm(k) for k in sys.modules)
