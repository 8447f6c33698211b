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
    """Token ids of a conversation in the tokenizer's chat template, ready for the reply.
    Messages the template refuses (e.g. roles that do not alternate) are a LowbitError."""
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError("this model's tokenizer has no chat template; drop --chat (plain text)")
    for m in messages:
        _encodable(m["content"])
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja2's TemplateError and raise_exception() in the template
        if type(exc).__module__.split(".")[0] != "jinja2":
            raise
        raise LowbitError(f"the model's chat template refused the messages: {exc}") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\udfff" in JSON)
        raise LowbitError(f"the text is not valid Unicode ({exc.reason} at {exc.start})") from None


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a plain-text prompt (with the tokenizer's usual special tokens)."""
    if not text.strip():
        raise LowbitError("the prompt is empty (only white space)")
    _encodable(text)
    return list(tokenizer(text)["input_ids"])


class TextStream:
    """Turns tokens into text as they come: each :meth:`push` returns the text that became
    final (a multi-byte character split over tokens waits for its last token), :meth:`flush`
    what is left at the end. Each push decodes only the last few tokens (the ones since the
    previous piece and the piece before, for the tokenizer's context), as text-generation
    servers do, so a long answer costs no more per token than a short one."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read]: the last piece's tokens, already out

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._piece(final=False)

    def flush(self) -> str:
        """The text of tokens not yet out (an incomplete character, as the decoder shows it)."""
        return self._piece(final=True) if self.read < len(self.ids) else ""

    def _piece(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""  # nothing yet, or an incomplete UTF-8 sequence: wait for the rest
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]


class StopText:
    """A :class:`TextStream` cut at the first of ``stops`` (OpenAI's ``stop``): :meth:`push`
    returns the text that is final and before any stop text, holding back an end that could
    still become one; ``stopped`` turns True when one appears (its text is never returned)."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.text, self.stops = TextStream(tokenizer), stops
        self.held, self.stopped = "", False

    def push(self, token: int) -> str:
        return self._add(self.text.push(token)) if not self.stopped else ""

    def flush(self) -> str:
        if self.stopped:
            return ""
        out = self._add(self.text.flush())
        if self.stopped:
            return out
        out, self.held = out + self.held, ""
        return out

    def _add(self, piece: str) -> str:
        held = self.held + piece
        ends = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if ends:
            self.stopped, self.held = True, ""
            return held[: min(ends)]
        keep = max((_overlap(held, s) for s in self.stops), default=0)
        self.held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]


def _overlap(text: str, stop: str) -> int:
    """The longest k < len(stop) with text ending in stop[:k] (0: none): the first position in
    text's last len(stop) - 1 characters from which the rest of text begins stop. Linear in
    those characters' count times stop's length at worst, never in stop's length squared."""
    i = max(0, len(text) - len(stop) + 1)
    while (i := text.find(stop[0], i)) >= 0:
        if stop.startswith(text[i:]):
            return len(text) - i
        i += 1
    return 0
