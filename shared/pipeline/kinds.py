"""What kind of call it is (chat, embeddings, speech, search, …), and the rules that follow
from its kind: the upstream path, the token cap, the pool it draws from, what it used."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shared.directory.catalog import Resource
from shared.errors import ProxyError
from shared.governance import tokens

# api-versions from which Azure OpenAI accepts stream_options (2024-09-01-preview, GA 2024-10-21).
_STREAM_OPTIONS_FROM = "2024-09-01-preview"
# In an upstream path: the member's own deployment (or index) name, filled in per member.
DEPLOYMENT = "{deployment}"


@dataclass(frozen=True)
class CallKind:
    """One kind of proxied call: its model class, upstream path and how its body is read."""

    model_class: str
    path: str
    streams: bool = False
    token_capped: bool = False
    multipart: bool = False  # forwarded as it came (audio uploads); never parsed
    binary: bool = False  # answers bytes (speech), passed on as they arrive
    v1: bool = False  # upstream on Azure's /openai/v1 path (the deployment goes in the body)
    # The path after a member's endpoint, DEPLOYMENT standing for its deployment.
    upstream_path: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        where = "indexes" if self.model_class == "azure-ai-search" else "openai/deployments"
        path = f"openai/v1/{self.path}" if self.v1 else f"{where}/{DEPLOYMENT}/{self.path}"
        object.__setattr__(self, "upstream_path", path)


CHAT = CallKind("openai-chat", "chat/completions", streams=True, token_capped=True)
EXTENSIONS_CHAT = CallKind(
    "openai-chat", "extensions/chat/completions", streams=True, token_capped=True
)
COMPLETIONS = CallKind("openai-completions", "completions", streams=True, token_capped=True)
EMBEDDINGS = CallKind("openai-embeddings", "embeddings")
IMAGES = CallKind("openai-images", "images/generations")
TRANSCRIPTIONS = CallKind("openai-audio", "audio/transcriptions", multipart=True)
TRANSLATIONS = CallKind("openai-audio", "audio/translations", multipart=True)
SPEECH = CallKind("openai-audio", "audio/speech", binary=True)
SEARCH = CallKind("azure-ai-search", "docs/search")
RESPONSES = CallKind("openai-chat", "responses", streams=True, token_capped=True)
# Realtime voice (WebRTC): the call's setup (an SDP offer for an SDP answer), and ephemeral
# client secrets; both name the deployment in the session's `model` (shared/pipeline/realtime.py).
REALTIME_CALLS = CallKind("openai-realtime", "realtime/calls", token_capped=True, v1=True)
REALTIME_CLIENT_SECRETS = CallKind(
    "openai-realtime", "realtime/client_secrets", token_capped=True, v1=True
)
# Azure AI Search has api-versions of its own.
SEARCH_API_VERSION = "2024-07-01"


def supports_stream_options(api_version: str) -> bool:
    return api_version[:10] >= _STREAM_OPTIONS_FROM[:10] or not api_version[:1].isdigit()


def apply_token_cap(
    payload: dict[str, Any],
    cap: int,
    limit_field: str,
    fields: tuple[str, ...] = ("max_tokens", "max_completion_tokens"),
) -> bool:
    """Refuse a limit above the cap; name the cap as the limit when the request has none.

    Returns True when the payload was changed.
    """
    named = False
    for field in fields:
        value = payload.get(field)
        if value is None:
            continue
        named = True
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProxyError(
                "invalid_request", f"'{field}' must be a positive whole number.", param=field
            )
        if value > cap:
            raise ProxyError(
                "max_tokens_exceeds_cap",
                f"'{field}' is {value}, above this event's cap of {cap} tokens per request. "
                f"Ask for {cap} or fewer.",
                param=field,
            )
    if not named:
        payload[limit_field] = cap  # so that no single call can pass the cap
        return True
    return False


def find_pool(
    pools: dict[str, list[Resource]], deployment: str, model_class: str
) -> list[Resource]:
    pool = [r for r in pools.get(deployment, ()) if r.model_class == model_class]
    if pool:
        return pool
    offered = sorted(
        name for name, rs in pools.items() if any(r.model_class == model_class for r in rs)
    )
    kind = model_class.removeprefix("openai-").removeprefix("azure-")
    listing = ", ".join(offered) if offered else "none"
    raise ProxyError(
        "deployment_not_found",
        f"Deployment '{deployment[:100]}' is not in this event's catalog for {kind}. "
        f"Deployments you can use for {kind}: {listing}.",
    )


# Model classes whose calls are counted in tokens even without a daily token cap.
TOKEN_CLASSES = frozenset(
    {"openai-chat", "openai-completions", "openai-embeddings", "openai-realtime"}
)


def units_of(kind: CallKind, answer: Any) -> int:
    """What a call used in its own unit: images made, audio seconds, searches run (speech
    counts the characters it was asked to say, where its bytes are relayed)."""
    if kind.model_class == "openai-images":
        data = answer.get("data") if isinstance(answer, dict) else None
        return len(data) if isinstance(data, list) else 0
    if kind.model_class == "openai-audio":
        duration = answer.get("duration") if isinstance(answer, dict) else None
        return int(duration + 0.999) if isinstance(duration, int | float) else 0
    if kind.model_class == "azure-ai-search":
        return 1
    return 0


def worst_units(kind: CallKind, payload: dict[str, Any]) -> int:
    """The most of its own unit a call may use, known before it runs: the images asked for, the
    characters to say; 0 where it is not known (the length of an uploaded recording)."""
    if kind.model_class == "openai-images":
        n = payload.get("n", 1)
        return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 100 else 1
    if kind.binary:
        said = payload.get("input")
        return len(said) if isinstance(said, str) else 0
    return 0


def estimated_usage(payload: dict[str, Any], completion: int = 0) -> tuple[int, int, int]:
    """The usage of a call whose upstream told none: its prompt counted here, and `completion`."""
    prompt = tokens.prompt_tokens(payload)
    return prompt, completion, prompt + completion


def usage_numbers(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    if not usage:
        return 0, 0, 0
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    total = int(usage.get("total_tokens") or prompt + completion)
    return prompt, completion, total


@dataclass(frozen=True)
class Details:
    """What a usage object says beyond its totals, and the model that answered (its `model`,
    which names a dated version, or under a model router differs from call to call)."""

    reasoning: int = 0  # of the completion (output) tokens
    cached: int = 0  # of the prompt (input) tokens, read from the prompt cache
    audio: int = 0  # of the prompt (input) tokens, audio
    model: str = ""
    audio_output: int = 0  # of the completion (output) tokens, audio (a spoken answer)


NO_DETAILS = Details()


def _count(details: Any, name: str) -> int:
    value = details.get(name) if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def details_of(usage: dict[str, Any] | None, model: Any = None) -> Details:
    """The details of a chat, completions or Responses usage object, and the answer's model."""
    model = model[:100] if isinstance(model, str) else ""
    if not usage:
        return Details(model=model) if model else NO_DETAILS
    prompt = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    output = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    return Details(
        reasoning_of(usage), _count(prompt, "cached_tokens"), _count(prompt, "audio_tokens"),
        model, _count(output, "audio_tokens"),
    )  # fmt: skip


def reasoning_of(usage: dict[str, Any] | None) -> int:
    """Reasoning tokens, part of the completion (chat) or output (Responses) tokens."""
    if not usage:
        return 0
    details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    return int(details.get("reasoning_tokens") or 0) if isinstance(details, dict) else 0
