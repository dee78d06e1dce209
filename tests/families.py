"""Tiny random models of the real families (Llama 3.1, Gemma 3, Qwen3) carrying their real tokenizer and
chat-template files from ../shared/tokenizers and the generation config of their Instruct model cards.

The files are copied byte for byte into a temporary model directory, never into the repository; a test that
needs them skips when ../shared/tokenizers is absent (a user's fresh clone).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16)


@dataclass(frozen=True)
class Family:
    name: str
    folder: str  # under ../shared/tokenizers
    vocab: int  # the model's embedding rows (Qwen3 pads its 151,669 tokens to 151,936, as the real configs do)
    tied: bool
    generation_config: dict  # as in the Instruct model's generation_config.json

    @property
    def stop_ids(self) -> list[int]:
        return self.generation_config["eos_token_id"]


FAMILIES = {
    "llama3_1": Family("llama3_1", "llama3_1", 128_256, False, {
        "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
        "temperature": 0.6, "top_p": 0.9}),
    "gemma3": Family("gemma3", "gemma3", 262_144, True, {
        "bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True, "eos_token_id": [1, 106],
        "pad_token_id": 0, "top_k": 64, "top_p": 0.95}),
    "qwen3": Family("qwen3", "qwen3", 151_936, False, {
        "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
        "temperature": 0.6, "top_k": 20, "top_p": 0.95}),
}
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def available() -> bool:
    return all((TOKENIZERS / f.folder / "tokenizer.json").exists() for f in FAMILIES.values())


def config_of(family: Family):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    gen = family.generation_config
    ids = dict(bos_token_id=gen["bos_token_id"], eos_token_id=gen["eos_token_id"], pad_token_id=gen.get("pad_token_id"))
    if family.name == "llama3_1":
        return LlamaConfig(vocab_size=family.vocab, num_key_value_heads=2, tie_word_embeddings=False, **ids, **SHAPES)
    if family.name == "gemma3":
        return Gemma3TextConfig(vocab_size=family.vocab, num_key_value_heads=1, tie_word_embeddings=True,
                                sliding_window=16, **ids, **SHAPES)
    return Qwen3Config(vocab_size=family.vocab, num_key_value_heads=2, tie_word_embeddings=False, **ids, **SHAPES)


def build(family: Family, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_of(family))
    with torch.no_grad():  # norms away from 1, so a merge that skips them shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save(model, family: Family, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The model in DTYPE with the family's real tokenizer files and its model card's generation config."""
    model.to(dtype).save_pretrained(path)
    model.to(torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZERS / family.folder / name, path / name)
    (path / "generation_config.json").write_text(json.dumps(family.generation_config, indent=2) + "\n")
    return path


# The package's llama3_1 template is Llama 3's short one (see ../shared/tokenizers/README). Llama 3.1 Instruct's
# own template (its tool calling left out) opens every conversation with a system header carrying the date
# lines, with or without a system message: written out here from its published prompt format.
LLAMA_3_1_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def with_llama_3_1_template(path: Path) -> Path:
    """A saved llama3_1 model directory given Llama 3.1 Instruct's template (chat_template.jinja wins over
    tokenizer_config.json's, as in the Hub repository)."""
    (path / "chat_template.jinja").write_text(LLAMA_3_1_TEMPLATE)
    return path


def scripted(family: Family, chains: list[list[int]], seed: int = 0):
    """A model of FAMILY's architecture whose greedy decode follows CHAINS: after token a comes token b for
    each consecutive (a, b), whatever came before. Attention and MLP outputs are zeroed, so the last hidden
    state is the current token's embedding, normalised; the LM head maps it to its successor with a wide
    margin (a logit of 160 against well under 100). For untied families (Llama, Qwen3)."""
    assert not family.tied, "a tied LM head is the embedding itself: it cannot map a token to another"
    model = build(family, seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.mul_(0.01)
        for chain in chains:
            for a, b in zip(chain, chain[1:]):
                head[b] += 20 * embed[a] / embed[a].norm()
    return model


def favouring_special_tokens(family: Family, tokenizer, seed: int = 0):
    """A model of FAMILY that emits mostly special tokens (every one but the stop ids): their LM-head rows
    (Gemma: their tied embedding rows) are scaled up 50 times."""
    model = build(family, seed)
    ids = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i not in family.stop_ids and i < family.vocab)
    with torch.no_grad():
        model.get_output_embeddings().weight[ids] *= 50
    return model, ids
