"""Fine-tuning under the real templates: the loss covers the assistant's reply and the template's end of
its turn, nothing else. Llama 3.1's date header and Qwen3's empty think block belong to the prompt, and
the prompt trained on is the prompt evaluate renders."""

from __future__ import annotations

import pytest
from families import FAMILIES, available, build, save, with_llama_3_1_template

from safemerge.backends.generation import PromptRenderer, Request
from safemerge.finetuning.data import Example
from safemerge.finetuning.settings import Settings
from safemerge.finetuning.train import load_base
from safemerge.finetuning.trainer import build_trainer

pytestmark = pytest.mark.skipif(not available(), reason="../shared/tokenizers is absent (real family tokenizers)")

QUESTIONS = ["What is 7 times 8?", "Name a prime number above 10."]
REPLIES = ["7 times 8 is 56.", "13 is a prime number."]
# what each template writes after the reply's content, closing the assistant turn (from the templates)
END_OF_TURN = {"llama3_1": "<|eot_id|>", "gemma3": "<end_of_turn>\n", "qwen3": "<|im_end|>\n"}


# each family's packaged template, and Llama 3.1 Instruct's own (with its date header)
TEMPLATES = [*FAMILIES, "llama3_1+3.1-template"]


@pytest.fixture(scope="module", params=TEMPLATES)
def trained_rows(request, tmp_path_factory):
    """(family, tokenizer, examples, tokenized training rows) as TRL's SFTTrainer will train on them."""
    family = FAMILIES[request.param.split("+")[0]]
    root = tmp_path_factory.mktemp(family.name)
    base = save(build(family), family, root / "base")
    if request.param.endswith("3.1-template"):
        with_llama_3_1_template(base)
    path, tokenizer = load_base(str(base))
    examples = [Example(i + 1, "", [{"role": "user", "content": q}], [{"role": "assistant", "content": r}])
                for i, (q, r) in enumerate(zip(QUESTIONS, REPLIES))]
    trainer, _ = build_trainer(path, str(path), tokenizer, examples, [], root / "scratch", "cpu",
                               Settings(max_steps=1, progress=False))
    return family, tokenizer, examples, [trainer.train_dataset[i] for i in range(len(examples))]


def in_loss(row) -> list[bool]:
    """Which tokens the loss is computed on: the labels TRL built (-100 is ignored by the loss)."""
    return [label != -100 for label in row["labels"]]


def test_the_loss_covers_the_reply_and_its_end_of_turn_only(trained_rows):
    family, tok, examples, rows = trained_rows
    for example, reply, row in zip(examples, REPLIES, rows):
        ids, mask = row["input_ids"], in_loss(row)
        assert [t for t, m in zip(ids, mask) if m] == [t for t in row["labels"] if t != -100]
        trained = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        context = tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
        assert trained == reply + END_OF_TURN[family.name]
        assert mask == sorted(mask)  # one span: the context first, then the reply
        # the reference: the template's own rendering of the conversation, split where the reply starts
        rendered = tok.apply_chat_template(example.prompt + example.completion, tokenize=False, enable_thinking=False)
        start = rendered.index(reply)
        assert context == rendered[:start] and trained == rendered[start:]


def test_the_context_trained_on_is_the_prompt_evaluate_renders(trained_rows):
    family, tok, examples, rows = trained_rows
    renderer = PromptRenderer(tok, "tiny")
    for example, row in zip(examples, rows):
        prompt = renderer.render(Request("q", messages=tuple(example.prompt)))  # evaluate's default: thinking off
        mask = in_loss(row)
        assert row["input_ids"][:mask.count(False)] == renderer.encode(Request("q", messages=tuple(example.prompt)))
        context = tok.decode([t for t, m in zip(row["input_ids"], mask) if not m])
        assert context == prompt
        if "Today Date" in tok.chat_template:
            assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" in context
        if family.name == "qwen3":
            assert context.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
            assert "<think>" not in tok.decode([t for t, m in zip(row["input_ids"], mask) if m])
