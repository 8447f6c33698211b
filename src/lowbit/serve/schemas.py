"""The OpenAI-compatible request bodies lowbit serves, and the image upscale's, validated
(bad fields: HTTP 400)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEED = {"ge": 0, "lt": 2**63, "strict": True}  # what torch's generators take, not a bool
STOP_CHARS = 1000  # per stop text: the held-back end of the answer is matched against each


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: object) -> object:
        """OpenAI's optional fields may be sent as null (clients serialise unset options so):
        a top-level null is the field's default (a required field stays required)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage (and no choices) before [DONE]


class _Common(_Body):
    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, **SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, strict=True)
    stop: str | list[str] | None = None  # up to 4 texts that end the answer (not included)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        texts = [value] if isinstance(value, str) else value or []
        if len(texts) > 4 or any(not t or len(t) > STOP_CHARS for t in texts):
            raise ValueError(f"stop holds at most 4 non-empty texts of up to {STOP_CHARS:,} "
                             f"characters")  # fmt: skip
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1, strict=True)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)


class ImageGenerationRequest(_Body):
    """OpenAI's ``images/generations`` body for a generator (no text conditioning: the prompt
    must be empty), plus ``seed`` (lowbit's: the samples ``lowbit generate --seed`` draws);
    other fields (quality, style, user, ...) are ignored."""

    model: str | None = None
    prompt: str = ""
    n: int = Field(default=1, ge=1, strict=True)
    seed: int | None = Field(default=None, **SEED)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"  # no "url": the server keeps no files


class UpscaleRequest(_Body):
    """lowbit's ``images/upscale`` body (OpenAI has no upscale): the image file, base64."""

    model: str | None = None
    image: str = Field(min_length=1)
    response_format: Literal["b64_json"] = "b64_json"
