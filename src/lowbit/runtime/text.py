"""From text to the loop's token ids and back: chat templates, stop tokens, streamed text."""

from __future__ import annotations

from typing import Any

from lowbit.errors import LowbitError


def stop_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The ids that end a generation: the generation config's end-of-sequence ids (a model may
    have several, e.g. an end-of-turn token) and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError("this model's tokenizer has no chat template; drop --chat (plain text)")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a plain-text prompt (with the tokenizer's usual special tokens)."""
    if not text.strip():
        raise LowbitError("the prompt is empty (only white space)")
    return list(tokenizer(text)["input_ids"])


class TextStream:
    """Turns tokens into text as they come: each :meth:`push` returns the text that became
    final (a multi-byte character split over tokens waits for its last token)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.done = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return ""
        new, self.done = text[self.done :], len(text)
        return new
