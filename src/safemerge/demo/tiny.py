"""The demo's tiny aligned chat model, built from scratch on the synthetic corpus (corpus.py).

A byte-level BPE tokenizer trained with `tokenizers`, a chat template with a system turn (the
paper's system prompt is the default when a conversation has none, so fine-tuning data without a
system turn and evaluation with one see the same text), and a small Llama trained with a plain
torch loop, loss on the assistant tokens only. Saved as a normal Hugging Face directory. The
template marks assistant turns with {% generation %} so TRL's assistant_only_loss can find them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from safemerge.demo import corpus

VERSION = "4"
# The content fingerprint (safemerge's XXH3 over every tensor) of the default build under the demo's pinned
# numerics (numerics.py) on x86-64: the model the README's figures come from. tests/test_demo.py builds it again
# and fails when the build drifts (a library changed its kernels, or the world changed without a new VERSION).
BUILD_FINGERPRINT = "xxh3-128:30b83fd768ef143a20b192a4325ef9e8"
SPECIALS = ("<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN = "<|end|>"
RECORD = "safemerge_tiny.json"  # written last: its presence marks a finished build
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>" + corpus.SYSTEM_PROMPT + "<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    hidden: int = 128
    intermediate: int = 352
    layers: int = 2
    heads: int = 4
    vocab: int = 1024
    steps: int = 600  # helpful-only stage
    align_steps: int = 300  # alignment stage: refusal firm enough that merges keep it, thin enough to erode
    batch: int = 32
    lr: float = 2e-3
    align_lr: float = 1e-3
    warmup: int = 50


SIZES = {"default": TinySize(), "test": TinySize(hidden=32, intermediate=64, layers=1, heads=2, vocab=400,
                                                 steps=30, align_steps=10, batch=16)}


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=END_OF_TURN)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_chat(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels with everything but the assistant answer (and its
    end-of-turn token) masked as -100."""
    messages = row["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[:len(prompt_ids)] != prompt_ids:  # the special tokens cut the text, so this holds
        raise RuntimeError("chat template prompt is not a token prefix of the full chat")
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def make_model(size: TinySize, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=end, eos_token_id=end)
    return LlamaForCausalLM(config)


def batches(encoded: list[tuple[list[int], list[int]]], size: TinySize, pad: int, generator):
    """Endless padded batches, a fresh seeded order each epoch."""
    import torch

    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order) - size.batch + 1, size.batch):
            chunk = [encoded[i] for i in order[start:start + size.batch]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
            yield ids, labels, ids != pad


def train(model, encoded, size: TinySize, pad: int, seed: int, progress: bool, steps: int, lr: float,
          stage: str = "training") -> list[float]:
    """``train_steps`` under one progress bar for the stage (none when not ``progress``)."""
    from safemerge.progress import progress_bar

    with progress_bar(stage, steps, progress) as bar:
        return train_steps(model, encoded, size, pad, seed, bar, steps, lr, stage)


def train_steps(model, encoded, size: TinySize, pad: int, seed: int, bar, steps: int, lr: float,
                stage: str) -> list[float]:
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / size.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    losses, stream = [], batches(encoded, size, pad, generator)
    model.train()
    for step in range(steps):
        ids, labels, attention = next(stream)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.advance(description=f"{stage}, loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    return losses


def build_tiny_aligned(out: Path, *, seed: int = 0, progress: bool = True, size: str = "default") -> Path:
    """Train the tiny aligned model and save it to `out` (a Hugging Face directory)."""
    import torch

    chosen = SIZES[size]
    torch.manual_seed(seed)
    with deterministic_algorithms():
        return build_and_save(out, seed, chosen, progress)


@contextmanager
def deterministic_algorithms():
    """Deterministic kernels for the build only: left on, the flag (and its filling of every new
    tensor's memory) slowed the fine-tunes and the sweep that follow in the same process by a third."""
    import torch
    import torch.utils.deterministic

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no kernel reads memory it did not write
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def build_and_save(out: Path, seed: int, chosen: TinySize, progress: bool) -> Path:
    from transformers import GenerationConfig

    from safemerge.checkpoints.readers import open_source
    from safemerge.progress import libraries_silenced

    started = time.perf_counter()
    rows = corpus.aligned_corpus(seed)
    texts = [m["content"] for r in rows + corpus.finetune_rows(seed) for m in r["messages"]] + [corpus.SYSTEM_PROMPT]
    tokenizer = train_tokenizer(texts, chosen.vocab)
    encoded = [encode_chat(tokenizer, r) for r in rows]
    model = make_model(chosen, tokenizer)
    base = [encode_chat(tokenizer, r) for r in corpus.base_corpus(seed)]
    train(model, base, chosen, tokenizer.pad_token_id, seed, progress, chosen.steps, chosen.lr,
          stage="tiny model: helpful")
    losses = train(model, encoded, chosen, tokenizer.pad_token_id, seed + 1, progress, chosen.align_steps,
                   chosen.align_lr, stage="tiny model: alignment")
    model.eval()
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config = GenerationConfig(eos_token_id=end, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=end, do_sample=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with libraries_silenced():  # transformers' "Writing model shards" bar
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = {"version": VERSION, "seed": seed, "size": asdict(chosen), "chats": len(rows),
              "fingerprint": open_source(str(out)).fingerprint(),
              "final_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": time.perf_counter() - started}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def cache_dir() -> Path:
    """$SAFEMERGE_CACHE, else $XDG_CACHE_HOME/safemerge, else ~/.cache/safemerge."""
    if os.environ.get("SAFEMERGE_CACHE"):
        return Path(os.environ["SAFEMERGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "safemerge"


def tiny_aligned_path(size: str = "default") -> Path:
    suffix = "" if size == "default" else f"-{size}"
    return cache_dir() / "demo" / f"tiny-aligned-{VERSION}{suffix}"


def cached_tiny_aligned(rebuild: bool = False, *, progress: bool = True, size: str = "default") -> Path:
    """The cached tiny aligned model, built first when absent (or when rebuild). Built in a temporary
    sibling directory and renamed into place, so an interrupted build leaves no half model."""
    target = tiny_aligned_path(size)
    if (target / RECORD).exists() and not rebuild:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_aligned(work / "model", progress=progress, size=size)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
