"""Server-sent event streams passed through chunk by chunk, metered on the way.

The meter looks for the final usage chunk (`"choices": []` with a `usage` object), removes it
for a client that did not ask for it, and keeps the raw stream so that tokens can be estimated
when the upstream sends no usage at all.
"""

from __future__ import annotations

from typing import Any

import orjson

from shared import tokens

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_KEEP_LIMIT = 2_000_000  # bytes of stream kept for an estimate; beyond that we count what we kept


def _event_end(buffer: bytes) -> int:
    """Index just past the last complete event in buffer, or 0."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _split_events(data: bytes) -> list[bytes]:
    """The events in data, each with its separator (one separator kind per stream)."""
    separator = b"\r\n\r\n" if b"\r\n\r\n" in data else b"\n\n"
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


class StreamMeter:
    """Feeds upstream bytes through; knows the usage when the stream is done."""

    def __init__(self, *, hide_usage: bool) -> None:
        self._hide_usage = hide_usage
        self._buffer = b""
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self.usage: dict[str, Any] | None = None
        self.done = False  # saw data: [DONE]

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send on now: every complete event so far, less a hidden usage chunk."""
        data = self._buffer + chunk if self._buffer else chunk
        end = _event_end(data)
        if end == 0:
            self._buffer = data
            return b""
        complete, self._buffer = data[:end], data[end:]
        if self._kept_bytes < _KEEP_LIMIT:
            self._kept.append(complete)
            self._kept_bytes += len(complete)
        if b"[DONE]" in complete:
            self.done = True
        if any(marker in complete for marker in _USAGE_MARKERS):
            complete = self._take_usage(complete)
        if self._hide_usage:
            # Injected include_usage adds "usage": null to every chunk; the client never asked.
            complete = complete.replace(b',"usage":null', b"").replace(b', "usage": null', b"")
        return complete

    def _take_usage(self, complete: bytes) -> bytes:
        """Read the usage event (and cut it out for a client that did not ask for it).

        Only the event around the marker is looked at: a whole buffered stream is never split.
        """
        separator = b"\r\n\r\n" if b"\r\n\r\n" in complete else b"\n\n"
        for marker in _USAGE_MARKERS:
            at = complete.rfind(marker)
            if at < 0:
                continue
            start = complete.rfind(separator, 0, at)
            start = 0 if start < 0 else start + len(separator)
            end = complete.find(separator, at)
            end = len(complete) if end < 0 else end + len(separator)
            value = _event_json(complete[start:end])
            usage = value.get("usage") if value else None
            if isinstance(usage, dict):
                self.usage = usage
                if self._hide_usage and not value.get("choices"):
                    return complete[:start] + complete[end:]
            return complete
        return complete

    def rest(self) -> bytes:
        """Whatever is left in the buffer when the upstream closed (an unfinished event)."""
        rest, self._buffer = self._buffer, b""
        return rest

    def estimate_completion_tokens(self) -> int:
        """Tokens of the text the stream carried, for when no usage chunk came."""
        parts: list[str] = []
        for event in _split_events(b"".join(self._kept)):
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
