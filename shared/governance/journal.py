"""Calls in flight, in Table Storage from their admission until their usage record exists.

A worker can be killed (or crash) while it relays answers: the upstream bills what it sent,
but the usage record of such a call is only made when it ends. So each admitted call writes an
entry to the `inflight` table first, with its provisional usage record (the call's reserved
worst case: the input estimate plus the most it may answer, marked estimated), the instance
that wrote it and an expiry (admission + `AIPROXY_CALL_EXPIRY_SECONDS`, longer than a call may
run). The entry is written while the upstream request goes out, and the call's first byte
waits until storage has it (`Entry.landed`): a caller never receives part of an answer that no
stored entry accounts for.

A call that ends writes its usage record as always and its entry is deleted (in batches, off
the request path). An entry still there after its expiry belongs to a call whose worker is
gone: the maintenance pass (`recover`, with the rollup timer) claims it with a conditional
update (ETag), so one instance only takes it, and writes its provisional record as the call's
usage record and its tokens into the daily counts. Its row key is the admission time and the
request id, so a record written twice is written over itself. An expired entry whose call has
a usage record already (the host killed a drained worker before the entry went; the next
worker on its disk wrote the record) is only deleted.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.governance.caps import Caps
from shared.governance.usage import USAGE_TABLE, UsageWriter
from shared.platform import clock
from shared.platform.background import Background
from shared.platform.tables import Conflict, StorageUnavailable, Tables

log = logging.getLogger(__name__)

INFLIGHT_TABLE = "inflight"
# The longest the first byte of an answer waits for its entry while storage is slow: past it,
# the answer goes on and the entry lands when it can (docs/operating.md). After a write
# failed, answers do not wait until one is taken again (storage is down: no calls stall).
HOLD_SECONDS = 2.0
SETTLE_SECONDS = 0.2  # entries of ended calls are deleted in batches this often
_BATCH = 100
# A claimed entry whose claimer did not finish (it died in between) is claimed again after
# this long, unless the claimer's record reached storage (then the entry just goes).
RECLAIM_SECONDS = 60.0
# Entries waiting to be written past which new ones are not journaled (storage hangs): memory
# stays bounded, the calls go on as without the journal.
MAX_QUEUED = 10_000
# Writes under way at once: a call admitted while one is under way starts its own rather than
# waiting for it to end (one storage round trip before its first byte, not two); past this many,
# entries wait and go together in the next one free.
WRITERS = 4
ROW_TIME = "%Y%m%dT%H%M%S%f"  # how a usage record's row key starts (UsageRecord.to_entity)


@dataclass
class Entry:
    """One admitted call's entry: written in the background from its admission."""

    partition: str
    request_id: str
    writing: asyncio.Future[bool] | None = None  # True once stored, False if it failed
    hold: bool = True  # False while storage fails the writes: answers do not wait then

    async def landed(self) -> None:
        """Wait (at most HOLD_SECONDS) until storage has the entry: before the first byte."""
        task = self.writing
        if task is None or task.done() or not self.hold:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), HOLD_SECONDS)
        except TimeoutError:
            log.warning("journal: entry of %s not stored yet; answering", self.request_id)
        except Exception:  # the write logs its own failure
            pass


class CallJournal:
    """This instance's entries of calls in flight, and the pass over other instances' ones."""

    def __init__(self, tables: Tables, expiry_seconds: float) -> None:
        self._tables = tables
        self.expiry_seconds = expiry_seconds
        self.enabled = expiry_seconds > 0  # 0: no journal (lost calls go unrecorded)
        self.instance = secrets.token_hex(6)
        self._live: set[str] = set()  # request ids of this instance's calls not yet ended
        self._ended: dict[str, list[str]] = defaultdict(list)  # partition -> entries to delete
        # Entries waiting for a write to end (WRITERS under way): they go together in the next.
        self._queue: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._background = Background()
        self.failures = 0  # entries storage did not take
        self._healthy = True  # the last write was taken
        self.recovered = 0  # entries of lost calls written as usage records here

    def admit(self, record: dict[str, Any], extra: dict[str, Any]) -> Entry:
        """Start writing the entry of an admitted call; `record` is its provisional usage
        record (a usage table entity), `extra` what recovering it needs besides."""
        now = clock.time()
        entry = Entry(self.instance, record["request_id"], hold=self._healthy)
        entity = {
            "PartitionKey": entry.partition,
            "RowKey": entry.request_id,
            "expires": now + self.expiry_seconds,
            "admitted": now,
            "record": orjson.dumps(record).decode(),
            **extra,
        }
        loop = asyncio.get_running_loop()
        entry.writing = loop.create_future()
        if len(self._queue) >= MAX_QUEUED:
            self.failures += 1
            entry.writing.set_result(False)
            return entry
        self._live.add(entry.request_id)
        self._queue.append((entity, entry.writing))
        if len(self._writers) < WRITERS:
            writer = loop.create_task(self._write())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return entry

    async def _write(self) -> None:
        """Write what is queued: one request for one entry, one transaction for those that
        came while WRITERS writes were under way (group commit: no timer, no added wait)."""
        while self._queue:
            group, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
            results = [False] * len(group)
            try:
                stored = await self._insert([entity for entity, _ in group])
                if stored is None:  # one of them exists (a retried write): each on its own
                    results = [bool(await self._insert([entity])) for entity, _ in group]
                else:
                    results = [stored] * len(group)
            except Exception:
                log.exception("journal: entries not written")
            finally:  # every waiting call goes on, whatever happened
                for (_, written), ok in zip(group, results, strict=True):
                    if not written.done():
                        written.set_result(ok)

    async def _insert(self, entities: list[dict[str, Any]]) -> bool | None:
        """True when storage took them, False when it failed, None on a conflict."""
        try:
            await self._tables.insert_batch(INFLIGHT_TABLE, entities)
            self._healthy = True
            return True
        except Conflict:
            if len(entities) == 1:
                return True  # written before: stored
            return None
        except StorageUnavailable as exc:
            self.failures += len(entities)
            self._healthy = False
            log.warning("journal: %d entries not stored: %s", len(entities), str(exc)[:200])
            return False

    def settle(self, entry: Entry) -> None:
        """The call ended and its usage record is made: its entry goes (in a later batch)."""
        self._live.discard(entry.request_id)
        task = entry.writing
        if task is not None and not task.done():
            self._background.spawn(self._settle_after(entry, task))
            return
        if task is not None and task.result():
            self._ended[entry.partition].append(entry.request_id)
            self._start()

    async def _settle_after(self, entry: Entry, task: asyncio.Future[bool]) -> None:
        if await asyncio.shield(task):
            self._ended[entry.partition].append(entry.request_id)
            self._start()

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = SETTLE_SECONDS
        while self._ended:
            await asyncio.sleep(backoff)
            try:
                await self.flush()
                backoff = SETTLE_SECONDS
            except StorageUnavailable as exc:
                backoff = min(backoff * 2, 30.0)
                log.warning("journal: ended entries not deleted yet: %s", str(exc)[:200])

    async def flush(self) -> None:
        """Delete the entries of ended calls; what storage did not take stays for next time."""
        for partition in list(self._ended):
            rows = self._ended[partition]
            while rows:
                chunk = rows[:_BATCH]
                await self._tables.delete_batch(INFLIGHT_TABLE, partition, chunk)
                del rows[: len(chunk)]
            del self._ended[partition]

    async def recover(self, usage: UsageWriter, caps: Caps) -> list[dict[str, Any]]:
        """Write the provisional record of every expired entry (a call whose worker is gone)
        as its usage record, once across instances; returns the records this pass wrote."""
        now = clock.time()
        expired = await self._tables.query(INFLIGHT_TABLE, "expires lt @now", {"now": now})
        expired = [
            row
            for row in expired
            # still running here (only with an expiry shorter than a call), or being written
            # by another pass
            if row["RowKey"] not in self._live
            and float(row.get("claimed_at", 0)) <= now - RECLAIM_SECONDS
        ]
        recorded = await self._recorded(expired)
        taken: list[dict[str, Any]] = []
        cleared = 0
        for row in expired:
            if row["RowKey"] in recorded:
                # It has its record (written after its worker stopped, from its disk journal,
                # before the entry could go): nothing to add.
                await self._tables.delete(INFLIGHT_TABLE, row["PartitionKey"], row["RowKey"])
                cleared += 1
                continue
            found = await self._tables.get_versioned(
                INFLIGHT_TABLE, row["PartitionKey"], row["RowKey"]
            )
            if found is None:
                continue  # settled meanwhile
            entity, etag = found
            if float(entity.get("claimed_at", 0)) > now - RECLAIM_SECONDS:
                continue
            claim = {
                "PartitionKey": entity["PartitionKey"],
                "RowKey": entity["RowKey"],
                "claimed_at": now,
                "claimed_by": self.instance,
            }
            try:
                await self._tables.update(INFLIGHT_TABLE, claim, etag=etag)
            except Conflict:
                continue  # another instance took it, or it was settled
            record = orjson.loads(entity["record"])
            usage.append_entity(record)  # on this instance's disk journal from here
            caps.charge_unsettled(
                record["PartitionKey"],
                record["attendee_id"],
                int(record.get("total_tokens", 0)),
                whole=bool(entity.get("whole")),
            )
            await self._tables.delete(INFLIGHT_TABLE, entity["PartitionKey"], entity["RowKey"])
            taken.append(record)
            log.warning(
                "journal: call %s of instance %s never ended; recorded at its worst case, "
                "%d tokens",
                entity["RowKey"],
                entity["PartitionKey"],
                int(record.get("total_tokens", 0)),
            )
        if cleared:
            log.info("journal: %d expired entries of recorded calls deleted", cleared)
        self.recovered += len(taken)
        return taken

    async def _recorded(self, expired: list[dict[str, Any]]) -> set[str]:
        """Which of these calls have a usage record: one scan per day partition over the row
        keys from the earliest admission to the latest expiry, request ids only."""
        spans: dict[str, tuple[str, str]] = {}
        for row in expired:
            record = orjson.loads(row["record"])
            low = record["RowKey"]
            high = datetime.fromtimestamp(float(row["expires"]), UTC).strftime(ROW_TIME) + "~"
            known = spans.get(record["PartitionKey"])
            if known is not None:
                low, high = min(low, known[0]), max(high, known[1])
            spans[record["PartitionKey"]] = (low, high)
        found: set[str] = set()
        for partition, (low, high) in spans.items():
            pages = self._tables.pages(
                USAGE_TABLE,
                "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
                {"pk": partition, "low": low, "high": high},
                select=["request_id"],
            )
            async for page in pages:
                found.update(str(row.get("request_id", "")) for row in page)
        return found

    async def close(self) -> None:
        """Wait for entries being written, delete those of ended calls."""
        if self._task is not None:
            self._task.cancel()
        if self._writers:
            await asyncio.wait(list(self._writers), timeout=HOLD_SECONDS)
        self._background.cancel()
        try:
            await self.flush()
        except StorageUnavailable:
            log.warning("journal: entries of ended calls not deleted on shutdown")
