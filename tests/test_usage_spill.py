"""Usage records survive a shutdown while storage is down: spilled to disk, written later."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from local.azurite import Azurite, free_port
from shared.governance.rollups import report
from shared.governance.usage import DAYS_TABLE, REFUSED_FILE, UsageRecord, UsageWriter
from shared.platform.settings import load
from shared.platform.tables import StorageUnavailable, Tables
from tests.harness import Storage, unique_prefix


def record(n: int, request_id: str = "") -> UsageRecord:
    now = datetime.now(UTC)
    return UsageRecord(
        event_id="spill", attendee_id="a", deployment="d", resource_id="r",
        model_class="openai-chat", status=200, prompt_tokens=n, completion_tokens=1,
        total_tokens=n + 1, streamed=False, estimated=False, latency_ms=1.0, time=now,
        local_date=now.strftime("%Y%m%d"), request_id=request_id or f"req{n:04d}",
    )  # fmt: skip


async def test_records_spilled_at_shutdown_are_written_by_the_next_writer(
    azurite: Azurite, tmp_path: Path
) -> None:
    prefix = unique_prefix("spill")
    spill = tmp_path / "spill"
    dead = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": Azurite(free_port()).connection_string,
                        "AIPROXY_TABLE_PREFIX": prefix}))  # fmt: skip
    first = UsageWriter(dead, flush_seconds=0.1, spill_dir=spill)
    for n in range(250):
        first.append(record(n))
    await first.close(timeout=0.5)  # storage never answers: the records go to disk
    await dead.close()
    files = list(spill.glob("usage-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_bytes().splitlines()) == 250

    alive = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                         "AIPROXY_TABLE_PREFIX": prefix}))  # fmt: skip
    second = UsageWriter(alive, flush_seconds=0.1, spill_dir=spill)
    await second.close()  # a new process on the same disk takes them back and writes them
    await alive.close()
    rows = Storage(azurite.connection_string, prefix).rows("usage", "event_id eq 'spill'")
    assert sorted(r["request_id"] for r in rows) == [f"req{n:04d}" for n in range(250)]
    assert sum(r["prompt_tokens"] for r in rows) == sum(range(250))
    assert not list(spill.glob("usage-*.jsonl"))  # written, so gone from disk


async def test_memory_stays_bounded_while_storage_is_down(tmp_path: Path) -> None:
    prefix = unique_prefix("bound")
    dead = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": Azurite(free_port()).connection_string,
                        "AIPROXY_TABLE_PREFIX": prefix}))  # fmt: skip
    writer = UsageWriter(dead, flush_seconds=60, spill_dir=tmp_path, max_pending=100)
    for n in range(350):
        writer.append(record(n))
    assert writer.pending <= 100  # the rest waits on disk
    on_disk = sum(len(p.read_bytes().splitlines()) for p in tmp_path.glob("usage-*.jsonl"))
    assert on_disk + writer.pending == 350
    await writer.close(timeout=0.2)
    await dead.close()
    on_disk = sum(len(p.read_bytes().splitlines()) for p in tmp_path.glob("usage-*.jsonl"))
    assert on_disk == 350  # nothing lost


class MarksRefused(Tables):
    """Real storage that takes the records but refuses every rollup mark (a fault between)."""

    async def upsert(self, table: str, entity: dict, *, replace: bool = False) -> None:
        if table == DAYS_TABLE:
            raise StorageUnavailable("injected: marks refused")
        await super().upsert(table, entity, replace=replace)


async def test_buckets_written_but_not_marked_are_marked_later_and_rolled_up(
    azurite: Azurite, tmp_path: Path
) -> None:
    prefix = unique_prefix("marks")
    settings = load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                     "AIPROXY_TABLE_PREFIX": prefix})  # fmt: skip
    refusing = MarksRefused(settings)
    first = UsageWriter(refusing, flush_seconds=60, spill_dir=tmp_path)
    for n in range(150):
        first.append(record(n))
    await first.close(timeout=0.5)  # records written, their bucket's mark refused: spilled
    await refusing.close()
    assert first.written == 150
    lines = [orjson.loads(line) for p in tmp_path.glob("usage-*.jsonl")
             for line in p.read_bytes().splitlines()]  # fmt: skip
    assert len(lines) >= 1 and all("mark" in line for line in lines)

    alive = Tables(settings)
    second = UsageWriter(alive, flush_seconds=60, spill_dir=tmp_path)
    await second.close()  # takes the marks back and writes them
    totals = await report(alive, "spill", "attendee", {})
    await alive.close()
    assert totals["totals"]["requests"] == 150
    assert totals["totals"]["prompt_tokens"] == sum(range(150))
    assert not list(tmp_path.glob("usage-*.jsonl"))


async def test_records_storage_refuses_are_set_aside_and_the_rest_written(
    azurite: Azurite, tmp_path: Path
) -> None:
    """A record storage will never take ('/' is not allowed in a row key) must not hold back
    the others in its batch, nor be retried for ever."""
    prefix = unique_prefix("refused")
    tables = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                          "AIPROXY_TABLE_PREFIX": prefix}))  # fmt: skip
    writer = UsageWriter(tables, flush_seconds=60, spill_dir=tmp_path)
    bad = {37: "bad/one", 121: "bad/two"}
    for n in range(150):
        writer.append(record(n, bad.get(n, "")))
    await writer.flush()  # no exception: nothing here is an outage
    await writer.flush()  # and nothing is left to try again
    await tables.close()
    assert (writer.pending, writer.written, writer.refused) == (0, 148, 2)
    rows = Storage(azurite.connection_string, prefix).rows("usage", "event_id eq 'spill'")
    assert sorted(r["request_id"] for r in rows) == [
        f"req{n:04d}" for n in range(150) if n not in bad
    ]
    kept = [orjson.loads(line) for line in (tmp_path / REFUSED_FILE).read_bytes().splitlines()]
    assert [r["request_id"] for r in kept] == ["bad/one", "bad/two"]
    assert [r["prompt_tokens"] for r in kept] == [37, 121]  # whole records, for an operator
    assert not list(tmp_path.glob("usage-*.jsonl"))  # not taken for spilled records


async def test_a_live_writers_journal_is_left_alone_and_a_gone_ones_is_taken(
    azurite: Azurite, tmp_path: Path
) -> None:
    prefix = unique_prefix("journal")
    dead = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": Azurite(free_port()).connection_string,
                        "AIPROXY_TABLE_PREFIX": prefix}))  # fmt: skip
    alive = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                         "AIPROXY_TABLE_PREFIX": prefix}))  # fmt: skip
    busy = UsageWriter(dead, flush_seconds=600, spill_dir=tmp_path)  # another worker, same disk
    for n in range(30):
        busy.append(record(n))
    [journal] = tmp_path.glob("journal-*.jsonl")
    assert len(journal.read_bytes().splitlines()) == 30  # on disk as soon as appended
    neighbour = UsageWriter(alive, flush_seconds=600, spill_dir=tmp_path)
    await neighbour.close()
    storage = Storage(azurite.connection_string, prefix)
    assert storage.rows("usage", "event_id eq 'spill'") == []  # its lock kept the file its own
    assert journal.exists()
    busy._journal.close()  # the worker is killed: the kernel lets go of its lock
    successor = UsageWriter(alive, flush_seconds=600, spill_dir=tmp_path)
    await successor.close()
    await alive.close()
    await dead.close()
    rows = storage.rows("usage", "event_id eq 'spill'")
    assert sorted(r["request_id"] for r in rows) == [f"req{n:04d}" for n in range(30)]
    assert not journal.exists()


async def test_with_storage_down_calls_stop_waiting_for_their_entries_in_flight() -> None:
    """The journal of calls in flight (shared/governance/journal.py): once a write failed,
    answers go on without waiting for theirs, and ended calls leave nothing to delete."""
    from shared.governance.journal import CallJournal

    nowhere = f"http://127.0.0.1:{free_port()}/devstoreaccount1"  # nothing listens there
    tables = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey=a2V5;TableEndpoint={nowhere};"), "AIPROXY_TABLE_PREFIX": "down"}))  # fmt: skip
    journal = CallJournal(tables, 300)
    first = journal.admit(record(1).to_entity(), {"whole": False})
    assert first.hold
    await first.landed()  # waits for the write, which fails
    assert first.writing is not None and first.writing.done() and not first.writing.result()
    second = journal.admit(record(2).to_entity(), {"whole": False})
    assert not second.hold
    await second.landed()
    assert second.writing is not None and not second.writing.done()  # it did not wait
    journal.settle(first)
    journal.settle(second)
    await second.writing
    assert journal.failures == 2
    await journal.close()
    await tables.close()
