"""Reading upstream answers within their time: read whole, or relayed as they arrive.

A relay knows nothing of the call it serves: it gets the upstream answer, a meter (what to
pass on and what it counted), the times it may take, and a `finish(outcome)` callback that
records the call once the stream ended: "ok", "cut" (by the upstream: it stalled, failed, ran
too long or closed early) or "client_gone".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from shared.errors import ProxyError
from shared.upstreams.client import UpstreamAnswer, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger(__name__)

_CUT = "The deployment cut the stream before it finished; the answer is incomplete. Retry."


class Meter(Protocol):
    """What a relay passes its chunks through (shared/pipeline/streaming.py)."""

    done: bool  # the stream's last event came: an end before it is a cut

    def feed(self, chunk: bytes) -> bytes: ...

    def rest(self) -> bytes: ...


@dataclass(frozen=True)
class StreamTimes:
    """How long a relay may take: until `deadline` (a time.perf_counter() instant, `total`
    seconds after the call began) and `idle` seconds at most between two chunks."""

    deadline: float
    total: float
    idle: float


def is_event_stream(answer: UpstreamAnswer) -> bool:
    """A 200 answer that streams server-sent events."""
    return answer.status == 200 and "text/event-stream" in answer.headers.get("content-type", "")


async def read_whole(answer: UpstreamAnswer, deadline: float) -> bytes:
    """The whole answer by `deadline` (a time.perf_counter() instant); upstream_timeout or
    upstream_error when it stops midway."""
    try:
        async with asyncio.timeout(max(deadline - time.perf_counter(), 0.001)):
            return await answer.read()
    except (UpstreamTimeout, UpstreamUnreachable, TimeoutError) as exc:
        timed_out = isinstance(exc, UpstreamTimeout | TimeoutError)
        code = "upstream_timeout" if timed_out else "upstream_error"
        raise ProxyError(code, "The deployment stopped answering midway. Retry.") from exc


class StreamCut(Exception):
    """The upstream stream ended before its end: it stalled, failed, ran too long or closed."""


def _stream_error_event() -> bytes:
    error = ProxyError("upstream_error", _CUT)
    return b"data: " + error.body() + b"\n\n"


def _response_error_event() -> bytes:
    error = ProxyError("upstream_error", _CUT)
    event = {"type": "error", "code": error.code, "message": _CUT, "param": None}
    event["error"] = orjson.loads(error.body())["error"]
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


# The last event of a stream the upstream cut: a chat or completions stream's, and a Responses
# stream's (its `error` object makes the SDKs raise APIError).
STREAM_CUT_EVENT = _stream_error_event()
RESPONSE_CUT_EVENT = _response_error_event()


async def relay(
    answer: UpstreamAnswer,
    meter: Meter,
    times: StreamTimes,
    finish: Callable[[str], None],
    *,
    cut_event: bytes = b"",
    request_id: str = "",
) -> AsyncIterator[bytes]:
    """The answer's body through `meter`, chunk by chunk; `cut_event` ends a stream the upstream
    cut (binary answers have none: the client sees a short body). The answer is closed and
    `finish(outcome)` called however the relay ends."""
    outcome = "ok"
    chunks = answer.chunks()
    try:
        while True:
            # Azure ends HTTP responses at 230 s: stop cleanly before the platform does.
            remaining = times.deadline - time.perf_counter()
            if remaining <= 0:
                raise StreamCut(f"the stream ran longer than {times.total}s")
            try:
                # A timeout scope, not wait_for: no task per chunk.
                async with asyncio.timeout(min(times.idle, remaining)):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (TimeoutError, UpstreamTimeout, UpstreamUnreachable) as exc:
                raise StreamCut(str(exc) or type(exc).__name__) from exc
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
        log.warning("stream %s cut by upstream: %s", request_id, exc)
        if cut_event:
            yield cut_event
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "client_gone"
        raise
    finally:
        answer.close()
        finish(outcome)
