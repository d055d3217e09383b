"""OpenAI chat-completions wire types (the subset vLLM serves and the router uses); no I/O here.

Field order and names follow the OpenAI reference
(https://platform.openai.com/docs/api-reference/chat/create). Unknown request fields are ignored, as
vLLM does, and logged by name so a client relying on one notices.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields (ignored) and logs their names, never their values."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_ignored_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            ignored = sorted(str(key) for key in data if key not in known)
            if ignored:
                logger.info("%s: ignored fields %s", cls.__name__, ", ".join(ignored))
        return data


# ---------------------------------------------------------------------------------------------- request


class TextPart(OpenAIBaseModel):
    """A text piece of a message's content."""

    type: Literal["text"]
    text: str


class ImageURL(OpenAIBaseModel):
    url: str = Field(description="A base64 data URL (data:image/png;base64,...); remote URLs are refused.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(OpenAIBaseModel):
    """An image of a message's content."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(OpenAIBaseModel):
    """One conversation turn; content is plain text or a list of text and image parts."""

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def image_urls(self) -> list[str]:
        if isinstance(self.content, str):
            return []
        return [part.image_url.url for part in self.content if isinstance(part, ImagePart)]

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template reads it; images become bare ``{"type": "image"}`` parts
        so the (possibly megabytes long) data URL never goes through the template."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        parts = [
            {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
            for part in self.content
        ]
        return {"role": self.role, "content": parts}


class ChatCompletionRequest(OpenAIBaseModel):
    """``POST /v1/chat/completions``. Only what a single-image LLaVA server can honour is accepted."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = Field(None, description="Must be the served model name; omitted means that one.")
    logprobs: bool = Field(False, description="Return the log-probability of each output token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Alternatives per position, with their log-probabilities."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (default 256; capped by the server's ceiling)."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Newer name of max_tokens; wins when both are given."
    )
    n: int = Field(1, description="Number of choices; only 1 is supported.")
    seed: int | None = Field(None, description="Seed of the sampler, for reproducible sampling.")
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} strings that end the answer (not included)."
    )
    stream: bool = Field(False, description="Streaming is not supported; must be false.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    user: str | None = None

    # Refusals name their field (the 400 body's ``param``) and carry no "Value error" prefix.
    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, value: bool) -> bool:
        if value:
            raise PydanticCustomError(
                "unsupported", "streaming is not supported by this server; send stream=false"
            )
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise PydanticCustomError("unsupported", "only n=1 is supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("unsupported", "top_logprobs requires logprobs=true")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        sequences = [value] if isinstance(value, str) else (value or [])
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError("too_many", f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not text for text in sequences):
            raise PydanticCustomError("empty", "stop sequences must not be empty")
        return value

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


# ---------------------------------------------------------------------------------------------- response


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    """One generated token, its log-probability and the most likely alternatives at its position."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    """Token counts; the prompt counts every image placeholder token, as vLLM does."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mmedrag"
    root: str | None = Field(None, description="The folder the model was loaded from.")
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
