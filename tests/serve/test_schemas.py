"""The request bodies: OpenAI's nullable options, the limits on stop texts."""

import pytest
from pydantic import ValidationError

from lowbit.serve.schemas import (
    STOP_CHARS,
    ChatRequest,
    CompletionRequest,
    ImageGenerationRequest,
)


def test_null_options_take_their_defaults():
    """Clients that serialise unset options send them as null (OpenAI's schema allows it)."""
    nulls = dict.fromkeys(["model", "temperature", "top_p", "seed", "stream", "n", "stop"])
    req = CompletionRequest(prompt="the", max_tokens=None, **nulls)
    got = (req.temperature, req.top_p, req.n, req.stream, req.max_tokens)
    assert got == (1.0, 1.0, 1, False, 16)
    chat = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=None, **nulls)
    assert chat.max_tokens is None and chat.stops() == []
    assert ImageGenerationRequest(n=None, seed=None, size=None).n == 1


def test_a_null_required_field_is_still_missing():
    with pytest.raises(ValidationError, match="prompt"):
        CompletionRequest(prompt=None)


@pytest.mark.parametrize("stop", [["a"] * 5, "", ["x", ""], "y" * (STOP_CHARS + 1)])
def test_bad_stop_texts(stop):
    with pytest.raises(ValidationError, match="stop holds at most 4"):
        CompletionRequest(prompt="the", stop=stop)


def test_a_stop_text_at_the_limit_is_taken():
    assert CompletionRequest(prompt="the", stop="y" * STOP_CHARS).stops() == ["y" * STOP_CHARS]
