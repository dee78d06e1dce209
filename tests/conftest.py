"""Tiny real models, built once per test session: Llama-, Qwen2- (attention biases) and
Gemma-shaped (tied embeddings), their fine-tuned copies and real PEFT LoRA adapters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: the workers share the cores, one thread each
    torch.set_num_threads(1)
    # and so do the processes they start (a test's own env, like the demo's pinned numerics, still wins);
    # idle OpenMP threads sleep rather than spin, so a worker's threads do not starve the other's
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

VOCAB = 96
SHAPES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(kind: str, vocab: int = VOCAB):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SHAPES)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "gemma":
        return Gemma2Config(**common, head_dim=8, tie_word_embeddings=True)
    raise ValueError(kind)


def build_model(kind: str, seed: int = 0, vocab: int = VOCAB):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(kind, vocab))
    with torch.no_grad():  # non-trivial norms and biases, so a merge that skips them shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_model(model, path: Path, dtype: torch.dtype, tokenizer=None) -> Path:
    model.to(dtype).save_pretrained(path)
    (tokenizer or make_tokenizer(model.config.vocab_size)).save_pretrained(path)
    model.to(torch.float32)
    return path


def finetune_copy(model, seed: int, scale: float = 0.02):
    """A 'fine-tuned' copy: every parameter moved by seeded noise, partly shared across seeds
    so deltas of different seeds correlate as real fine-tunes do."""
    import copy

    tuned = copy.deepcopy(model)
    shared = torch.Generator().manual_seed(1234)
    own = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            common = torch.randn(p.shape, generator=shared)
            p.add_((common + torch.randn(p.shape, generator=own)) * scale)
    return tuned


def lora_adapter(model, path: Path, seed: int, **lora) -> Path:
    """A real PEFT LoRA adapter with non-zero B (as after training)."""
    import copy

    import peft

    torch.manual_seed(seed)
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    settings.update(lora)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **settings))
    pm.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{(kind, dtype): {"aligned", "seed0", "seed1", "seed2"} paths} for every architecture and dtype."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind in ("llama", "qwen2", "gemma"):
        base = build_model(kind)
        tuned = [finetune_copy(base, s) for s in range(3)]
        for dtype in (torch.float32, torch.bfloat16):
            d = root / f"{kind}-{str(dtype)[6:]}"
            paths = {"aligned": save_model(base, d / "aligned", dtype)}
            for s, t in enumerate(tuned):
                paths[f"seed{s}"] = save_model(t, d / f"seed{s}", dtype)
            out[kind, dtype] = paths
    return out


@pytest.fixture(scope="session")
def llama32(models):
    return models["llama", torch.float32]


@pytest.fixture(scope="session")
def sweep_inputs(tmp_path_factory):
    """What the sweep tests run on (read only): a tiny bf16 Llama, two fine-tuned seeds, 16 harmful
    prompts, 4 validation and 4 test problems, and a keyword file that splits its responses."""

    root = tmp_path_factory.mktemp("sweep-inputs")
    base = build_model("llama", seed=11)
    aligned = save_model(base, root / "aligned", torch.bfloat16)
    seeds = [save_model(finetune_copy(base, s, scale=0.05), root / f"seed{s}", torch.bfloat16) for s in range(2)]
    return {"root": root, "aligned": aligned, "seeds": seeds, **write_sweep_sets(root)}


def write_sweep_sets(root: Path) -> dict[str, Path]:
    """16 harmful prompts, 4 validation and 4 test problems, and a keyword file that splits the
    tiny models' responses (also the inputs of scripts/output_identity.py)."""
    import json

    harmful = root / "harmful.csv"
    harmful.write_text("goal\n" + "".join(f"w{10 + i} w{30 + (5 * i) % 50} w{60 + i}\n" for i in range(16)))
    for name, start in (("val", 0), ("test", 20)):
        (root / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"w{start + i} w{start + 2 * i}", "answer": f"#### {i}"}) + "\n" for i in range(4)))
    keywords = root / "keywords.txt"
    keywords.write_text("w43\nw86\n")
    return {"harmful": harmful, "val": root / "val.jsonl", "test": root / "test.jsonl", "keywords": keywords}
