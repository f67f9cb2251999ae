"""Server-sent event streams passed through chunk by chunk, metered on the way.

The chat meter looks for the final usage chunk (`"choices": []` with a `usage` object), removes
it for a client that did not ask for it, and keeps the raw stream so that tokens can be
estimated when the upstream sends no usage at all. The Responses meter reads the usage of the
stream's last response event and lets the ids in it be rewritten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shared.governance import tokens

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_KEEP_LIMIT = 2_000_000  # bytes of stream kept for an estimate; beyond that we count what we kept


def _separator_of(data: bytes) -> bytes | None:
    """The event separator a stream uses, from its first line end (None until one came)."""
    newline = data.find(b"\n")
    if newline < 0:
        return None
    return b"\r\n\r\n" if data[newline - 1 : newline] == b"\r" else b"\n\n"


def _split_events(data: bytes, separator: bytes) -> list[bytes]:
    """The events in data, each with its separator."""
    parts = data.split(separator)
    events = [part + separator for part in parts[:-1]]
    if parts[-1]:
        events.append(parts[-1])
    return events


def _event_json(event: bytes) -> dict[str, Any] | None:
    for line in event.splitlines():
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                try:
                    value = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    return None
                return value if isinstance(value, dict) else None
    return None


class _EventMeter:
    """What both event-stream meters do: hold an unfinished event back, and keep the stream
    (up to a limit) for a token estimate when no usage comes."""

    def __init__(self) -> None:
        self._separator: bytes | None = None
        self._buffer = b""
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self.usage: dict[str, Any] | None = None
        self.done = False  # the stream's last event came

    def _complete_events(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Every complete event so far (kept for an estimate), and the stream's separator; an
        unfinished event waits."""
        data = self._buffer + chunk if self._buffer else chunk
        separator = self._separator = self._separator or _separator_of(data)
        if separator is None:
            self._buffer = data
            return b"", b""
        end = data.rfind(separator)
        if end < 0:
            self._buffer = data
            return b"", separator
        end += len(separator)
        if end == len(data):
            complete, self._buffer = data, b""
        else:
            complete, self._buffer = data[:end], data[end:]
        if self._kept_bytes < _KEEP_LIMIT:
            self._kept.append(complete)
            self._kept_bytes += len(complete)
        return complete, separator

    def _kept_events(self) -> list[bytes]:
        if self._separator is None:
            return []  # not one line end came: no complete event, nothing kept
        return _split_events(b"".join(self._kept), self._separator)

    def rest(self) -> bytes:
        """Whatever is left in the buffer when the upstream closed (an unfinished event)."""
        rest, self._buffer = self._buffer, b""
        return rest


class BytesMeter:
    """A binary answer (speech) passed on as it came; it is done whenever it ends."""

    done = True

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def rest(self) -> bytes:
        return b""


class StreamMeter(_EventMeter):
    """Feeds a chat or completions stream through; knows the usage when the stream is done
    (`done`: saw data: [DONE]).

    Every search starts from the end of what arrived, where the usage event and [DONE] are:
    a stream read in one piece costs a few short scans, not several passes over all of it.
    """

    def __init__(self, *, hide_usage: bool) -> None:
        super().__init__()
        self._hide_usage = hide_usage
        self.model: str | None = None  # the answering model, as the usage chunk names it

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send on now: every complete event so far, less a hidden usage chunk."""
        complete, separator = self._complete_events(chunk)
        if not complete:
            return b""
        if not self.done and complete.rfind(b"[DONE]") >= 0:
            self.done = True
        for marker in _USAGE_MARKERS:
            at = complete.rfind(marker)
            if at >= 0:
                complete = self._take_usage(complete, at, separator)
                break
        if self._hide_usage:
            # Injected include_usage adds "usage": null to every chunk; the client never asked.
            parts = complete.split(b',"usage":null')  # split and join: one pass each
            if len(parts) == 1:
                parts = complete.split(b', "usage": null')
            if len(parts) > 1:
                complete = b"".join(parts)
        return complete

    def _take_usage(self, complete: bytes, at: int, separator: bytes) -> bytes:
        """Read the usage event around `at` (and cut it out for a client that did not ask).

        Only that event is looked at: a whole buffered stream is never split.
        """
        start = complete.rfind(separator, 0, at)
        start = 0 if start < 0 else start + len(separator)
        end = complete.find(separator, at)
        end = len(complete) if end < 0 else end + len(separator)
        value = _event_json(complete[start:end])
        usage = value.get("usage") if value else None
        if isinstance(usage, dict):
            self.usage = usage
            model = value.get("model") if value else None
            self.model = model if isinstance(model, str) and model else None
            if self._hide_usage and not value.get("choices"):
                return complete[:start] + complete[end:]
        return complete

    def estimate_completion_tokens(self) -> int:
        """Tokens of the text the stream carried, for when no usage chunk came."""
        parts: list[str] = []
        for event in self._kept_events():
            value = _event_json(event)
            for choice in (value or {}).get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    parts.append(delta["content"])
                elif isinstance(choice.get("text"), str):
                    parts.append(choice["text"])
        return tokens.count("".join(parts))


class EventStreamResponse(StreamingResponse):
    """A streamed answer sent from the request's own task.

    Starlette's StreamingResponse sends the body and waits for the client's disconnect in an
    anyio task group when the server speaks ASGI spec 2.3 or older (uvicorn does): two tasks and
    a cancel scope per stream, 4% of the proxy's CPU per short stream in an A/B run. Here one
    plain task waits for the disconnect and cancels the sending task, which ends the body (the
    relay records the call as the client's leaving) and returns quietly.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone or task.uncancel():
                raise  # cancelled by someone else as well
        finally:
            watcher.cancel()
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()  # a body cut while sending: its finally runs now, not at GC


# Events of a Responses stream that end it, and the pieces that mark an event worth reading.
RESPONSE_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# In an event worth reading; never in a text delta (whose type is "response.output_text…").
_WORTH_READING = (b'"response":', b'"encrypted_content":"', b"event: error")


class ResponseStreamMeter(_EventMeter):
    """Feeds a Responses API stream through event by event (`done`: an end event, completed,
    incomplete or failed, or an error came).

    Only the few events that carry a whole response (created, in_progress, completed, …), an
    item with `encrypted_content`, or an error are parsed: `rewrite` changes them in place (the
    ids the caller sees) and they are encoded again. The text deltas, nearly all of a stream,
    pass as they came. The usage is the last response's.
    """

    def __init__(self, rewrite: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self._rewrite = rewrite
        self.response: dict[str, Any] | None = None  # the last one seen, as the upstream sent it

    def feed(self, chunk: bytes) -> bytes:
        complete, separator = self._complete_events(chunk)
        if not complete:
            return b""
        if not (
            _WORTH_READING[0] in complete
            or _WORTH_READING[1] in complete
            or _WORTH_READING[2] in complete
        ):
            return complete  # text deltas: passed as they came
        # Each marker's next place, found again only once passed: a long chunk is scanned
        # about once per marker, not once per event.
        places = [complete.find(marker) for marker in _WORTH_READING]
        parts, position = [], 0
        while True:
            found = min((at for at in places if at >= 0), default=-1)
            if found < 0:
                break
            start = complete.rfind(separator, position, found)
            start = position if start < 0 else start + len(separator)
            end = complete.find(separator, found) + len(separator)
            parts += (complete[position:start], self._read(complete[start:end], separator))
            position = end
            for index, at in enumerate(places):
                if 0 <= at < position:
                    places[index] = complete.find(_WORTH_READING[index], position)
        parts.append(complete[position:])
        return b"".join(parts)

    def _read(self, event: bytes, separator: bytes) -> bytes:
        lines = event.removesuffix(separator).split(separator[: len(separator) // 2])
        for index, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            try:
                value = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return event
            if not isinstance(value, dict):
                return event
            kind = value.get("type")
            response = value.get("response")
            if isinstance(response, dict):
                self.response = response
                if kind in RESPONSE_END_EVENTS:
                    self.done = True
                    usage = response.get("usage")
                    self.usage = usage if isinstance(usage, dict) else None
            elif kind == "error":
                self.done = True
            self._rewrite(value)
            lines[index] = b"data: " + orjson.dumps(value)
            return separator[: len(separator) // 2].join(lines) + separator
        return event

    def estimate_output_tokens(self) -> int:
        """Tokens of the text deltas, for when no usage came."""
        parts: list[str] = []
        for event in self._kept_events():
            if b"output_text.delta" not in event:
                continue
            value = _event_json(event)
            if value and isinstance(value.get("delta"), str):
                parts.append(value["delta"])
        return tokens.count("".join(parts))
