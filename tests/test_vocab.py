"""Fine-tunes that added tokens: shared rows merged, added rows from the fine-tuned model,
tokenizer and vocab size from the fine-tuned model."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, build_model, finetune_copy, lora_adapter, make_tokenizer, save_model
from reference import load_state, reference

import safemerge

ADDED = 8


def grown(model, seed):
    tuned = finetune_copy(model, seed)
    tuned.resize_token_embeddings(VOCAB + ADDED)
    with torch.no_grad():
        tuned.get_input_embeddings().weight[VOCAB:] = torch.randn(ADDED, tuned.config.hidden_size, generator=torch.Generator().manual_seed(seed))
        if not tuned.config.tie_word_embeddings:
            tuned.get_output_embeddings().weight[VOCAB:] = torch.randn(ADDED, tuned.config.hidden_size)
    return tuned


def grown_tokenizer():
    tok = make_tokenizer(VOCAB)
    tok.add_tokens([f"<new{i}>" for i in range(ADDED)])
    return tok


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_added_rows_come_from_the_fine_tuned_models(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_model(kind)
    aligned = save_model(base, tmp_path / "aligned", torch.float32)
    tuned = [save_model(grown(base, s), tmp_path / f"seed{s}", torch.float32, grown_tokenizer()) for s in (0, 1)]
    out = tmp_path / "out"
    result = safemerge.merge(str(aligned), [str(t) for t in tuned], out, lam=0.4, progress=False)
    assert any("vocabulary grew" in n for n in result.notes)

    a, fs, ours = load_state(aligned), [load_state(t) for t in tuned], load_state(out)
    vocab_tensors = [n for n in a if a[n].shape[0] == VOCAB and a[n].ndim == 2]
    assert set(vocab_tensors) == {"model.embed_tokens.weight"} | ({"lm_head.weight"} if kind == "llama" else set())
    for name in a:
        if name in vocab_tensors:
            assert ours[name].shape[0] == VOCAB + ADDED
            shared = reference("linear", name, a[name], [f[name][:VOCAB] for f in fs], lam=0.4)
            assert torch.allclose(ours[name][:VOCAB].double(), shared, atol=1e-6)
            added = (fs[0][name][VOCAB:] + fs[1][name][VOCAB:]) / 2
            assert torch.allclose(ours[name][VOCAB:], added, atol=1e-7)
        else:
            assert torch.allclose(ours[name].double(), reference("linear", name, a[name], [f[name] for f in fs], lam=0.4), atol=1e-6)

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB + ADDED
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == VOCAB + ADDED
    model = AutoModelForCausalLM.from_pretrained(out)
    new_id = VOCAB + ADDED - 1
    assert model.generate(torch.tensor([[1, new_id]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


def test_adapter_with_resized_embeddings(tmp_path):
    """peft saves resized embedding layers in full (modules_to_save); their added rows are used."""
    base = build_model("llama")
    aligned = save_model(base, tmp_path / "aligned", torch.float32)
    resized = grown(base, 0)
    adapter = tmp_path / "adapter"
    lora_adapter(resized, adapter, seed=0, modules_to_save=["embed_tokens", "lm_head"])
    grown_tokenizer().save_pretrained(adapter)
    out = tmp_path / "out"
    safemerge.merge(str(aligned), [str(adapter)], out, lam=0.5, progress=False)
    ours = load_state(out)
    emb = resized.get_input_embeddings().weight.detach()
    assert ours["model.embed_tokens.weight"].shape[0] == VOCAB + ADDED
    assert torch.allclose(ours["model.embed_tokens.weight"][VOCAB:], emb[VOCAB:])
    a = load_state(aligned)["model.embed_tokens.weight"]
    assert torch.allclose(ours["model.embed_tokens.weight"][:VOCAB], (a + emb[:VOCAB]) / 2, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB + ADDED


def test_fine_tunes_that_disagree_on_vocabulary_are_refused(tmp_path):
    base = build_model("llama")
    aligned = save_model(base, tmp_path / "aligned", torch.float32)
    one = save_model(grown(base, 0), tmp_path / "grown", torch.float32, grown_tokenizer())
    two = save_model(finetune_copy(base, 1), tmp_path / "plain", torch.float32)
    run = subprocess.run(
        [sys.executable, "-m", "safemerge", "merge", str(aligned), str(one), str(two), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("error: the fine-tuned inputs disagree on the rows of ") and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()
