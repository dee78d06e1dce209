"""Merges of the real families: tiny random Llama 3.1, Gemma 3 and Qwen3 models with their real tokenizer,
chat template and generation config. Every method and a LoRA adapter; the output loads in transformers, the
tokenizer files, template and generation config are carried over byte for byte, Gemma stays tied."""

from __future__ import annotations

import json

import pytest
import torch
from families import CARRIED_FILES, FAMILIES, available, build, save
from safetensors import safe_open

from safemerge import merge
from safemerge.merging import methods

pytestmark = pytest.mark.skipif(not available(), reason="../shared/tokenizers is absent (real family tokenizers)")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_models(request, tmp_path_factory):
    """{"family", "aligned", "seed0", "seed1", "lora"} for one family, saved in bfloat16 as released."""
    import peft

    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(family.name)
    base = build(family)
    paths = {"family": family, "aligned": save(base, family, root / "aligned")}
    for seed in (0, 1):
        tuned = build(family, seed=seed + 1)
        with torch.no_grad():  # a fine-tune near the aligned model, as real ones are
            for p, q in zip(tuned.parameters(), base.parameters()):
                p.copy_(q + 0.02 * (p - q))
        paths[f"seed{seed}"] = save(tuned, family, root / f"seed{seed}")
    torch.manual_seed(7)
    adapter = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        target_modules=["q_proj", "v_proj", "down_proj"]))
    adapter.save_pretrained(root / "lora")
    paths["lora"] = root / "lora"
    return paths


def tensor_names(directory) -> set[str]:
    names = set()
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    return names


def check_output(out, paths) -> None:
    from transformers import AutoModelForCausalLM

    family = paths["family"]
    for name in CARRIED_FILES:
        assert (out / name).read_bytes() == (paths["aligned"] / name).read_bytes(), f"{family.name}: {name}"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == family.vocab
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    if family.tied:
        assert "lm_head.weight" not in tensor_names(out)
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        assert "lm_head.weight" in tensor_names(out)
    assert list(model.generation_config.eos_token_id) == family.stop_ids
    # the chat template lives in tokenizer_config.json, compared byte for byte above
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_method_merges_a_real_family(family_models, method, tmp_path):
    finetuned = [family_models["seed0"], family_models["seed1"]]
    if methods.get(method).min_models == 1:
        finetuned = finetuned[:1]
    out = tmp_path / "merged"
    merge(family_models["aligned"], finetuned, out, method=method)
    check_output(out, family_models)


def test_a_lora_adapter_merges_onto_a_real_family(family_models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    merge(family_models["aligned"], family_models["lora"], out, lam=1.0, dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    aligned = AutoModelForCausalLM.from_pretrained(family_models["aligned"], dtype=torch.float32)
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, dict(aligned.named_parameters())[n])}
    assert changed and all(any(t in n for t in ("q_proj", "v_proj", "down_proj")) for n in changed)
    for name in CARRIED_FILES:
        assert (out / name).read_bytes() == (family_models["aligned"] / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == family_models["family"].tied


def test_generation_stops_on_every_end_of_turn_id_of_the_generation_config(family_models):
    from safemerge.backends.generation import GenerationSettings, TransformersBackend
    from safemerge.backends.models import load_model

    family = family_models["family"]
    loaded = load_model(str(family_models["aligned"]), device="cpu", dtype="float32")
    backend = TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.fingerprint)
    assert set(family.stop_ids) <= backend.stop_ids()
    assert backend.stop_ids() - set(family.stop_ids) <= {loaded.tokenizer.eos_token_id}
    assert set(backend.generation_config(GenerationSettings(max_new_tokens=4)).eos_token_id) == backend.stop_ids()
