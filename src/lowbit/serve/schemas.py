"""The OpenAI-compatible request bodies lowbit serves, and the image upscale's, validated
(bad fields: HTTP 400)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED = {"ge": 0, "lt": 2**63, "strict": True}  # what torch's generators take, not a bool


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, **SEED)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, strict=True)
    stop: str | list[str] | None = None  # up to 4 texts that end the answer (not included)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        texts = [value] if isinstance(value, str) else value or []
        if len(texts) > 4 or any(not t for t in texts):
            raise ValueError("stop holds at most 4 non-empty texts")
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


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``images/generations`` body for a generator (no text conditioning: the prompt
    must be empty), plus ``seed`` (lowbit's: the samples ``lowbit generate --seed`` draws)."""

    model_config = ConfigDict(extra="ignore")  # quality, style, user, ...

    model: str | None = None
    prompt: str = ""
    n: int = Field(default=1, ge=1, strict=True)
    seed: int | None = Field(default=None, **SEED)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"  # no "url": the server keeps no files


class UpscaleRequest(BaseModel):
    """lowbit's ``images/upscale`` body (OpenAI has no upscale): the image file, base64."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    image: str = Field(min_length=1)
    response_format: Literal["b64_json"] = "b64_json"
