"""The bodies callers send on the proxy routes and the error answers, as the OpenAPI document
describes them.

The proxy passes bodies on as they are: it reads only the fields named here that it acts on
(model, stream, the token limits, previous_response_id), so each model allows any other field.
Errors are built per call as plain dicts (shared/pipeline/answers.py, the hot path); tests check
them against `Error`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import STATUS_BY_CODE

ErrorCode = Literal[tuple(sorted(STATUS_BY_CODE))]  # type: ignore[valid-type]


class FieldProblem(BaseModel):
    """One bad field of a body."""

    field: str = Field(description="the field")
    problem: str = Field(description="what is wrong with it")
    fix: str = Field(description="what to send instead")


class ErrorInfo(BaseModel):
    """What went wrong: a code of the contract, and what to do."""

    code: ErrorCode
    message: str = Field(description="what went wrong and how to fix it")
    status: int = Field(ge=400, description="the HTTP status")
    param: str = Field(None, description="the request field at fault, when there is one")
    details: list[FieldProblem] = Field(
        None,
        description="every bad field of a body, the first being `param` (docs/api.md#errors)",
    )


class Error(BaseModel):
    """Every error the proxy produces itself (docs/api.md#errors)."""

    error: ErrorInfo


class UpstreamError(BaseModel):
    """The upstream's own error answer, passed through unchanged (docs/api.md#proxy-routes)."""

    model_config = ConfigDict(extra="allow")

    error: dict[str, Any]


class OpenAIAnswer(BaseModel):
    """The upstream's answer, passed through unchanged."""

    model_config = ConfigDict(extra="allow")


# --- request bodies -------------------------------------------------------------------------


class ProxyBody(BaseModel):
    """A body the proxy passes on: any field besides these."""

    model_config = ConfigDict(extra="allow")


_MODEL = "the deployment (OpenAI v1 paths); ignored on deployments paths"
_STREAM = "answer as server-sent events"
_CAPPED = "at most the event's max_token_cap"


class ChatCompletionRequest(ProxyBody):
    """A chat completion."""

    messages: list[dict[str, Any]]
    model: str = Field(None, description=_MODEL)
    stream: bool = Field(None, description=_STREAM)
    max_tokens: int = Field(None, ge=1, description=_CAPPED)
    max_completion_tokens: int = Field(None, ge=1, description=_CAPPED)


class CompletionRequest(ProxyBody):
    """A completion."""

    prompt: str | list[Any] = Field(None)
    model: str = Field(None, description=_MODEL)
    stream: bool = Field(None, description=_STREAM)
    max_tokens: int = Field(None, ge=1, description=_CAPPED)


class EmbeddingRequest(ProxyBody):
    """Embeddings of a text or texts."""

    input: str | list[Any]
    model: str = Field(None, description=_MODEL)


class ImageRequest(ProxyBody):
    """Image generations."""

    prompt: str = Field(description="what to draw")
    model: str = Field(None, description=_MODEL)
    n: int = Field(None, ge=1, description="how many images")
    size: str = Field(None, description="e.g. 1024x1024")


class TranscriptionRequest(ProxyBody):
    """An audio file to transcribe or translate (multipart), metered in seconds."""

    file: str = Field(description="the audio file", json_schema_extra={"format": "binary"})
    model: str = Field(None, description="the deployment")
    language: str = Field(None, description="ISO-639-1 code")
    response_format: str = Field(None, description="json, text, srt, verbose_json or vtt")


class SpeechRequest(ProxyBody):
    """Metered in characters of input."""

    input: str = Field(max_length=4096, description="the text to say")
    voice: str = Field(description="alloy, echo, fable, onyx, nova, shimmer, …")
    model: str = Field(None, description=_MODEL)
    response_format: str = Field(None, description="mp3 (default), opus, aac, flac, wav or pcm")


class ResponseRequest(ProxyBody):
    """A response to create (the Responses API)."""

    model: str = Field(description="the deployment")
    input: str | list[Any] = Field(None)
    instructions: str = Field(None, description="a system message")
    previous_response_id: str = Field(
        None, description="an id this proxy answered to this key: the call goes where that is"
    )
    max_output_tokens: int = Field(None, ge=1, description=_CAPPED)
    stream: bool = Field(None, description=_STREAM)
    background: bool = Field(None, description="answer at once; poll GET /responses/{response_id}")
    store: bool = Field(None, description="keep the response upstream (default true)")


class RealtimeCallRequest(ProxyBody):
    """A WebRTC call's setup: the SDP offer and the session (or the offer alone as
    application/sdp, the deployment in ?model=)."""

    sdp: str = Field(description="the peer connection's SDP offer")
    session: str = Field(
        None,
        description='JSON: {"type": "realtime", "model": "<deployment>", ...}; '
        "max_output_tokens at most the event's max_token_cap (set to it when missing)",
    )


class RealtimeClientSecretRequest(ProxyBody):
    """An ephemeral key for one realtime session (used with the deployment itself)."""

    session: dict[str, Any] = Field(
        description='{"type": "realtime", "model": "<deployment>", ...}; max_output_tokens '
        "at most the event's max_token_cap"
    )
    expires_after: dict[str, Any] = Field(
        None, description='{"anchor": "created_at", "seconds": N}, N from 10 to 60 (the most)'
    )


class SearchRequest(ProxyBody):
    """An Azure AI Search query, passed through."""

    search: str = Field(None, description="the query text")
    top: int = Field(None, ge=1, description="how many results")
