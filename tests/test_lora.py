"""LoRA adapters as fine-tuned inputs: merging the adapter must equal merging the model that
peft materialises with merge_and_unload, without ever building that model."""

import pytest
import torch
from conftest import build_model, lora_adapter, save_model
from reference import assert_matches, load_state, reference

import safemerge

METHODS_WITH_LAMBDA = ["linear", "task_arithmetic", "slerp", "ties", "dare_linear", "dare_ties"]


def materialise(aligned, adapter):
    """The fine-tuned model as peft builds it, in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    state = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    """{kind: (aligned dir, [adapter dirs])}, float32, three adapter seeds each."""
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for kind in ("llama", "qwen2", "gemma"):
        base = build_model(kind)
        aligned = save_model(base, root / kind / "aligned", torch.float32)
        out[kind] = (aligned, [lora_adapter(base, root / kind / f"adapter{s}", seed=s) for s in range(3)])
    return out


def check(out, aligned, tuned_states, method, **p):
    a_state, ours = load_state(aligned), load_state(out)
    assert set(ours) == set(a_state)
    for name, a in a_state.items():
        assert_matches(ours[name], reference(method, name, a, [t[name] for t in tuned_states], **p), name)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("method", METHODS_WITH_LAMBDA)
def test_adapter_merge_equals_merging_the_materialised_model(lora_models, tmp_path, kind, method):
    aligned, adapters = lora_models[kind]
    p = {"lam": 0.7} | ({"density": 0.6} if method in ("ties", "dare_linear", "dare_ties") else {})
    safemerge.merge(str(aligned), [str(adapters[0])], tmp_path / "out", method=method, progress=False, **p)
    p |= {"seed": 42} if method.startswith("dare") else {}
    check(tmp_path / "out", aligned, [materialise(aligned, adapters[0])], method, **p)


@pytest.mark.parametrize("method", ["linear", "model_stock", "ties"])
def test_several_adapter_seeds(lora_models, tmp_path, method):
    aligned, adapters = lora_models["llama"]
    p = {} if method == "model_stock" else {"lam": 0.5}
    safemerge.merge(str(aligned), [str(a) for a in adapters], tmp_path / "out", method=method, progress=False, **p)
    check(tmp_path / "out", aligned, [materialise(aligned, a) for a in adapters], method, **p)


def test_tensors_no_adapter_touches_are_copied_bit_for_bit(lora_models, tmp_path):
    aligned, adapters = lora_models["qwen2"]
    safemerge.merge(str(aligned), [str(adapters[0])], tmp_path / "out", lam=0.37, progress=False)
    a, ours = load_state(aligned), load_state(tmp_path / "out")
    untouched = [n for n in a if "proj" not in n]  # embeddings, norms, lm_head
    assert untouched and all(torch.equal(ours[n], a[n]) for n in untouched)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize(
    "variant",
    [
        dict(use_rslora=True),
        dict(rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 32, "q_proj": 3}),
        dict(modules_to_save=["lm_head"], bias="all"),
        dict(target_modules=["embed_tokens", "q_proj", "up_proj"]),
    ],
    ids=["rslora", "patterns", "modules_to_save", "embedding"],
)
def test_adapter_variants(tmp_path, variant):
    base = build_model("qwen2")  # has attention biases, so bias="all" saves real ones
    aligned = save_model(base, tmp_path / "aligned", torch.float32)
    adapter = tmp_path / "adapter"
    lora_adapter(base, adapter, seed=3, **variant)
    if "modules_to_save" in variant:  # a trained head and biases differ from the aligned ones
        from safetensors.torch import load_file, save_file

        state = load_file(adapter / "adapter_model.safetensors")
        for k in state:
            if "lora_" not in k:
                state[k] = state[k] + 0.05 * torch.randn_like(state[k])
        save_file(state, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    safemerge.merge(str(aligned), [str(adapter)], tmp_path / "out", method="linear", lam=0.8, progress=False)
    check(tmp_path / "out", aligned, [materialise(aligned, adapter)], "linear", lam=0.8)


def test_bfloat16_adapter_rounds_once(tmp_path):
    """bf16 model and adapter: fine-tuned weights are formed in float32, never rounded to bf16."""
    from safetensors.torch import load_file

    base = build_model("llama")
    aligned = save_model(base, tmp_path / "aligned", torch.bfloat16)
    adapter = lora_adapter(base.to(torch.bfloat16), tmp_path / "adapter", seed=1)
    safemerge.merge(str(aligned), [str(adapter)], tmp_path / "out", lam=0.5, progress=False)
    a, ours = load_state(aligned), load_state(tmp_path / "out")
    lora = load_file(adapter / "adapter_model.safetensors")
    exact = 0
    for name, w in a.items():
        f = w.double()
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in lora:
            A, B = lora[f"{key}.lora_A.weight"].double(), lora[f"{key}.lora_B.weight"].double()
            f = f + (8 / 4) * B @ A
        exact += assert_matches(ours[name], reference("linear", name, w, [f], lam=0.5), name)
    assert exact / sum(t.numel() for t in a.values()) > 0.98


def test_an_adapter_fingerprint_ignores_the_order_peft_writes_its_module_set_in(tmp_path):
    """PEFT writes target_modules from a set, so two saves of one adapter differ in bytes; the
    fingerprint (and with it every sweep trial's key and cache entry) must not."""
    import json
    import shutil

    from safemerge.checkpoints.readers import open_source

    base = build_model("llama")
    first = lora_adapter(base, tmp_path / "a", seed=5)
    second = tmp_path / "b"
    shutil.copytree(first, second)
    config = json.loads((second / "adapter_config.json").read_text())
    config["target_modules"] = list(reversed(config["target_modules"]))
    (second / "adapter_config.json").write_text(json.dumps(config, indent=4))
    assert open_source(str(first)).fingerprint() == open_source(str(second)).fingerprint()
    config["lora_alpha"] = config["lora_alpha"] * 2  # a change of meaning still shows
    (second / "adapter_config.json").write_text(json.dumps(config))
    assert open_source(str(first)).fingerprint() != open_source(str(second)).fingerprint()


@pytest.mark.parametrize("method", ["slerp", "ties"])
def test_adapter_statistics_walked_in_chunks(lora_models, tmp_path, monkeypatch, method):
    # a tensor too big to read whole gets its statistics from a chunked read of aligned + B @ A
    import importlib

    from safemerge.merging import methods

    engine = importlib.import_module("safemerge.merging.stream")
    monkeypatch.setattr(engine, "WHOLE_BYTES", 0)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(methods, "CHUNK", 64)
    aligned, adapters = lora_models["gemma"]
    p = {"lam": 0.7} | ({"density": 0.6} if method == "ties" else {})
    safemerge.merge(str(aligned), [str(adapters[1])], tmp_path / "out", method=method, progress=False, **p)
    check(tmp_path / "out", aligned, [materialise(aligned, adapters[1])], method, **p)
