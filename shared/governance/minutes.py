"""Counts of the last minute: calls admitted on this instance, and what other instances report.

A `Window` holds this instance's own calls of the last 60 s exactly (one entry per call, its
tokens at their worst case until the call is settled). `SharedSlots` holds counts per 5-second
slot that every instance merges into a row it already writes every sync interval (an
attendee's daily counter row, see shared/governance/caps.py): what other instances admitted is that row
minus what this instance wrote to it. Together they give a count over any instance's calls
that is late by at most the time a count takes to travel (two sync intervals), and that
stays up to one slot (5 s) longer than 60 s for other instances' calls.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import orjson

WINDOW_SECONDS = 60.0
SLOT_SECONDS = 5
_KEEP_SLOTS = int(WINDOW_SECONDS // SLOT_SECONDS) + 2  # the window, its ragged edge, and now


def slot_of(now: float) -> int:
    return int(now // SLOT_SECONDS)


class Call:
    """One admitted call in a window: when, its tokens, and whether it still counts."""

    __slots__ = ("counted", "key", "time", "tokens")

    def __init__(self, time: float, tokens: int, key: str = "") -> None:
        self.time = time
        self.tokens = tokens
        self.key = key  # whose call, in a window shared by several (a pool's)
        self.counted = True


class Window:
    """This instance's calls of the last minute, oldest first, with their running totals."""

    __slots__ = ("by_key", "calls", "requests", "tokens")

    def __init__(self, *, per_key: bool = False) -> None:
        self.calls: deque[Call] = deque()
        self.requests = 0
        self.tokens = 0
        # key -> [requests, tokens] of the calls in the window, when calls carry keys
        self.by_key: dict[str, list[int]] | None = {} if per_key else None

    def prune(self, now: float) -> None:
        calls = self.calls
        edge = now - WINDOW_SECONDS
        while calls and calls[0].time <= edge:
            self._uncount(calls.popleft())

    def add(self, now: float, tokens: int, key: str = "") -> Call:
        call = Call(now, tokens, key)
        self.calls.append(call)
        self.requests += 1
        self.tokens += tokens
        if self.by_key is not None:
            totals = self.by_key.get(key)
            if totals is None:
                self.by_key[key] = [1, tokens]
            else:
                totals[0] += 1
                totals[1] += tokens
        return call

    def settle(self, call: Call, tokens: int) -> None:
        """Replace a call's worst case by what it used (nothing once it left the window)."""
        if call.counted:
            self.tokens += tokens - call.tokens
            if self.by_key is not None:
                self.by_key[call.key][1] += tokens - call.tokens
        call.tokens = tokens

    def cancel(self, call: Call) -> None:
        """A call that was refused after all: it never counted."""
        self._uncount(call)

    def _uncount(self, call: Call) -> None:
        if not call.counted:
            return
        call.counted = False
        self.requests -= 1
        self.tokens -= call.tokens
        if self.by_key is not None:
            totals = self.by_key[call.key]
            totals[0] -= 1
            totals[1] -= call.tokens
            if totals[0] <= 0:
                del self.by_key[call.key]

    def leaving(self, now: float, key: str | None = None) -> list[tuple[float, int, int]]:
        """(seconds until it leaves, requests, tokens) of each counted call, oldest first."""
        return [
            (c.time + WINDOW_SECONDS - now, 1, c.tokens)
            for c in self.calls
            if c.counted and (key is None or c.key == key)
        ]


class SharedSlots:
    """Counts per 5-second slot, merged by every instance into one row they all read.

    `pending` is what this instance counted and has not written yet, `written` what it wrote,
    `seen` the row's totals (every instance's) as last read.
    """

    __slots__ = ("pending", "seen", "written")

    def __init__(self) -> None:
        self.pending: dict[int, list[int]] = {}
        self.written: dict[int, list[int]] = {}
        self.seen: dict[int, list[int]] = {}

    def add(self, slot: int, requests: int, tokens: int) -> None:
        counts = self.pending.get(slot)
        if counts is None:
            self.pending[slot] = [requests, tokens]
        else:
            counts[0] += requests
            counts[1] += tokens

    def dirty(self) -> bool:
        return bool(self.pending)

    def merge(self, stored: Any, now: float) -> tuple[str | None, dict[int, list[int]]]:
        """The row's value with what is pending added, and the pending counts it holds
        (None and nothing when nothing is pending: the row keeps its value)."""
        if not self.pending:
            return None, {}
        taken = {slot: list(counts) for slot, counts in self.pending.items()}
        merged = _decode(stored)
        oldest = slot_of(now) - _KEEP_SLOTS
        merged = {slot: counts for slot, counts in merged.items() if slot >= oldest}
        for slot, (requests, tokens) in taken.items():
            if slot < oldest:
                continue
            counts = merged.setdefault(slot, [0, 0])
            counts[0] += requests
            counts[1] += tokens
        return orjson.dumps({str(k): v for k, v in merged.items()}).decode(), taken

    def stored(self, value: Any, taken: dict[int, list[int]], now: float) -> None:
        """The row now holds `value`, with the pending counts `taken` written into it."""
        oldest = slot_of(now) - _KEEP_SLOTS
        for slot, (requests, tokens) in taken.items():
            pending = self.pending.get(slot)
            if pending is not None:
                pending[0] -= requests
                pending[1] -= tokens
                if pending == [0, 0]:
                    del self.pending[slot]
            if slot >= oldest:
                counts = self.written.setdefault(slot, [0, 0])
                counts[0] += requests
                counts[1] += tokens
        for old in [s for s in self.written if s < oldest]:
            del self.written[old]
        for old in [s for s in self.pending if s < oldest]:
            del self.pending[old]
        self.seen = _decode(value)

    def others(self, now: float) -> list[tuple[float, int, int]]:
        """(seconds until it leaves, requests, tokens) per slot of other instances' calls."""
        first = slot_of(now - WINDOW_SECONDS)
        found = []
        for slot, (requests, tokens) in self.seen.items():
            if slot < first:
                continue
            mine = self.written.get(slot)
            if mine is not None:
                requests -= mine[0]
                tokens -= mine[1]
            if requests > 0 or tokens > 0:
                ends = (slot + 1) * SLOT_SECONDS + WINDOW_SECONDS - now
                found.append((ends, max(requests, 0), max(tokens, 0)))
        return found


def _decode(value: Any) -> dict[int, list[int]]:
    if not value:
        return {}
    try:
        decoded = orjson.loads(value)
        return {int(k): [int(v[0]), int(v[1])] for k, v in decoded.items()}
    except (orjson.JSONDecodeError, TypeError, ValueError, IndexError, AttributeError):
        return {}


def seconds_until(
    leaving: list[tuple[float, int, int]], requests: int = 0, tokens: int = 0
) -> float:
    """Seconds until calls holding `requests` requests and `tokens` tokens have left."""
    if requests <= 0 and tokens <= 0:
        return 0.0
    freed_requests = freed_tokens = 0
    for ends, r, t in sorted(leaving):
        freed_requests += r
        freed_tokens += t
        if freed_requests >= requests and freed_tokens >= tokens:
            return max(ends, 0.0)
    return WINDOW_SECONDS


def whole_seconds(seconds: float) -> int:
    """Seconds as Retry-After gives them: whole, at least 1, at most a minute."""
    return max(1, min(int(WINDOW_SECONDS), math.ceil(seconds)))
