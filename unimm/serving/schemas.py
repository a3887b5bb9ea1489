"""Request bodies of the OpenAI-compatible API (pydantic) and the OpenAI error shape.

Only the fields the model can honour are declared; other OpenAI fields (``user``, ``stream_options``,
``presence_penalty``, ...) are accepted and ignored, so existing clients and SDKs work unchanged. Every
string the server reads must be valid Unicode text (``Text``): a lone surrogate is a 400 here, not a
failure of the tokenizer later.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

# torch.Generator.manual_seed takes at most 64 bits; JSON clients mostly stay under 2**53 anyway.
MAX_SEED = 2**63 - 1
# OpenAI's Images API streams 0 to 3 partial images per image.
MAX_PARTIAL_IMAGES = 3


def _encodable(value: Any) -> Any:
    # JSON's "\ud800" escape decodes to a lone surrogate, which UTF-8 (the tokenizer, the logs) cannot
    # carry; pydantic itself only notices on some fields (those with a length limit).
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise PydanticCustomError(
                "invalid_unicode",
                "the text holds a lone surrogate ({character} at character {position}), which is not a "
                "Unicode character: send the character itself or a complete surrogate pair",
                {"character": ascii(value[error.start]), "position": error.start},
            ) from None
    return value


# A string the server reads: checked before any other constraint of the field.
Text = Annotated[str, BeforeValidator(_encodable)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: Text


class ImageURL(_Lenient):
    url: Text
    detail: Text | None = None


class ImageURLPart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, value: Any) -> Any:
        # Some clients send the URL itself instead of {"url": ...}.
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None


class ChatCompletionRequest(_Lenient):
    """``POST /v1/chat/completions``. ``temperature`` omitted or 0 decodes greedily (unlike OpenAI's
    default of 1): the answers of an untrained-for-sampling model are best greedy."""

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # {"include_usage": true} adds a last chunk with usage
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1)


class ImageGenerationRequest(_Lenient):
    """``POST /v1/images/generations`` with two fields of our own: ``guidance_scale`` (classifier-free
    guidance of the language model, 1 turns it off) and ``seed``. ``stream: true`` answers with server-sent
    events as OpenAI's Images API does: ``partial_images`` (0-3) previews of each image, then each image;
    ``partial_images`` is ignored without ``stream``."""

    prompt: Text = Field(min_length=1)
    model: Text | None = None
    n: int = Field(default=1, ge=1)
    size: Text | None = None  # "WIDTHxHEIGHT" in pixels, or "auto"/None for the model's default
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    guidance_scale: float = Field(default=3.0, ge=1.0, le=50.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    partial_images: int | None = Field(default=None, ge=0, le=MAX_PARTIAL_IMAGES)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``. A lone surrogate
    echoed from the request is escaped, or the UTF-8 answer itself would fail."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Names pydantic puts in error locations for union members ("str", "list[...]", "function-after[...]").
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "dict", "list"}


def parameter_path(location: tuple[Any, ...] | list[Any]) -> str | None:
    """A pydantic error location as the parameter it names: ``("body", "messages", 0, "content", "list[...]",
    0, "text", "text")`` -> ``"messages[0].content[0].text"``."""
    path, previous = "", None
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "body" and not path:
            continue
        elif part in _UNION_MEMBERS or "[" in part or "-" in part or part == previous:
            continue  # a union member, or a tagged union's tag before the field of the same name
        else:
            path += f".{part}" if path else part
        previous = part
    return path or None
