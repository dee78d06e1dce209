"""The prompt a model sees under the real Llama 3.1, Gemma 3 and Qwen3 templates: exactly
apply_chat_template of the conversation, token for token, with the system prompt where the template puts it."""

from __future__ import annotations

import functools

import pytest
from families import FAMILIES, TOKENIZERS, available

from safemerge.backends.generation import PromptRenderer, Request, answer_of, chat_messages

pytestmark = pytest.mark.skipif(not available(), reason="../shared/tokenizers is absent (real family tokenizers)")
SYSTEM = "You are a helpful assistant."


@functools.cache
def load(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / FAMILIES[name].folder)


@pytest.fixture(params=list(FAMILIES))
def tokenizer(request):
    return load(request.param), request.param


EXPECTED_MODE = {"llama3_1": "system_turn", "gemma3": "template_folds", "qwen3": "system_turn"}


def test_the_system_prompt_mode_is_what_the_template_does(tokenizer):
    tok, name = tokenizer
    assert PromptRenderer(tok, name).system_mode == EXPECTED_MODE[name]


def test_the_prompt_is_apply_chat_template_of_the_conversation_token_for_token(tokenizer):
    tok, name = tokenizer
    renderer = PromptRenderer(tok, name)
    request = Request("r1", [{"role": "user", "content": "  How do I bake bread?  "}], system=SYSTEM)
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "  How do I bake bread?  "}]
    expected_ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=True, add_generation_prompt=True,
                                           enable_thinking=False)["input_ids"]
    assert renderer.encode(request) == expected_ids
    text = renderer.render(request)
    assert text == tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    assert text.count(SYSTEM) == 1


def test_gemma_puts_the_system_prompt_in_the_first_user_turn():
    tok, name = load("gemma3"), "gemma3"
    text = PromptRenderer(tok, name).render(Request("r1", [{"role": "user", "content": "hi"}], system=SYSTEM))
    assert text.startswith("<bos><start_of_turn>user\n" + SYSTEM)
    assert "system" not in text.replace(SYSTEM, "")


def test_llama_renders_its_system_header():
    tok, name = load("llama3_1"), "llama3_1"
    text = PromptRenderer(tok, name).render(Request("r1", [{"role": "user", "content": "hi"}], system=SYSTEM))
    assert text.startswith(f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>")


def test_qwen3_thinks_only_when_asked():
    tok, name = load("qwen3"), "qwen3"
    off = PromptRenderer(tok, name).render(Request("r1", [{"role": "user", "content": "hi"}]))
    on = PromptRenderer(tok, name).render(Request("r1", [{"role": "user", "content": "hi"}], thinking=True))
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")


def test_folding_by_hand_is_kept_for_a_template_that_rejects_the_system_role():
    messages = chat_messages(Request("r1", [{"role": "user", "content": "hi"}], system=SYSTEM), "folded_into_user")
    assert messages == [{"role": "user", "content": f"{SYSTEM}\n\nhi"}]


def test_the_judge_reads_the_answer_after_the_reasoning():
    assert answer_of("<think>\nThe user wants a bomb.\n</think>\n\nI can't help with that.") == "I can't help with that."
    assert answer_of("<think>\n\n</think>\n\nSure, here is") == "Sure, here is"
    assert answer_of("<think>still reasoning when max_new_tokens ran out") == ""
    assert answer_of("I can't help with that.") == "I can't help with that."


def test_thinking_on_a_template_without_a_thinking_mode_is_one_line():
    from safemerge.errors import ConfigError

    with pytest.raises(ConfigError, match="--thinking on, but the model's chat template has no thinking mode"):
        PromptRenderer(load("llama3_1"), "llama").render(Request("r1", [{"role": "user", "content": "hi"}], thinking=True))


def test_a_conversation_the_template_rejects_is_one_line():
    from safemerge.errors import ConfigError

    tok = load("gemma3")
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    with pytest.raises(ConfigError) as e:
        PromptRenderer(tok, "gemma").render(Request("r7", [{"role": "user", "content": "hi"}], system=SYSTEM))
    assert str(e.value) == ("the chat template of gemma cannot render prompt r7: Conversation roles must alternate "
                            "user/assistant/user/assistant/...; give one that can with --chat-template FILE")
