"""Tasks started and not awaited: background loads, lease and block reservations."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from shared.platform.tables import StorageUnavailable


class Background:
    """Holds started tasks until they end (the event loop keeps only weak references to
    tasks, so an unheld one can be collected mid-run) and cancels them on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def repeat(
    work: Callable[[], Awaitable[None]],
    seconds: float,
    what: str,
    log: logging.Logger,
    *,
    first_at_once: bool = False,
) -> None:
    """Run `work` every `seconds` for ever (a sync loop); a storage outage is a warning and
    any other failure is logged, neither ends the loop."""
    if not first_at_once:
        await asyncio.sleep(seconds)
    while True:
        try:
            await work()
        except StorageUnavailable as exc:
            log.warning("%s not synced: %s", what, str(exc)[:200])
        except Exception:
            log.exception("%s: sync failed", what)
        await asyncio.sleep(seconds)
