"""Stream relays: an upstream's event stream passed on as it arrives, metered on the way."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp

from shared import tokens
from shared.catalog import Resource
from shared.errors import ProxyError
from shared.pipeline.operations import usage_numbers
from shared.streaming import StreamMeter
from shared.upstream import UpstreamAnswer

if TYPE_CHECKING:
    from shared.pipeline.call import Call

log = logging.getLogger(__name__)


class StreamCut(Exception):
    """The upstream stream ended before its [DONE] marker."""


def stream_error_event() -> bytes:
    error = ProxyError(
        "upstream_error",
        "The deployment cut the stream before it finished; the answer is incomplete. Retry.",
    )
    return b"data: " + error.body() + b"\n\n"


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
        call.record(resource, status, numbers, streamed=True, estimated=estimated, outcome=outcome)
