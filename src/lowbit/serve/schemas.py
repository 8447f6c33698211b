"""The OpenAI-compatible request bodies lowbit serves, and the image upscale's, validated
(bad fields: HTTP 400)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``images/generations`` body for a generator (no text conditioning: the prompt
    must be empty), plus ``seed`` (lowbit's: the samples ``lowbit generate --seed`` draws)."""

    model_config = ConfigDict(extra="ignore")  # quality, style, user, ...

    model: str | None = None
    prompt: str = ""
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"  # no "url": the server keeps no files


class UpscaleRequest(BaseModel):
    """lowbit's ``images/upscale`` body (OpenAI has no upscale): the image file, base64."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    image: str = Field(min_length=1)
    response_format: Literal["b64_json"] = "b64_json"
