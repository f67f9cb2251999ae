"""The one place that talks to Azure Table Storage.

Thin async access to named tables: tables are created on first use, storage faults become
StorageUnavailable so callers can tell "not there" from "could not ask".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from shared.settings import Settings

Entity = dict[str, Any]


class StorageUnavailable(Exception):
    """Table Storage could not be reached or answered with a server error."""


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
        options = {
            "retry_total": 2,
            "retry_connect": 1,
            "retry_backoff_factor": 0.2,
            "connection_timeout": 5,
            "read_timeout": 20,
        }
        if settings.storage_table_endpoint:
            from shared.identity import storage_credential

            self._service = TableServiceClient(
                endpoint=settings.storage_table_endpoint,
                credential=storage_credential(settings),
                **options,
            )
        else:
            self._service = TableServiceClient.from_connection_string(
                settings.storage_connection_string, **options
            )
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

    async def query(
        self, table: str, filter: str, parameters: dict[str, Any] | None = None
    ) -> list[Entity]:
        return [entity async for entity in self.iter_query(table, filter, parameters)]

    async def iter_query(
        self, table: str, filter: str, parameters: dict[str, Any] | None = None
    ) -> AsyncIterator[Entity]:
        client = await self.client(table)
        try:
            async for entity in client.query_entities(filter, parameters=parameters):
                yield dict(entity)
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

    async def upsert_batch(self, table: str, entities: Iterable[Entity]) -> None:
        """Upsert entities of one partition in one transaction (at most 100)."""
        operations = [("upsert", entity, {"mode": UpdateMode.REPLACE}) for entity in entities]
        if not operations:
            return
        client = await self.client(table)
        try:
            await client.submit_transaction(operations)
        except TableTransactionError as exc:
            raise StorageUnavailable(str(exc)) from exc
        except AzureError as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        await self._service.close()
