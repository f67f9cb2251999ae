"""Relays pass an upstream answer on through its meter and report how it ended, over the
upstream client's seam: canned answers in-process, and a real socket for aiohttp's side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from shared.pipeline.relays import STREAM_CUT_EVENT, StreamTimes, relay
from shared.pipeline.streaming import BytesMeter, StreamMeter
from shared.platform.settings import Settings
from shared.upstreams.client import (
    CannedAnswer,
    UpstreamAnswer,
    UpstreamClient,
    UpstreamUnreachable,
)

CHUNK = b'data: {"choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n'
USAGE = (
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n'
)
DONE = b"data: [DONE]\n\n"
SSE = {"Content-Type": "text/event-stream"}


def times(idle: float = 5.0, total: float = 30.0) -> StreamTimes:
    return StreamTimes(time.perf_counter() + total, total, idle)


async def relayed(answer: UpstreamAnswer, meter, **kw) -> tuple[bytes, list[str]]:
    """What the caller got, and the outcomes the finish callback was given."""
    outcomes: list[str] = []
    parts = [
        part
        async for part in relay(
            answer, meter, kw.pop("times", times()), outcomes.append, cut_event=STREAM_CUT_EVENT
        )
    ]
    return b"".join(parts), outcomes


async def test_a_whole_stream_is_passed_on_metered_and_finished_once_as_ok() -> None:
    answer = CannedAnswer(200, SSE, [CHUNK, CHUNK[:9], CHUNK[9:] + USAGE, DONE])
    meter = StreamMeter(hide_usage=True)
    out, outcomes = await relayed(answer, meter)
    assert outcomes == ["ok"] and answer.closed
    assert meter.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert b"prompt_tokens" not in out and out.count(b'"content":"Hi"') == 2
    assert out.endswith(DONE)


async def test_a_stream_the_upstream_closes_early_ends_with_an_error_event_as_cut() -> None:
    answer = CannedAnswer(200, SSE, [CHUNK, CHUNK])  # no [DONE]
    out, outcomes = await relayed(answer, StreamMeter(hide_usage=False))
    assert out == CHUNK + CHUNK + STREAM_CUT_EVENT
    assert b'"code":"upstream_error"' in STREAM_CUT_EVENT
    assert outcomes == ["cut"] and answer.closed


async def test_a_connection_failure_midway_passes_what_came_then_is_a_cut() -> None:
    answer = CannedAnswer(200, SSE, [CHUNK, USAGE], fail=UpstreamUnreachable("reset"))
    meter = StreamMeter(hide_usage=False)
    out, outcomes = await relayed(answer, meter)
    assert out == CHUNK + USAGE + STREAM_CUT_EVENT
    assert meter.usage is not None and meter.usage["total_tokens"] == 7  # its tokens counted
    assert outcomes == ["cut"]


class StalledAnswer(CannedAnswer):
    """Sends one chunk, then nothing more, and never closes."""

    async def chunks(self) -> AsyncIterator[bytes]:
        yield CHUNK
        await asyncio.Event().wait()


async def test_a_stream_that_stalls_is_cut_after_the_idle_time() -> None:
    started = time.perf_counter()
    out, outcomes = await relayed(
        StalledAnswer(200, SSE), StreamMeter(hide_usage=False), times=times(idle=0.2)
    )
    assert 0.2 <= time.perf_counter() - started < 5
    assert out == CHUNK + STREAM_CUT_EVENT and outcomes == ["cut"]


async def test_a_stream_past_its_total_time_is_cut_while_it_waits() -> None:
    started = time.perf_counter()
    out, outcomes = await relayed(
        StalledAnswer(200, SSE), StreamMeter(hide_usage=False), times=times(idle=30, total=0.3)
    )
    assert 0.3 <= time.perf_counter() - started < 5  # the total time, not the idle time
    assert out == CHUNK + STREAM_CUT_EVENT and outcomes == ["cut"]


class SlowAnswer(CannedAnswer):
    """Each chunk after `gap` seconds."""

    def __init__(self, parts: list[bytes], gap: float) -> None:
        super().__init__(200, SSE, parts)
        self.gap = gap

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            await asyncio.sleep(self.gap)
            yield part


async def test_only_waits_for_the_upstream_count_as_idle_never_a_slow_caller() -> None:
    # Chunks 0.1 s apart under a 0.25 s idle time, read by a caller who takes 0.3 s over each:
    # the stream is never silent for the idle time while the relay waits for it.
    answer = SlowAnswer([CHUNK, CHUNK, USAGE, DONE], gap=0.1)
    outcomes: list[str] = []
    parts = []
    async for part in relay(answer, StreamMeter(hide_usage=False), times(idle=0.25), outcomes.append,
                            cut_event=STREAM_CUT_EVENT):  # fmt: skip
        parts.append(part)
        await asyncio.sleep(0.3)
    assert b"".join(parts) == CHUNK + CHUNK + USAGE + DONE and outcomes == ["ok"]


async def test_a_caller_cancelled_while_the_relay_waits_is_not_taken_for_a_stall() -> None:
    answer = StalledAnswer(200, SSE)
    outcomes: list[str] = []

    async def read() -> list[bytes]:
        return [part async for part in relay(answer, StreamMeter(hide_usage=False),
                                             times(idle=0.2), outcomes.append)]  # fmt: skip

    task = asyncio.create_task(read())
    await asyncio.sleep(0.19)
    task.cancel()  # the caller's own cancellation, about when the idle time runs out
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcomes == ["client_gone"] and answer.closed


async def test_a_caller_who_leaves_finishes_the_relay_as_client_gone() -> None:
    answer = StalledAnswer(200, SSE)
    outcomes: list[str] = []
    stream = relay(answer, StreamMeter(hide_usage=False), times(), outcomes.append)
    assert await anext(stream) == CHUNK
    await stream.aclose()  # what the server does when the client goes
    assert outcomes == ["client_gone"] and answer.closed


async def test_a_binary_answer_is_passed_byte_for_byte_and_a_cut_adds_nothing() -> None:
    audio = [b"RIFF", b"\x00" * 100]
    out, outcomes = await relayed(CannedAnswer(200, {}, audio), BytesMeter())
    assert out == b"".join(audio) and outcomes == ["ok"]
    failing = CannedAnswer(200, {}, audio, fail=UpstreamUnreachable("reset"))
    outcomes = []
    out = b"".join([part async for part in relay(failing, BytesMeter(), times(), outcomes.append)])
    assert out == b"".join(audio) and outcomes == ["cut"]  # a short body, no error event


async def test_the_client_sends_through_the_transport_it_was_given() -> None:
    sent: list[tuple[str, str, dict[str, str], bytes]] = []

    async def transport(method: str, url: str, headers: dict[str, str], body: bytes):
        sent.append((method, url, headers, body))
        return CannedAnswer(201, {"X-Ratelimit-Remaining-Tokens": "9"}, b'{"ok":true}')

    client = UpstreamClient(Settings(), transport=transport)
    answer = await client.send("POST", "https://x.example/p", {"api-key": "k"}, b"{}")
    assert sent == [("POST", "https://x.example/p", {"api-key": "k"}, b"{}")]
    assert answer.status == 201 and answer.headers["x-ratelimit-remaining-tokens"] == "9"
    assert await answer.read() == b'{"ok":true}'
    await client.close()


@pytest.fixture
async def cutting_server() -> AsyncIterator[str]:
    """An upstream on 127.0.0.1 that sends a chunked event stream's first events and then
    resets the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        body = CHUNK + USAGE
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n"
        )
        await writer.drain()
        writer.transport.abort()  # no last chunk: the body is cut

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/stream"


async def test_an_aiohttp_answer_cut_midway_gives_its_last_events_before_the_failure(
    cutting_server: str,
) -> None:
    client = UpstreamClient(Settings())
    try:
        answer = await client.send("GET", cutting_server, {}, b"")
        # Read only once aiohttp knows of the reset: it then raises before handing out the
        # events it already holds, which the answer must pass on first.
        content = answer._response.content  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while content.exception() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert content.exception() is not None
        meter = StreamMeter(hide_usage=False)
        out, outcomes = await relayed(answer, meter)
    finally:
        await client.close()
    assert out == CHUNK + USAGE + STREAM_CUT_EVENT and outcomes == ["cut"]
    assert meter.usage is not None and meter.usage["total_tokens"] == 7
