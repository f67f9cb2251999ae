"""Usage sinks: a plugin's `on_usage`, fed from a bounded queue of its own, off the request path.

The usage writer journals and queues the app's own record first and then offers it here
(shared/governance/usage.py), which only appends to a queue: a slow or failing sink never
delays a call, never touches the app's records, and never holds another sink up. Each sink has
one task delivering batches, one at a time, in order:

- an async `on_usage` is stopped at the usage budget (a failed attempt); a plain one runs in a
  thread, which cannot be stopped: past the budget it is reported, and waited for;
- a failed attempt is retried `attempts` times in all, after `retry_seconds`, doubling up to
  30 s; a batch still failing is counted as undelivered and logged;
- a full queue (`queue_size`) skips new records for this sink, counted and logged;
- at shutdown what is queued gets until a deadline; the rest is counted and logged.

Trouble is logged with the plugin's name at once, then at most every LOG_EVERY seconds with
the counts since. A killed worker's queued records are not delivered (its own records are: the
usage journal keeps them), so sinks get each record at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY = 10.0
MAX_BACKOFF = 30.0


class Tally:
    """One kind of trouble of one sink: logged at once, then at most every LOG_EVERY seconds
    with the count since the last line (and the last detail)."""

    def __init__(self, level: int, what: str) -> None:
        self.level = level
        self.what = what
        self.total = 0
        self.unlogged = 0
        self.detail = ""
        self.logged = -LOG_EVERY

    def add(self, name: str, count: int, detail: str) -> None:
        self.total += count
        self.unlogged += count
        self.detail = detail
        if time.monotonic() - self.logged >= LOG_EVERY:
            self.flush(name)

    def flush(self, name: str) -> None:
        if not self.unlogged:
            return
        log.log(
            self.level, "plugin %s: %s: %d (%d in all); %s",
            name, self.what, self.unlogged, self.total, self.detail,
        )  # fmt: skip
        self.unlogged = 0
        self.logged = time.monotonic()


class Sink:
    """One plugin's usage hook with its queue, budget, retries and counts."""

    def __init__(self, name: str, plugin: Any, budget_seconds: float) -> None:
        self.name = name
        self.deliver = plugin.on_usage
        self.awaits = inspect.iscoroutinefunction(self.deliver)
        self.budget = budget_seconds
        self.limit = int(getattr(plugin, "queue_size", 10_000))
        self.batch_size = int(getattr(plugin, "batch_size", 100))
        self.batch_seconds = float(getattr(plugin, "batch_seconds", 0.0))
        self.attempts = int(getattr(plugin, "attempts", 1))
        self.retry_seconds = float(getattr(plugin, "retry_seconds", 0.5))
        self.queue: deque[dict[str, Any]] = deque()
        self.sending: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.retries = Tally(logging.WARNING, "attempts to deliver a usage batch failed, retried")
        self.lost = Tally(logging.ERROR, "usage records not delivered")
        self.skipped = Tally(logging.ERROR, "usage records skipped, its queue being full")

    def offer(self, record: dict[str, Any]) -> None:
        """Queue a record (on the request path: no await, no I/O)."""
        if len(self.queue) >= self.limit:
            self.skipped.add(self.name, 1, f"{self.limit} records wait for it")
            return
        self.queue.append(record)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        if not self.wake.is_set():
            self.wake.set()
            self.idle.clear()

    def stats(self) -> dict[str, int]:
        return {
            "queued": len(self.queue) + len(self.sending),
            "delivered": self.delivered,
            "undelivered": self.lost.total,
            "skipped": self.skipped.total,
            "failed_attempts": self.retries.total,
        }

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            if self.batch_seconds and len(self.queue) < self.batch_size:
                await asyncio.sleep(self.batch_seconds)
            self.wake.clear()
            while self.queue:
                count = min(self.batch_size, len(self.queue))
                self.sending = [self.queue.popleft() for _ in range(count)]
                await self._send(self.sending)
                self.sending = []
            self.idle.set()

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                await self._attempt(batch)
            except Exception as exc:
                problem = _describe(exc, self.budget)
                if attempt == self.attempts:
                    self.lost.add(
                        self.name, len(batch),
                        f"after {attempt} attempt(s), last: {problem}; requests "
                        f"{batch[0].get('request_id')} to {batch[-1].get('request_id')}",
                    )  # fmt: skip
                    return
                wait = min(self.retry_seconds * 2 ** (attempt - 1), MAX_BACKOFF)
                self.retries.add(
                    self.name, 1, f"attempt {attempt} of {self.attempts}: {problem}; "
                    f"next in {wait:g} s",
                )  # fmt: skip
                await asyncio.sleep(wait)
            else:
                self.delivered += len(batch)
                return

    async def _attempt(self, batch: list[dict[str, Any]]) -> None:
        if self.awaits:
            async with asyncio.timeout(self.budget):
                await self.deliver(batch)
            return
        work = asyncio.ensure_future(asyncio.to_thread(self.deliver, batch))
        done, _ = await asyncio.wait({work}, timeout=self.budget)
        if not done:
            log.warning(
                "plugin %s: usage hook still running after its budget of %g s; a plain hook "
                "runs in a thread that cannot be stopped, so its next batch waits for it",
                self.name, self.budget,
            )  # fmt: skip
        await work

    async def close(self, deadline: float) -> None:
        """Give what is queued until `deadline` (loop time); count and log what is left."""
        loop = asyncio.get_running_loop()
        if self.task is not None and not self.task.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - loop.time(), 0)):
                    await self.idle.wait()
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        left = len(self.queue) + len(self.sending)
        if left:
            self.lost.add(self.name, left, "still queued when the app stopped")
        self.queue.clear()
        self.sending = []
        for tally in (self.retries, self.lost, self.skipped):
            tally.flush(self.name)


def _describe(exc: BaseException, budget: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"did not finish within its budget of {budget:g} s"
    return f"{type(exc).__name__}: {exc}"
