"""When a safety response may stop early: its verdict can no longer change (GenerationSettings'
stop_strings and stop_openings), as a transformers stopping criterion."""

from __future__ import annotations

from collections.abc import Sequence


def opening_decided(text: str, prefixes: Sequence[str]) -> bool:
    """Whether ``text.lower().strip().startswith(prefixes)`` (XSTest's rule; prefixes lower-case, ending in
    no whitespace) is the same for every continuation of ``text``: its left-stripped opening starts with a
    prefix, or is no longer the start of one. An opening that ends in whitespace or half a character is not
    decided yet: a tokenizer's clean-up may delete that space, and the bytes may complete to anything."""
    opening = text.lower().lstrip()
    if not opening or opening[-1].isspace() or opening.endswith("\ufffd"):
        return False
    return opening.startswith(tuple(prefixes)) or not any(p.startswith(opening) for p in prefixes)


class StopWhenDecided:
    """A transformers stopping criterion: a row is done once its new text contains one of ``strings`` (a
    refusal keyword: the judge's verdict cannot change) or its opening decides the ``openings`` rule.
    ``stopped_at`` records each such row's length, so its response and token count end exactly there rather
    than at the padding after it."""

    def __init__(self, tokenizer, strings: Sequence[str], openings: Sequence[str], prompt_width: int):
        self.tokenizer, self.width = tokenizer, prompt_width
        self.strings, self.openings = tuple(strings), tuple(openings)
        self.stopped_at: dict[int, int] = {}

    def decided(self, text: str) -> bool:
        return any(s in text for s in self.strings) or bool(self.openings) and opening_decided(text, self.openings)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, self.width:]
        for row in range(new.shape[0]):
            if row not in self.stopped_at and self.decided(self.tokenizer.decode(new[row], skip_special_tokens=True)):
                self.stopped_at[row] = new.shape[1]
        return torch.tensor([row in self.stopped_at for row in range(new.shape[0])], device=input_ids.device)
