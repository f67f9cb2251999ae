"""The one place that talks to Azure Table Storage.

Thin async access to named tables: tables are created on first use, storage faults become
StorageUnavailable so callers can tell "not there" from "could not ask".
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import quote
from uuid import uuid4

import orjson
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.rest import HttpRequest
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from shared.errors import StorageUnavailable
from shared.platform.settings import Settings
from shared.platform.tablewire import STORAGE_SCOPE, Wire

Entity = dict[str, Any]


class EncodedRow(NamedTuple):
    """An entity encoded once for an upsert batch (`Tables.encode_upsert`).

    Encoding is most of a batch's CPU; doing it when the entity is made spreads that cost over
    the requests instead of spending it in one burst that holds every request back.
    """

    partition: str
    row: str
    part: bytes  # the batch's request for this entity, without its boundary line
    body_at: int  # where the entity's JSON starts in `part`

    @property
    def json(self) -> bytes:
        return self.part[self.body_at : -2]


class Refused(StorageUnavailable):
    """Storage refused what was sent (400, 413): sending it again unchanged cannot succeed.

    A StorageUnavailable still, so callers that do not tell the two apart keep what they had.
    """


_REFUSALS = (400, 413)


class Conflict(Exception):
    """The entity exists already, or its ETag changed since it was read."""


def _is_outage(exc: AzureError) -> bool:
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return True
    status = getattr(exc, "status_code", None)
    return status is None or status >= 500 or status == 408


class Tables:
    """Table clients of one storage account, each table created on its first use."""

    def __init__(self, settings: Settings) -> None:
        self._prefix = settings.table_prefix
        # azure-core retries a refused connection for seconds by default; the request path
        # would wait that long before falling back to its cache. Callers that must not lose
        # anything (the usage writer) retry on their own.
        from azure.core.pipeline.transport import AioHttpTransport

        options = {
            # Without this, every storage request reads proxy and netrc settings in a thread.
            "transport": AioHttpTransport(use_env_settings=False),
            "retry_total": 2,
            "retry_connect": 1,
            "retry_backoff_factor": 0.2,
            "connection_timeout": 5,
            "read_timeout": 20,
        }
        tokens = None
        if settings.storage_table_endpoint:
            from shared.platform.identity import TokenSource, storage_credential

            credential = storage_credential(settings)
            tokens = TokenSource(credential, STORAGE_SCOPE)
            self._service = TableServiceClient(
                endpoint=settings.storage_table_endpoint, credential=credential, **options
            )
        else:
            self._service = TableServiceClient.from_connection_string(
                settings.storage_connection_string, **options
            )
            credential = self._service.credential
        self._base = f"{self._service.scheme}://{self._service._primary_hostname}"
        # The request path's writes (insert_lean, the batches) skip azure-core's pipeline.
        self._wire = Wire.of(self._base, self._service.api_version, credential, tokens)
        self._clients: dict[str, TableClient] = {}
        self._ready: set[str] = set()
        self._lock = asyncio.Lock()

    def name(self, table: str) -> str:
        return f"{self._prefix}{table}"

    async def client(self, table: str) -> TableClient:
        if table in self._ready:
            return self._clients[table]
        async with self._lock:
            if table not in self._ready:
                client = self._service.get_table_client(self.name(table))
                try:
                    await client.create_table()
                except ResourceExistsError:
                    pass
                except AzureError as exc:
                    raise StorageUnavailable(str(exc)) from exc
                self._clients[table] = client
                self._ready.add(table)
        return self._clients[table]

    async def get(self, table: str, pk: str, rk: str) -> Entity | None:
        client = await self.client(table)
        try:
            return dict(await client.get_entity(pk, rk))
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def get_versioned(self, table: str, pk: str, rk: str) -> tuple[Entity, str] | None:
        """The entity with its ETag, for a later conditional update."""
        client = await self.client(table)
        try:
            found = await client.get_entity(pk, rk)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc
        return dict(found), found.metadata["etag"]

    async def put_versioned(
        self, table: str, entity: Entity, found: tuple[Entity, str] | None
    ) -> bool:
        """Write `entity` over the version `get_versioned` found (insert it where none was):
        False when another writer came first, after a pause, to read the row again and retry."""
        try:
            if found is None:
                await self.insert(table, entity)
            else:
                await self.update(table, entity, etag=found[1])
        except Conflict:
            await asyncio.sleep(0.005)
            return False
        return True

    async def insert(self, table: str, entity: Entity) -> None:
        client = await self.client(table)
        try:
            await client.create_entity(entity)
        except ResourceExistsError as exc:
            raise Conflict(f"{entity['PartitionKey']}/{entity['RowKey']} exists") from exc
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def upsert(self, table: str, entity: Entity, *, replace: bool = False) -> None:
        client = await self.client(table)
        mode = UpdateMode.REPLACE if replace else UpdateMode.MERGE
        try:
            await client.upsert_entity(entity, mode=mode)
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def update(self, table: str, entity: Entity, *, etag: str | None = None) -> None:
        """Merge into an existing entity; with an etag, only if nobody changed it since."""
        client = await self.client(table)
        try:
            if etag is None:
                await client.update_entity(entity, mode=UpdateMode.MERGE)
            else:
                from azure.core import MatchConditions

                await client.update_entity(
                    entity,
                    mode=UpdateMode.MERGE,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                )
        except ResourceNotFoundError as exc:
            raise Conflict("entity is gone") from exc
        except AzureError as exc:
            if getattr(exc, "status_code", None) == 412:
                raise Conflict("entity changed since it was read") from exc
            raise StorageUnavailable(str(exc)) from exc

    async def delete(self, table: str, pk: str, rk: str) -> None:
        client = await self.client(table)
        try:
            await client.delete_entity(pk, rk)
        except ResourceNotFoundError:
            pass
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def insert_lean(self, table: str, entity: Entity) -> None:
        """`insert` without the SDK's entity handling (a third of its CPU): for the request
        path's one write per call (shared/governance/journal.py)."""
        client = await self.client(table)
        headers = {
            "DataServiceVersion": "3.0",
            "Content-Type": "application/json",
            "Accept": "application/json;odata=nometadata",
            "Prefer": "return-no-content",
        }
        path = f"/{self.name(table)}"
        await self._insert_by_hand(
            self._send(client, "POST", path, _entity_json(entity), headers),
            lambda: self.insert(table, entity),  # the SDK changed its insides: its own way
            "insert",
            f"{entity['PartitionKey']}/{entity['RowKey']} exists",
        )

    async def insert_batch(self, table: str, entities: list[Entity]) -> None:
        """Insert entities of one partition in one transaction (at most 100); Conflict when one
        exists already (then none is written)."""
        if len(entities) == 1:
            await self.insert_lean(table, entities[0])
            return
        client = await self.client(table)
        head = (
            "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            f"POST {self._base}/{self.name(table)} HTTP/1.1\r\nContent-Type: application/json\r\n"
            "Accept: application/json;odata=nometadata\r\nPrefer: return-no-content\r\n"
            "DataServiceVersion: 3.0\r\n\r\n"
        ).encode()
        parts = [head + _entity_json(entity) + b"\r\n" for entity in entities]

        async def one_by_one() -> None:  # the SDK changed its insides
            for entity in entities:
                await self.insert(table, entity)

        await self._insert_by_hand(
            self._send_batch(client, parts),
            one_by_one,
            "inserts",
            f"one of {len(entities)} entities exists",
        )

    async def _insert_by_hand(
        self,
        sending: Awaitable[tuple[int | None, bytes]],
        the_sdks_way: Callable[[], Awaitable[None]],
        what: str,
        conflict: str,
    ) -> None:
        """Await a request made by hand (a status, None for a whole batch's success); when the
        SDK's insides it relies on have changed, insert `the_sdks_way`."""
        try:
            status, body = await sending
        except (AttributeError, TypeError):
            await the_sdks_way()
            return
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc
        if status == 409:
            raise Conflict(conflict)
        if status is not None and not 200 <= status < 300:
            raise _failed(status, what, body)

    async def delete_batch(self, table: str, pk: str, rks: list[str]) -> None:
        """Delete entities of one partition in one transaction (at most 100); when one of them
        is gone already (the whole transaction is refused), one by one."""
        if not rks:
            return
        client = await self.client(table)
        parts = [
            (
                "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                f"DELETE {self._base}/{self.name(table)}(PartitionKey='{_key(pk)}',"
                f"RowKey='{_key(rk)}') HTTP/1.1\r\nAccept: application/json;odata=nometadata\r\n"
                "If-Match: *\r\nDataServiceVersion: 3.0\r\n\r\n\r\n"
            ).encode()
            for rk in rks
        ]
        try:
            failed, body = await self._send_batch(client, parts)
        except (AttributeError, TypeError):  # the SDK changed its insides: one by one
            failed, body = 404, b""
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc
        if failed is None:
            return
        if failed != 404:
            raise StorageUnavailable(f"deletes failed: {failed} {body[:300]!r}")
        for rk in rks:
            await self.delete(table, pk, rk)

    async def query(
        self, table: str, filter: str, parameters: dict[str, Any] | None = None
    ) -> list[Entity]:
        return [entity async for entity in self.iter_query(table, filter, parameters)]

    async def iter_query(
        self,
        table: str,
        filter: str,
        parameters: dict[str, Any] | None = None,
        select: list[str] | None = None,
    ) -> AsyncIterator[Entity]:
        client = await self.client(table)
        try:
            pages = client.query_entities(filter, parameters=parameters, select=select)
            async for entity in pages:
                yield dict(entity)
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def pages(
        self,
        table: str,
        filter: str,
        parameters: dict[str, str],
        select: list[str],
        size: int = 1000,
    ) -> AsyncIterator[list[Entity]]:
        """A query's entities a page at a time, as plain JSON values (for big scans).

        The SDK turns every property of every entity into typed objects, about 5 ms per
        thousand entities in one step of the event loop; a rollup reading a busy day's records
        that way held requests back for tens of milliseconds. Here a page is parsed in one go
        by orjson, small enough to be a fraction of a millisecond. `parameters` are strings.
        """
        client = await self.client(table)
        bound = filter
        for name, value in parameters.items():
            bound = bound.replace(f"@{name}", f"'{_literal(value)}'")
        lean = _lean_pages(client, self._base, bound, select, size)
        try:
            try:
                first = await anext(lean)
            except StopAsyncIteration:
                return
            except (AttributeError, TypeError):
                # The SDK changed its insides: take its own, slower way.
                found = client.query_entities(
                    filter, parameters=parameters, select=select, results_per_page=size
                )
                async for page in found.by_page():
                    yield [dict(entity) async for entity in page]
                return
            yield first
            async for page in lean:
                yield page
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def partition(self, table: str, pk: str) -> list[Entity]:
        return await self.query(table, "PartitionKey eq @pk", {"pk": pk})

    async def all(self, table: str) -> list[Entity]:
        client = await self.client(table)
        try:
            return [dict(entity) async for entity in client.list_entities()]
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc

    def encode_upsert(self, table: str, entity: Entity) -> EncodedRow:
        """An entity as one request of an upsert batch, ready for `upsert_encoded`."""
        pk, rk = str(entity["PartitionKey"]), str(entity["RowKey"])
        head = (
            "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            f"PUT {self._base}/{self.name(table)}(PartitionKey='{_key(pk)}',RowKey='{_key(rk)}')"
            " HTTP/1.1\r\nContent-Type: application/json\r\n"
            "Accept: application/json;odata=nometadata\r\nDataServiceVersion: 3.0\r\n\r\n"
        ).encode()
        return EncodedRow(pk, rk, head + _entity_json(entity) + b"\r\n", len(head))

    async def upsert_batch(self, table: str, entities: Iterable[Entity]) -> None:
        """Upsert entities of one partition in one transaction (at most 100)."""
        await self.upsert_encoded(table, [self.encode_upsert(table, e) for e in entities])

    async def upsert_encoded(self, table: str, rows: list[EncodedRow]) -> None:
        """Upsert encoded entities of one partition in one transaction (at most 100).

        The SDK builds and parses batch bodies with the `email` package, which costs more CPU
        than the request it carries; the body here is written directly and sent through the
        table client's own pipeline (its authentication and retries).
        """
        if not rows:
            return
        client = await self.client(table)
        try:
            failed, body = await self._send_batch(client, [row.part for row in rows])
        except (AttributeError, TypeError):
            # The SDK changed its insides: take its own, slower way.
            operations = [
                ("upsert", _decoded(row.json), {"mode": UpdateMode.REPLACE}) for row in rows
            ]
            try:
                await client.submit_transaction(operations)
            except (TableTransactionError, AzureError) as exc:
                refused = getattr(exc, "status_code", None) in _REFUSALS
                raise (Refused if refused else StorageUnavailable)(str(exc)) from exc
            return
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc
        if failed is not None:
            raise _failed(failed, f"batch of {len(rows)}", body)

    async def _send(
        self, client: TableClient, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """One request under the account's endpoint: on the wire of our own when the
        credential allows (a key or a token), else through the table client's pipeline."""
        if self._wire is not None:
            return await self._wire.send(method, path, body, headers)
        request = HttpRequest(
            method,
            f"{self._base}{path}",
            headers={"x-ms-version": client.api_version, **headers},
            content=body,
        )
        response = await client._client.send_request(request, stream=True)
        return response.status_code, await response.read()

    async def _send_batch(
        self, client: TableClient, operations: list[bytes]
    ) -> tuple[int | None, bytes]:
        """One transaction of encoded operations: (the first failed status or None, the body)."""
        batch, changeset = f"batch_{uuid4()}", f"changeset_{uuid4()}"
        line = f"--{changeset}\r\n".encode()
        parts = [
            f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n".encode()
        ]
        for operation in operations:
            parts += (line, operation)
        parts.append(f"--{changeset}--\r\n\r\n--{batch}--\r\n".encode())
        headers = {
            "DataServiceVersion": "3.0",
            "MaxDataServiceVersion": "3.0;NetFx",
            "Content-Type": f"multipart/mixed; boundary={batch}",
            "Accept": "application/json",
        }
        failed: int | None
        failed, body = await self._send(client, "POST", "/$batch", b"".join(parts), headers)
        if failed == 202:  # the batch was read; each operation has its own status
            statuses = (int(code) for code in _STATUS_LINE.findall(body))
            failed = next((code for code in statuses if not 200 <= code < 300), None)
        return failed, body

    async def close(self) -> None:
        if self._wire is not None:
            await self._wire.close()
        for client in self._clients.values():
            await client.close()
        await self._service.close()


_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3})")


def _failed(status: int, what: str, body: bytes) -> StorageUnavailable:
    """The error of a write storage answered `status` to: Refused when it will never take the
    request (400, 413), StorageUnavailable otherwise."""
    kind = Refused if status in _REFUSALS else StorageUnavailable
    return kind(f"{what} failed: {status} {body[:300]!r}")


def _odata_value(value: Any) -> tuple[Any, str | None]:
    """A property value as Table Storage's JSON wants it, with its type when JSON cannot say."""
    if isinstance(value, bool) or value is None or isinstance(value, float | str):
        return value, None
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return value, None
        return str(value), "Edm.Int64"
    if isinstance(value, datetime):
        return value.isoformat(), "Edm.DateTime"
    return str(value), None


def _entity_json(entity: Entity) -> bytes:
    body: dict[str, Any] = {}
    for name, value in entity.items():
        converted, odata_type = _odata_value(value)
        body[name] = converted
        if odata_type:
            body[f"{name}@odata.type"] = odata_type
    return orjson.dumps(body)


def _literal(value: str) -> str:
    """A string as it goes between the quotes of an OData literal: its quotes doubled."""
    return value.replace("'", "''")


def _key(value: str) -> str:
    """A key as it goes into an entity's address: a literal, percent-encoded."""
    return quote(_literal(value), safe="")


def _decoded(body: bytes) -> Entity:
    """An encoded entity back as the SDK takes it (typed values kept as their strings)."""
    return {k: v for k, v in orjson.loads(body).items() if not k.endswith("@odata.type")}


async def _lean_pages(
    client: TableClient, base: str, filter: str, select: list[str], size: int
) -> AsyncIterator[list[Entity]]:
    """Plain GETs through the table client's pipeline, continuations followed (`pages`)."""
    params = {"$filter": filter, "$select": ",".join(select), "$top": str(size)}
    while True:
        request = HttpRequest(
            "GET",
            f"{base}/{client.table_name}()",
            params=params,
            headers={
                "x-ms-version": client.api_version,
                "DataServiceVersion": "3.0",
                "Accept": "application/json;odata=nometadata",
            },
        )
        response = await client._client.send_request(request, stream=True)
        body = await response.read()
        if response.status_code != 200:
            raise StorageUnavailable(f"query refused: {response.status_code} {body[:300]!r}")
        yield orjson.loads(body)["value"]
        next_pk = response.headers.get("x-ms-continuation-NextPartitionKey")
        if not next_pk:
            return
        params["NextPartitionKey"] = next_pk
        next_rk = response.headers.get("x-ms-continuation-NextRowKey")
        if next_rk:
            params["NextRowKey"] = next_rk
        else:
            params.pop("NextRowKey", None)
