"""Usage records: one per proxied request, appended in batches by a background writer."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from shared.tables import StorageUnavailable, Tables

log = logging.getLogger(__name__)

USAGE_TABLE = "usage"
_BATCH = 100  # Table Storage's limit of operations in one transaction


@dataclass
class UsageRecord:
    """What one request used. `outcome` is ok, upstream_error, cut or client_gone."""

    event_id: str
    attendee_id: str
    deployment: str
    resource_id: str
    model_class: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    streamed: bool
    estimated: bool
    latency_ms: float
    time: datetime
    local_date: str
    request_id: str
    outcome: str = "ok"
    units: int = 0  # images generated, audio seconds, searches: counted in their own units

    @property
    def partition(self) -> str:
        return f"{self.event_id}_{self.local_date}"

    def to_entity(self) -> dict[str, Any]:
        data = asdict(self)
        data["time"] = self.time.isoformat()
        data["latency_ms"] = round(self.latency_ms, 2)
        # Sorted by time within the day; the request id keeps retried writes idempotent.
        row = f"{self.time.strftime('%Y%m%dT%H%M%S%f')}_{self.request_id}"
        return {"PartitionKey": self.partition, "RowKey": row, **data}


class UsageWriter:
    """Buffers records and writes them per partition in batches, within `flush_seconds`.

    A failed write keeps its records and is retried with backoff; records are only dropped
    from memory once Table Storage accepted them.
    """

    def __init__(self, tables: Tables, flush_seconds: float) -> None:
        self._tables = tables
        self._flush_seconds = flush_seconds
        self._pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._count = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.written = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        return self._count

    def append(self, record: UsageRecord) -> None:
        entity = record.to_entity()
        self._pending[entity["PartitionKey"]].append(entity)
        self._count += 1
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = self._flush_seconds
        while self._count:
            await asyncio.sleep(backoff)
            try:
                await self.flush()
                backoff = self._flush_seconds
            except StorageUnavailable as exc:
                self.failures += 1
                backoff = min(backoff * 2, 30.0)
                log.warning(
                    "usage writer: storage unavailable, %d records kept, retry in %.0fs: %s",
                    self._count,
                    backoff,
                    str(exc).splitlines()[0][:200],
                )

    async def flush(self) -> None:
        """Write every pending record now; raises StorageUnavailable and keeps what failed."""
        async with self._lock:
            for partition in list(self._pending):
                rows = self._pending[partition]
                while rows:
                    chunk = rows[:_BATCH]
                    await self._tables.upsert_batch(USAGE_TABLE, chunk)
                    del rows[: len(chunk)]
                    self._count -= len(chunk)
                    self.written += len(chunk)
                del self._pending[partition]

    async def close(self, timeout: float = 10.0) -> None:
        """Flush on shutdown, trying until `timeout`; say how many records could not be saved."""
        if self._task is not None:
            self._task.cancel()
        deadline = asyncio.get_running_loop().time() + timeout
        while self._count:
            try:
                await self.flush()
            except StorageUnavailable:
                if asyncio.get_running_loop().time() > deadline:
                    log.error("usage writer: %d records could not be written", self._count)
                    return
                await asyncio.sleep(0.5)
