"""Stream relays: an upstream's event stream passed on as it arrives, metered on the way."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from shared.directory.catalog import Resource
from shared.errors import ProxyError
from shared.governance import tokens
from shared.pipeline.operations import reasoning_of, usage_numbers
from shared.pipeline.streaming import ResponseStreamMeter, StreamMeter
from shared.upstreams.client import UpstreamAnswer

if TYPE_CHECKING:
    from shared.pipeline.call import Call

log = logging.getLogger(__name__)


class StreamCut(Exception):
    """The upstream stream ended before its [DONE] marker."""


_CUT = "The deployment cut the stream before it finished; the answer is incomplete. Retry."


def stream_error_event() -> bytes:
    error = ProxyError("upstream_error", _CUT)
    return b"data: " + error.body() + b"\n\n"


def response_error_event() -> bytes:
    """A Responses stream's error event; its `error` object makes the SDKs raise APIError."""
    error = ProxyError("upstream_error", _CUT)
    event = {"type": "error", "code": error.code, "message": _CUT, "param": None}
    event["error"] = orjson.loads(error.body())["error"]
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


async def _chunks(call: Call, answer: UpstreamAnswer) -> AsyncIterator[bytes]:
    """The upstream's body as it arrives, within the idle and total timeouts.

    Raises StreamCut when the upstream stalls, fails or runs too long; what it sent before a
    failure comes first.
    """
    settings = call.runtime.settings
    deadline = call.started + settings.upstream_total_timeout
    content = answer.response.content
    while True:
        # Azure ends HTTP responses at 230 s: stop cleanly before the platform does.
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise StreamCut(f"the stream ran longer than {settings.upstream_total_timeout}s")
        try:
            # A timeout scope, not wait_for: no task per chunk.
            async with asyncio.timeout(min(settings.stream_idle_timeout, remaining)):
                chunk = await content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            rest = answer.received_before_failure()
            if rest:
                yield rest
            raise StreamCut(str(exc) or type(exc).__name__) from exc
        if not chunk:
            return
        yield chunk


async def relay_events(
    call: Call,
    resource: Resource,
    answer: UpstreamAnswer,
    payload: dict[str, Any],
    hide_usage: bool,
) -> AsyncIterator[bytes]:
    """A chat or completions stream, chunk by chunk; the call is recorded when it ends."""
    meter = StreamMeter(hide_usage=hide_usage)
    outcome = "ok"
    settings = call.runtime.settings
    deadline = call.started + settings.upstream_total_timeout
    content = answer.response.content
    try:
        while True:
            # Azure ends HTTP responses at 230 s: stop cleanly before the platform does.
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                outcome = "cut"
                raise StreamCut(f"the stream ran longer than {settings.upstream_total_timeout}s")
            try:
                # A timeout scope, not wait_for: no task per chunk.
                async with asyncio.timeout(min(settings.stream_idle_timeout, remaining)):
                    chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError) as exc:
                outcome = "cut"
                out = meter.feed(answer.received_before_failure())
                if out:
                    yield out
                raise StreamCut(str(exc) or type(exc).__name__) from exc
            if not chunk:
                break
            out = meter.feed(chunk)
            if out:
                yield out
        rest = meter.rest()
        if rest:
            yield rest
        if not meter.done:
            outcome = "cut"
            raise StreamCut("the upstream closed the stream before [DONE]")
    except StreamCut as exc:
        log.warning("stream %s cut by upstream: %s", call.request_id, exc)
        yield stream_error_event()
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "client_gone"
        raise
    finally:
        answer.close()
        estimated = meter.usage is None
        if estimated:
            prompt = tokens.prompt_tokens(payload)
            completion = meter.estimate_completion_tokens()
            numbers = (prompt, completion, prompt + completion)
        else:
            numbers = usage_numbers(meter.usage)
        status = 200 if outcome == "ok" else 502 if outcome == "cut" else 499
        reasoning = reasoning_of(meter.usage)
        call.record(
            resource,
            status,
            numbers,
            streamed=True,
            estimated=estimated,
            outcome=outcome,
            reasoning=reasoning,
        )


async def relay_bytes(
    call: Call, resource: Resource, answer: UpstreamAnswer, units: int
) -> AsyncIterator[bytes]:
    """A binary answer (speech) as it arrives; the call is recorded with its units when it ends."""
    outcome = "ok"
    try:
        async for chunk in _chunks(call, answer):
            yield chunk
    except StreamCut as exc:
        # The bytes already sent cannot be taken back; the client sees a short body.
        outcome = "cut"
        log.warning("answer %s cut by upstream: %s", call.request_id, exc)
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "client_gone"
        raise
    finally:
        answer.close()
        status = 200 if outcome == "ok" else 502 if outcome == "cut" else 499
        call.record(
            resource,
            status,
            (0, 0, 0),
            streamed=True,
            estimated=False,
            outcome=outcome,
            units=units,
        )


async def relay_response_events(
    call: Call,
    resource: Resource,
    answer: UpstreamAnswer,
    rewrite: Callable[[dict[str, Any]], None],
    finish: Callable[[ResponseStreamMeter, str], None],
) -> AsyncIterator[bytes]:
    """A Responses stream, event by event, its ids rewritten; `finish(meter, outcome)` records
    the call when it ends (ok, cut or client_gone)."""
    meter = ResponseStreamMeter(rewrite)
    outcome = "ok"
    try:
        async for chunk in _chunks(call, answer):
            out = meter.feed(chunk)
            if out:
                yield out
        rest = meter.rest()
        if rest:
            yield rest
        if not meter.done:
            raise StreamCut("the upstream closed the stream before its last event")
    except StreamCut as exc:
        outcome = "cut"
        log.warning("stream %s cut by upstream: %s", call.request_id, exc)
        yield response_error_event()
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "client_gone"
        raise
    finally:
        answer.close()
        finish(meter, outcome)
