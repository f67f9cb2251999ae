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


class _Watchdog:
    """The idle and total time of one relay's waits for a chunk, with one timer per stream.

    A timeout scope per chunk costs a timer set and cancelled for every chunk (hundreds a
    stream); here each wait only notes when it began, and one timer, when it fires, either cuts
    the wait under way that took too long (cancelling the relay's task, as a timeout scope does)
    or sets itself again for when the current wait would be too long. Only waits are timed:
    while the caller is slow to take what was passed on, the stream is not idle.
    """

    __slots__ = ("_cancelling", "_due", "_fired", "_handle", "_loop", "_since", "_task", "times",
                 "why")  # fmt: skip

    def __init__(self, times: StreamTimes) -> None:
        self.times = times
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._since: float | None = None  # loop time the wait under way began
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._fired = False
        self._cancelling = 0
        self.why = ""

    def _limit(self, since: float) -> float:
        """When a wait that began at `since` (loop time) is too long."""
        left = self.times.deadline - time.perf_counter()
        return min(since + self.times.idle, self._loop.time() + left)

    def waiting(self) -> None:
        now = self._loop.time()
        self._since = now
        if self._handle is None:
            self._task = asyncio.current_task()
            self._arm(self._limit(now))
        elif self._limit(now) < self._due:  # the total time ends first
            self._handle.cancel()
            self._arm(self._limit(now))

    def received(self) -> None:
        self._since = None

    def _arm(self, due: float) -> None:
        self._due = due
        self._handle = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        since = self._since
        if since is None:  # not waiting: set again for a wait that would begin now
            self._arm(self._limit(self._loop.time()))
            return
        due = self._limit(since)
        if self._loop.time() < due - 0.001:
            self._arm(due)
            return
        task = self._task
        if task is None or task.done():
            return
        self._fired = True
        self._handle = None
        self._cancelling = task.cancelling()
        self.why = (
            f"no data for {self.times.idle}s"
            if since + self.times.idle <= self._loop.time() + 0.001
            else f"the stream ran longer than {self.times.total}s"
        )
        task.cancel()

    def fired(self) -> bool:
        """The cancellation being handled is this watchdog's alone (not the caller's too)."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def relay(
    answer: UpstreamAnswer,
    meter: Meter,
    times: StreamTimes,
    finish: Callable[[str], None],
    *,
    cut_event: bytes | Callable[[str], bytes] = b"",
    request_id: str = "",
) -> AsyncIterator[bytes]:
    """The answer's body through `meter`, chunk by chunk; `cut_event` (or what it makes of why
    the stream was cut) ends a stream the upstream cut (binary answers have none: the client
    sees a short body). The answer is closed and `finish(outcome)` called however the relay
    ends."""
    outcome = "ok"
    chunks = answer.chunks()
    watch = _Watchdog(times)
    try:
        while True:
            # Azure ends HTTP responses at 230 s: stop cleanly before the platform does.
            if times.deadline - time.perf_counter() <= 0:
                raise StreamCut(f"the stream ran longer than {times.total}s")
            watch.waiting()
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (TimeoutError, UpstreamTimeout, UpstreamUnreachable) as exc:
                raise StreamCut(str(exc) or type(exc).__name__) from exc
            except asyncio.CancelledError:
                if watch.fired():
                    raise StreamCut(watch.why) from None
                raise
            finally:
                watch.received()
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
        last = cut_event(str(exc)) if callable(cut_event) else cut_event
        if last:
            yield last
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "client_gone"
        raise
    finally:
        watch.stop()
        answer.close()
        finish(outcome)
