"""The lean storage paths (batches written and pages read without the SDK's entity models)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

import shared.platform.tables
from local.azurite import Azurite, free_port
from shared.governance.rollups import roll_up
from shared.governance.usage import UsageRecord, UsageWriter
from shared.platform.settings import load
from shared.platform.tables import Refused, StorageUnavailable, Tables
from shared.platform.tablewire import STORAGE_SCOPE, Wire
from tests.harness import unique_prefix


def tables_for(azurite: Azurite, name: str) -> Tables:
    return Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                        "AIPROXY_TABLE_PREFIX": unique_prefix(name)}))  # fmt: skip


async def test_pages_follow_continuations_and_keep_values(azurite: Azurite) -> None:
    tables = tables_for(azurite, "pages")
    partition = "o'brien 1"  # a quote and a space: escaped in the filter and the address
    rows = [
        {"PartitionKey": partition, "RowKey": f"r{n:05d}", "n": n, "ratio": n / 4,
         "name": f"it's {n}", "flag": n % 2 == 0, "big": 2**40 + n}
        for n in range(1234)
    ]  # fmt: skip
    for start in range(0, len(rows), 100):
        await tables.upsert_batch("t", rows[start : start + 100])
    await tables.upsert_batch("t", [{"PartitionKey": "other", "RowKey": "r00000", "n": -1}])

    pages = [
        page
        async for page in tables.pages(
            "t", "PartitionKey eq @pk and RowKey ge @low", {"pk": partition, "low": "r00000"},
            select=["RowKey", "n", "ratio", "name", "flag", "big"], size=500,
        )
    ]  # fmt: skip
    await tables.close()
    assert [len(page) for page in pages] == [500, 500, 234]
    found = [row for page in pages for row in page]
    assert [row["RowKey"] for row in found] == [row["RowKey"] for row in rows]
    assert found[7] == {"RowKey": "r00007", "n": 7, "ratio": 1.75, "name": "it's 7",
                        "flag": False, "big": str(2**40 + 7)}  # fmt: skip


async def test_a_bucket_of_many_pages_rolls_up_exactly(azurite: Azurite) -> None:
    tables = tables_for(azurite, "bigbucket")
    writer = UsageWriter(tables, flush_seconds=60)
    now = datetime.now(UTC)
    for n in range(1234):
        writer.append(
            UsageRecord(
                event_id="big", attendee_id=f"a{n % 3}", deployment="d", resource_id="r",
                model_class="openai-chat", status=200, prompt_tokens=n, completion_tokens=2,
                total_tokens=n + 2, streamed=False, estimated=False, latency_ms=1.0, time=now,
                local_date=now.strftime("%Y%m%d"), request_id=f"req{n:05d}",
            )
        )  # fmt: skip
    await writer.close()
    result = await roll_up(tables, "big")
    totals = await tables.partition("rollups", "big")
    await tables.close()
    assert result.records == 1234 and result.buckets == 1
    by_attendee = {row["attendee_id"]: row for row in totals}
    for a in range(3):
        mine = [n for n in range(1234) if n % 3 == a]
        assert by_attendee[f"a{a}"]["requests"] == len(mine)
        assert by_attendee[f"a{a}"]["prompt_tokens"] == sum(mine)
        assert by_attendee[f"a{a}"]["completion_tokens"] == 2 * len(mine)


class TimedPages(Tables):
    """Real storage, each page served `delay` late; records when pages are asked for and served."""

    delay = 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[float] = []
        self.served: list[float] = []

    async def pages(self, *args: Any, **kwargs: Any) -> AsyncIterator[list[dict[str, Any]]]:
        source = super().pages(*args, **kwargs)
        while True:
            self.asked.append(time.monotonic())
            await asyncio.sleep(self.delay)
            try:
                page = await anext(source)
            except StopAsyncIteration:
                return
            self.served.append(time.monotonic())
            yield page


async def test_a_rollup_rests_between_pages_as_long_as_storage_took(azurite: Azurite) -> None:
    settings = load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                     "AIPROXY_TABLE_PREFIX": unique_prefix("rest")})  # fmt: skip
    tables = TimedPages(settings)
    writer = UsageWriter(tables, flush_seconds=60)
    now = datetime.now(UTC)
    for n in range(2500):
        writer.append(
            UsageRecord(
                event_id="rest", attendee_id="a", deployment="d", resource_id="r",
                model_class="openai-chat", status=200, prompt_tokens=1, completion_tokens=1,
                total_tokens=2, streamed=False, estimated=False, latency_ms=1.0, time=now,
                local_date=now.strftime("%Y%m%d"), request_id=f"req{n:05d}",
            )
        )  # fmt: skip
    await writer.close()
    result = await roll_up(tables, "rest")
    await tables.close()
    assert result.records == 2500
    assert len(tables.served) == 3  # pages of 1000, the most Table Storage returns
    for page in range(len(tables.served)):
        took = tables.served[page] - tables.asked[page]
        rested = tables.asked[page + 1] - tables.served[page]
        assert took >= TimedPages.delay
        assert rested >= took * 0.9, f"page {page}: served in {took:.3f} s, rested {rested:.3f} s"


async def test_pages_and_batches_take_the_sdks_way_when_its_insides_change(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean pages use the table client's private pipeline; if a new SDK moves it (or a
    batch cannot be sent the lean way), the same calls still work through the SDK's public
    (slower) methods."""

    async def moved(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'TableClient' object has no attribute '_client'")
        yield  # an async generator, as _lean_pages is

    async def moved_batch(*args: Any, **kwargs: Any) -> None:
        raise AttributeError("'TableClient' object has no attribute '_client'")

    monkeypatch.setattr(shared.platform.tables, "_lean_pages", moved)
    monkeypatch.setattr(Tables, "_send_batch", moved_batch)
    tables = tables_for(azurite, "moved")
    rows = [{"PartitionKey": "p'1", "RowKey": f"r{n:04d}", "n": n} for n in range(250)]
    for start in range(0, len(rows), 100):
        await tables.upsert_batch("t", rows[start : start + 100])
    pages = [
        page
        async for page in tables.pages(
            "t", "PartitionKey eq @pk and RowKey ge @low", {"pk": "p'1", "low": "r0100"},
            select=["RowKey", "n"], size=100,
        )
    ]  # fmt: skip
    await tables.close()
    assert [len(page) for page in pages] == [100, 50]
    assert [row["n"] for page in pages for row in page] == list(range(100, 250))


async def test_lean_inserts_and_deletes_keep_values_and_tell_conflicts(azurite: Azurite) -> None:
    from shared.platform.tables import Conflict

    tables = tables_for(azurite, "leanwrites")
    pk = "o'brien 1"
    one = {"PartitionKey": pk, "RowKey": "a'1", "n": 1, "ratio": 0.5, "flag": True, "s": "x"}
    await tables.insert_lean("t", one)
    with pytest.raises(Conflict):
        await tables.insert_lean("t", one)
    group = [{"PartitionKey": pk, "RowKey": f"b{n}", "n": n, "big": 2**40 + n} for n in range(50)]
    await tables.insert_batch("t", group)
    with pytest.raises(Conflict):  # one exists already: none of the transaction is written
        await tables.insert_batch("t", [{"PartitionKey": pk, "RowKey": "c"}, one])
    assert await tables.get("t", pk, "c") is None
    stored = await tables.get("t", pk, "b7")
    assert stored is not None and stored["n"] == 7 and stored["big"].value == 2**40 + 7
    # One of the deleted is gone already: the others go all the same.
    await tables.delete_batch("t", pk, ["a'1", "gone", *(f"b{n}" for n in range(40))])
    left = sorted(row["RowKey"] for row in await tables.partition("t", pk))
    await tables.close()
    assert left == [f"b{n}" for n in range(40, 50)]
    # A writer flushing after storage was closed (shutdown): the write lands, and the wire
    # keeps no session open behind it.
    await tables.insert_lean("t", {"PartitionKey": pk, "RowKey": "late"})
    assert tables._wire is not None and tables._wire._session is None
    from azure.data.tables import TableServiceClient

    service = TableServiceClient.from_connection_string(azurite.connection_string)
    assert service.get_table_client(tables.name("t")).get_entity(pk, "late")["RowKey"] == "late"


async def test_the_request_paths_writes_skip_the_sdk_signed_with_the_accounts_key(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inserts and batches go on a wire of our own (no azure-core pipeline), signed with the
    connection string's key: Azurite checks the signature, and a wrong key is refused."""
    tables = tables_for(azurite, "wire")
    assert tables._wire is not None

    async def no_pipeline(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the request path's writes went through the SDK's pipeline")

    client = await tables.client("t")
    monkeypatch.setattr(client._client, "send_request", no_pipeline)
    pk = "wire"
    await tables.insert_lean("t", {"PartitionKey": pk, "RowKey": "one", "n": 1})
    await tables.insert_batch("t", [{"PartitionKey": pk, "RowKey": f"b{n}"} for n in range(3)])
    await tables.upsert_batch("t", [{"PartitionKey": pk, "RowKey": "one", "n": 2}])
    await tables.delete_batch("t", pk, ["b0", "b1"])
    monkeypatch.undo()
    rows = {row["RowKey"]: row for row in await tables.partition("t", pk)}
    assert sorted(rows) == ["b2", "one"] and rows["one"]["n"] == 2

    wrong = Wire(
        tables._wire._base, "2019-02-02", account="devstoreaccount1", key="d3Jvbmcga2V5"
    )  # "wrong key", base64
    headers = {"Content-Type": "application/json", "Accept": "application/json;odata=nometadata"}
    body = b'{"PartitionKey": "wire", "RowKey": "forged"}'
    status, answer = await wrong.send("POST", f"/{tables.name('t')}", body, headers)
    await wrong.close()
    assert status == 403, answer
    assert await tables.get("t", pk, "forged") is None
    await tables.close()


async def test_the_wire_tells_an_outage_from_a_refusal() -> None:
    """Storage gone: StorageUnavailable (after one retry), never a hang; the callers' error
    mapping (Conflict, Refused, StorageUnavailable) stays as through the SDK."""
    server = Azurite(free_port()).start()
    tables = Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": server.connection_string,
                          "AIPROXY_TABLE_PREFIX": unique_prefix("wireout")}))  # fmt: skip
    try:
        await tables.insert_lean("t", {"PartitionKey": "p", "RowKey": "r"})
        with pytest.raises(Refused):  # 400: an entity Table Storage cannot take
            await tables.insert_lean("t", {"PartitionKey": "p", "RowKey": "bad/key"})
        server.stop()
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await tables.insert_lean("t", {"PartitionKey": "p", "RowKey": "r2"})
        with pytest.raises(StorageUnavailable):
            await tables.insert_batch(
                "t", [{"PartitionKey": "p", "RowKey": f"x{n}"} for n in range(2)]
            )
        with pytest.raises(StorageUnavailable):
            await tables.upsert_batch("t", [{"PartitionKey": "p", "RowKey": "r"}])
        with pytest.raises(StorageUnavailable):
            await tables.delete_batch("t", "p", ["r"])
        assert time.monotonic() - started < 10
    finally:
        await tables.close()
        server.stop()


class TokenChecker:
    """A loopback stand-in for a table endpoint on Azure: it answers 204 to a request with the
    expected bearer token, 403 otherwise, and keeps what it was sent."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.seen: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append(dict(request.headers))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(
                status=403, text='{"odata.error": {"code": "AuthenticationFailed"}}'
            )
        return web.Response(status=204)


async def test_the_wire_signs_with_the_apps_token_on_azure() -> None:
    """With a table endpoint (no key), requests carry a bearer token of the app's identity for
    Storage's audience, asked once and reused until shortly before it expires."""
    from shared.platform.identity import TokenSource

    class Credential:
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def get_token(self, scope: str) -> Any:
            self.asked.append(scope)
            return type(
                "Token", (), {"token": f"t{len(self.asked)}", "expires_on": time.time() + 3600}
            )()

    checker = TokenChecker("t1")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", checker.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    credential = Credential()
    wire = Wire.of(
        f"http://127.0.0.1:{port}", "2019-02-02", credential, TokenSource(credential, STORAGE_SCOPE)
    )
    assert wire is not None
    try:
        for _ in range(3):
            status, _ = await wire.send(
                "POST", "/$batch", b"--x--", {"Content-Type": "multipart/mixed"}
            )
            assert status == 204
        checker.token = "another"  # the stored token is refused: the answer says so
        status, _ = await wire.send(
            "POST", "/aiproxyt", b"{}", {"Content-Type": "application/json"}
        )
        assert status == 403
    finally:
        await wire.close()
        await runner.cleanup()
    assert credential.asked == [STORAGE_SCOPE]
    assert [h["x-ms-version"] for h in checker.seen] == ["2019-02-02"] * 4
    assert all(h.get("x-ms-date") for h in checker.seen)
    assert Wire.of("http://127.0.0.1", "2019-02-02", object()) is None  # a SAS: the SDK's way
