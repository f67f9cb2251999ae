"""What the daily caps and the budgets share: rows of storage this instance holds blocks of.

An instance reserves a block of a row (requests of a daily cap, billionths of a budget) with a
conditional update and admits calls locally against what it holds (its `allowance`). Every
`sync_seconds` it writes what it counted into each row and reads the row back; a row unused
for `idle_seconds` gives back what it holds, and one unused for `FORGET_SECONDS` is dropped from
memory once no call holds it. What a row holds and how it is written is the subclass's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from shared.platform.background import repeat
from shared.platform.tables import StorageUnavailable

log = logging.getLogger(__name__)

FORGET_SECONDS = 600.0  # a row unused this long is dropped from memory


class Held(Protocol):
    """This instance's view of one row."""

    allowance: int  # reserved here and not taken by a call yet
    last_used: float  # time.monotonic() of its last call
    lock: asyncio.Lock  # one write of the row at a time

    @property
    def dirty(self) -> bool: ...  # counted here and not written yet


class HeldRows[R: Held]:
    """The rows this instance holds blocks of, written back by a task of their own."""

    NAME = ""  # in the logs

    def __init__(self, sync_seconds: float, idle_seconds: float) -> None:
        self._sync_seconds = sync_seconds
        self._idle_seconds = idle_seconds
        self._rows: dict[tuple[str, str], R] = {}
        self._task: asyncio.Task[None] | None = None

    def _busy(self, row: R) -> bool:
        """A call still holds the row: it is not forgotten (its count would be lost)."""
        raise NotImplementedError

    def _may_give_back(self, row: R) -> bool:
        """An idle row hands back its allowance (unless calls running settle into it)."""
        return True

    async def _write_back(self, key: tuple[str, str], row: R, give_back: int) -> None:
        """Write what was counted here into the row, and `give_back` of what it held."""
        raise NotImplementedError

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                repeat(self.sync, self._sync_seconds, self.NAME, log)
            )

    async def sync(self) -> None:
        """Write what this instance counted, hand back what idle rows hold, see the others'."""
        now = time.monotonic()
        for key, row in list(self._rows.items()):
            idle = now - row.last_used > self._idle_seconds
            if idle and not row.dirty and not row.allowance:
                if now - row.last_used > FORGET_SECONDS and not self._busy(row):
                    del self._rows[key]
                continue
            async with row.lock:
                give_back = row.allowance if idle and self._may_give_back(row) else 0
                row.allowance -= give_back
                try:
                    await self._write_back(key, row, give_back)
                except StorageUnavailable:
                    row.allowance += give_back
                    raise

    async def close(self) -> None:
        """Stop syncing, after one last sync that hands everything back."""
        if self._task is not None:
            self._task.cancel()
        for row in self._rows.values():
            row.last_used = 0.0
        try:
            await self.sync()
        except StorageUnavailable:
            log.warning("%s: not flushed on shutdown", self.NAME)
