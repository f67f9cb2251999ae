"""Usage records: one per proxied request, appended in batches by a background writer."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from shared.platform import memory
from shared.platform.tables import EncodedRow, Refused, StorageUnavailable, Tables

log = logging.getLogger(__name__)

USAGE_TABLE = "usage"
DAYS_TABLE = "usagedays"  # (event, day|bucket) -> last_write, rolled_at: for the rollups
# Row keys start with the UTC time YYYYMMDDTHHMM...: their first 12 characters name a
# 10-minute bucket.
BUCKET_CHARS = 12
_BATCH = 100  # Table Storage's limit of operations in one transaction
# Records held at once (about 1 KB each) after which the memory they took is handed back to the
# system once they are written (`shared.platform.memory`): a backlog, not one flush interval of traffic.
TRIM_AFTER = 5_000
REFUSED_FILE = "refused-usage.jsonl"  # records storage would not take: for an operator to see
# When no record has come for this long, what is pending is written at once: the Functions host
# kills a worker as soon as its calls are drained, so records must not wait for the interval.
QUIET_SECONDS = 0.1


class Journal:
    """Every record, on local disk from the moment it is appended until storage has it.

    The Functions host stops a Python worker by killing it (no message, no signal it can catch),
    and a worker may crash: what the writer held in memory then survives in the kernel's page
    cache and on disk, and the next writer on that disk (the restarted worker) writes it. Each
    file is held under an exclusive `flock` while its writer lives; a file whose lock can be
    taken belongs to a writer that is gone. One `write()` per record, about 2 us.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._path: Path | None = None
        self._sealed: list[tuple[Path, int]] = []  # written before the last flush began

    def write(self, line: bytes) -> None:
        if self._fd is None:
            self._open()
        if self._fd is not None:
            os.write(self._fd, line)

    def _open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"journal-{os.getpid()}-{time.time_ns()}.jsonl"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # no disk to write to: records live in memory only, as before
            log.warning("usage writer: no journal in %s: %s", self.directory, exc)
            self.directory = Path("/nonexistent")  # tried once
            return
        self._fd, self._path = fd, path

    def seal(self) -> int:
        """Start a new file for what comes next; returns how many files are sealed now."""
        if self._fd is not None and self._path is not None:
            self._sealed.append((self._path, self._fd))
            self._fd = self._path = None
        return len(self._sealed)

    def adopt(self, path: Path, fd: int) -> None:
        """A file taken over from a writer that is gone, deleted once its records are written."""
        self._sealed.append((path, fd))

    def release(self, count: int) -> None:
        """The first `count` sealed files: their records are in storage, so they go."""
        done, self._sealed = self._sealed[:count], self._sealed[count:]
        for path, fd in done:
            try:
                path.unlink()
            except OSError:
                pass
            os.close(fd)

    def close(self) -> None:
        """This writer ends: its files stay for the next writer (their locks are let go)."""
        self.seal()
        for _, fd in self._sealed:
            os.close(fd)
        self._sealed = []


@dataclass
class UsageRecord:
    """What one request used. `outcome` is ok, upstream_status, upstream_error, upstream_timeout,
    no_capacity, cut, client_gone or worker_lost (recorded at its worst case by another
    instance: shared/governance/journal.py); an MCP tool call's also tool_error (the tool
    reported a failure) or rpc_error (the server answered a JSON-RPC error). A background
    response has two records: `background` for the call that started it (no tokens yet) and
    `background_result` with its tokens, written when a call to the proxy first sees it
    finished; a realtime call has one for its setup (`ok`, one unit: the session) and one
    `realtime_response` per response its sideband saw."""

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
    units: int = 0  # images generated, audio seconds, speech characters, searches
    reasoning_tokens: int = 0  # of completion_tokens, those the model spent reasoning
    cached_tokens: int = 0  # of prompt_tokens, those read from the prompt cache
    audio_tokens: int = 0  # of prompt_tokens, audio
    audio_output_tokens: int = 0  # of completion_tokens, audio (a spoken answer, realtime)
    model: str = ""  # the model that answered, as the answer names it (empty: not told)
    cost_nano: int = 0  # what the call cost, in billionths of the currency, when priced
    unpriced: bool = False  # it used something no price covers: its cost is not known
    price_source: str = ""  # the price it was costed at: "<model>@<date>", "resource", ...
    tool: str = ""  # an MCP tool call's tool (model_class mcp; deployment: the MCP server)

    @property
    def partition(self) -> str:
        return f"{self.event_id}_{self.local_date}"

    def to_entity(self) -> dict[str, Any]:
        data = dict(self.__dict__)  # flat fields: no need for asdict's deep copy
        data["time"] = self.time.isoformat()
        data["latency_ms"] = round(self.latency_ms, 2)
        # Sorted by time within the day; the request id keeps retried writes idempotent.
        t = self.time  # as strftime("%Y%m%dT%H%M%S%f"), at a third of its CPU
        row = (
            f"{t.year:04d}{t.month:02d}{t.day:02d}T{t.hour:02d}{t.minute:02d}{t.second:02d}"
            f"{t.microsecond:06d}_{self.request_id}"
        )
        return {"PartitionKey": self.partition, "RowKey": row, **data}


class UsageWriter:
    """Buffers records and writes them per partition in batches, within `flush_seconds`.

    Records leave memory only once Table Storage accepted them. While storage is down, writes
    are retried with backoff (up to 30 s apart); beyond `max_pending` records in memory, and on
    a shutdown that cannot reach storage, records are spilled as JSON lines to `spill_dir` and
    written when storage answers again (by this process or the next one on the same disk).
    Rewriting a record is harmless: its row key is unique, so a retry cannot count it twice.
    """

    def __init__(
        self,
        tables: Tables,
        flush_seconds: float,
        spill_dir: Path | None = None,
        max_pending: int = 50_000,
        observer: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._tables = tables
        # Told of each record once it is journaled and queued (the plugins' usage sinks).
        self._observer = observer
        self._flush_seconds = flush_seconds
        self._spill_dir = spill_dir
        self._max_pending = max_pending
        self._pending: dict[str, list[EncodedRow]] = defaultdict(list)
        self._count = 0
        self._peak = 0  # most records held at once since memory was last handed back
        self._unmarked: set[tuple[str, str]] = set()  # (partition, bucket) written, not marked
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._spilled_checked = False
        self._journal = Journal(spill_dir) if spill_dir is not None else None
        self._wake = asyncio.Event()
        self._last_append = 0.0
        self._quiet_check: asyncio.TimerHandle | None = None
        self.written = 0
        self.failures = 0
        self.refused = 0  # records storage would not take, set aside in REFUSED_FILE
        self.trims = 0  # times memory was handed back after a backlog was written

    @property
    def pending(self) -> int:
        return self._count

    def append(self, record: UsageRecord) -> None:
        self.append_entity(record.to_entity())

    def append_entity(self, entity: dict[str, Any]) -> None:
        """A record as its usage table entity (`UsageRecord.to_entity`), such as one made
        when its call was admitted (shared/governance/journal.py)."""
        row = self._add(entity)  # encoded now: a flush then only joins bytes
        if self._journal is not None:
            self._journal.write(row.json + b"\n")
        if self._count > self._max_pending:
            self._spill()
        self._last_append = time.monotonic()
        self._ensure_running()
        if self._quiet_check is None:
            self._quiet_check = asyncio.get_running_loop().call_later(QUIET_SECONDS, self._quiet)
        if self._observer is not None:
            try:
                self._observer(entity)
            except Exception:  # the record is kept already: an observer never costs it
                log.exception(
                    "usage writer: the observer failed on request %s", entity.get("request_id")
                )

    def _quiet(self) -> None:
        """Wake the writer once no record has come for QUIET_SECONDS (one timer per period)."""
        idle = time.monotonic() - self._last_append
        if idle >= QUIET_SECONDS:
            self._quiet_check = None
            self._wake.set()
        else:
            loop = asyncio.get_running_loop()
            self._quiet_check = loop.call_later(QUIET_SECONDS - idle, self._quiet)

    def _add(self, entity: dict[str, Any]) -> EncodedRow:
        row = self._tables.encode_upsert(USAGE_TABLE, entity)
        self._pending[row.partition].append(row)
        self._count += 1
        if self._count > self._peak:
            self._peak = self._count
        return row

    def start(self) -> None:
        """Take over what earlier writers on this disk left (spilled or journaled) now."""
        self._spilled_checked = False
        self._ensure_running()
        self._wake.set()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = self._flush_seconds
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), backoff)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self._spilled_checked:
                self._spilled_checked = self._load_spilled()
            if not self._count and not self._unmarked:
                return
            try:
                await self.flush()
                backoff = self._flush_seconds
                if not self._count and self._peak >= TRIM_AFTER:
                    self._peak = 0
                    self.trims += await memory.trim()
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
            sealed = self._journal.seal() if self._journal is not None else 0
            await self._flush()
            if self._journal is not None:
                self._journal.release(sealed)

    async def _flush(self) -> None:
        for partition in list(self._pending):
            rows = self._pending[partition]
            while rows:  # records appended meanwhile join this loop
                chunk = rows[:_BATCH]
                try:
                    await self._tables.upsert_encoded(USAGE_TABLE, chunk)
                    refused: list[EncodedRow] = []
                except Refused:
                    refused = await self._write_apart(chunk)
                    self._set_aside(refused)
                self._unmarked.update((partition, row.row[:BUCKET_CHARS]) for row in chunk)
                del rows[: len(chunk)]
                self._count -= len(chunk)
                self.written += len(chunk) - len(refused)
            del self._pending[partition]
        # Mark the 10-minute buckets written to: the rollup recomputes only those. A bucket
        # stays unmarked until storage took its mark, even if a later batch failed.
        now = time.time()
        for partition, bucket in sorted(self._unmarked):
            event_id, _, day = partition.rpartition("_")
            await self._tables.upsert(
                DAYS_TABLE,
                {"PartitionKey": event_id, "RowKey": f"{day}|{bucket}", "last_write": now},
            )
            self._unmarked.discard((partition, bucket))

    async def _write_apart(self, rows: list[EncodedRow]) -> list[EncodedRow]:
        """Write a batch storage refused in halves, down to single records; return the records
        refused on their own.

        One bad record costs about 2 x log2(100) small batches instead of stopping the writer.
        An outage meanwhile raises: the whole batch stays pending and is tried again.
        """
        if len(rows) == 1:
            return rows
        half = len(rows) // 2
        refused = []
        for part in (rows[:half], rows[half:]):
            try:
                await self._tables.upsert_encoded(USAGE_TABLE, part)
            except Refused:
                refused += await self._write_apart(part)
        return refused

    def _set_aside(self, rows: list[EncodedRow]) -> None:
        """Keep records storage refuses in `refused-usage.jsonl` beside the spill files (never
        read back), or in the error log when there is no spill directory."""
        self.refused += len(rows)
        lines = b"".join(row.json + b"\n" for row in rows)
        if self._spill_dir is not None:
            try:
                self._spill_dir.mkdir(parents=True, exist_ok=True)
                with (self._spill_dir / REFUSED_FILE).open("ab") as out:
                    out.write(lines)
                log.error(
                    "usage writer: %d records refused by storage, kept in %s",
                    len(rows),
                    self._spill_dir / REFUSED_FILE,
                )
                return
            except OSError as exc:
                log.error("usage writer: could not keep refused records on disk: %s", exc)
        log.error("usage writer: %d records refused by storage: %s", len(rows), lines.decode())

    async def flush_quietly(self) -> None:
        """Flush what is pending if storage takes it; otherwise leave it to the writer."""
        try:
            await self.flush()
        except StorageUnavailable:
            pass

    def _spill(self) -> None:
        """Move every pending record to a file (memory stays bounded while storage is down).

        Buckets written to but not yet marked for the rollup go along as `{"mark": [...]}`.
        """
        if self._spill_dir is None or not (self._count or self._unmarked):
            return
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"usage-{os.getpid()}-{time.time_ns()}.jsonl"
        with path.open("wb") as out:
            for rows in self._pending.values():
                for row in rows:
                    out.write(row.json + b"\n")
            for mark in sorted(self._unmarked):
                out.write(orjson.dumps({"mark": mark}) + b"\n")
        log.warning("usage writer: %d records spilled to %s", self._count, path)
        if self._journal is not None:  # all they held that storage lacks is in the spill file
            self._journal.release(self._journal.seal())
        self._pending.clear()
        self._count = 0
        self._unmarked.clear()
        self._spilled_checked = False

    def _load_spilled(self) -> bool:
        """Take back what earlier writers on this disk left: spilled files, and the journals of
        writers that are gone (a killed worker's). Their files go once the records are written."""
        if self._spill_dir is None or not self._spill_dir.exists():
            return True
        files = sorted(self._spill_dir.glob("usage-*.jsonl"))
        files += sorted(self._spill_dir.glob("journal-*.jsonl"))
        for path in files:
            if self._count > self._max_pending:
                return False
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer: skip
                lines = path.read_bytes().splitlines()
            except OSError:
                os.close(fd)
                continue
            taken = 0
            for line in lines:
                if not line.strip():
                    continue
                entity = orjson.loads(line)
                if "mark" in entity:
                    partition, bucket = entity["mark"]
                    self._unmarked.add((partition, bucket))
                else:
                    self._add(entity)
                    taken += 1
            if self._journal is not None:
                self._journal.adopt(path, fd)
            else:
                path.unlink(missing_ok=True)
                os.close(fd)
            if taken:
                log.info("usage writer: %d records taken back from %s", taken, path.name)
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Flush on shutdown, trying until `timeout`; spill to disk what storage did not take."""
        if self._task is not None:
            self._task.cancel()
        if self._quiet_check is not None:
            self._quiet_check.cancel()
            self._quiet_check = None
        if not self._spilled_checked:
            self._load_spilled()
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while self._count or self._unmarked:
                try:
                    await self.flush()
                except StorageUnavailable:
                    if asyncio.get_running_loop().time() > deadline:
                        if self._spill_dir is not None:
                            self._spill()
                        else:
                            log.error("usage writer: %d records could not be written", self._count)
                        return
                    await asyncio.sleep(0.5)
        finally:
            if self._journal is not None:
                self._journal.close()
