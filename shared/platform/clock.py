"""The time, in one place, so tests can move it instead of waiting for it."""

from __future__ import annotations

import time as _wall
from datetime import UTC, datetime, timedelta

_offset = timedelta(0)
_offset_seconds = 0.0  # the same, for `time()` on the per-call path: one float addition


def now() -> datetime:
    return datetime.now(UTC) + _offset


def time() -> float:
    """Seconds since the epoch, as `time.time()`: the per-minute windows' clock."""
    return _wall.time() + _offset_seconds


def shift(delta: timedelta) -> None:
    """Move this process's clock (tests only)."""
    global _offset, _offset_seconds
    _offset += delta
    _offset_seconds = _offset.total_seconds()


def reset() -> None:
    global _offset, _offset_seconds
    _offset = timedelta(0)
    _offset_seconds = 0.0
