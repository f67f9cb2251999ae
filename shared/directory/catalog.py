"""Upstream resources (model deployments) and each event's catalog of them."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from shared.directory.models import DEPLOYMENT_NAME, ResourceCreate, ResourceFields
from shared.directory.validation import parse
from shared.errors import invalid
from shared.platform.tables import Tables

RESOURCES_TABLE = "resources"
CATALOG_TABLE = "catalog"
_PARTITION = "resource"


@dataclass
class Resource:
    """One upstream deployment. Resources sharing `deployment` in an event form a pool."""

    id: str
    name: str
    deployment: str
    model_class: str
    endpoint: str
    upstream_deployment: str
    auth: str = "key"
    priority: int = 1
    weight: int = 1
    region: str = ""
    active: bool = True
    quota_requests_per_minute: int = 0  # the deployment's quota in Azure; 0: not known
    quota_tokens_per_minute: int = 0
    prices: str = ""  # its own prices over the table's (shared.governance.prices)
    owner: str = ""
    created_at: str = ""
    has_api_key: bool = False

    @property
    def secret_name(self) -> str:
        return f"resource-{self.id}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_entity(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("id")
        return {"PartitionKey": _PARTITION, "RowKey": self.id, **data}

    @classmethod
    def from_entity(cls, entity: dict[str, Any]) -> Resource:
        known = {k: v for k, v in entity.items() if k in cls.__dataclass_fields__}
        return cls(id=entity["RowKey"], **known)


def valid_deployment_name(name: str) -> bool:
    return DEPLOYMENT_NAME.match(name) is not None


def new_resource(body: dict[str, Any], *, owner: str, now: datetime) -> tuple[Resource, str | None]:
    """Validate a create request; the resource, and its api_key if one was given."""
    fields = dict(parse(ResourceCreate, body))
    api_key = fields.pop("api_key")
    resource = Resource(id=secrets.token_hex(8), **fields, owner=owner, created_at=now.isoformat())
    resource.upstream_deployment = resource.upstream_deployment or resource.deployment
    return resource, api_key


def patch_resource(resource: Resource, body: dict[str, Any]) -> str | None:
    """Validate a change: the body laid over the resource's fields, checked as a whole; a new
    api_key if one was given.

    A stored key never follows a new endpoint: whoever may change the address could otherwise
    have the key sent to a host of their choosing. So a change of endpoint, or to auth 'key',
    carries the key for the new setting in the same body.
    """
    current = {name: getattr(resource, name) for name in ResourceFields.model_fields}
    fields = dict(parse(ResourceCreate, {**current, **body}, has_api_key=resource.has_api_key))
    api_key = fields.pop("api_key")
    moved = fields["endpoint"] != resource.endpoint.rstrip("/")
    to_key = fields["auth"] == "key" and resource.auth != "key"
    if fields["auth"] == "key" and (moved or to_key) and api_key is None:
        raise invalid(
            "api_key",
            "is required when endpoint or auth changes",
            "Send the deployment's key as 'api_key' in the same body: the stored key is never "
            "sent to a new endpoint, nor kept for a new way of calling.",
        )
    for name, value in fields.items():
        setattr(resource, name, value)
    resource.upstream_deployment = resource.upstream_deployment or resource.deployment
    return api_key


class CatalogStore:
    """Resources, and which events use which resources."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def save_resource(self, resource: Resource) -> None:
        await self._tables.upsert(RESOURCES_TABLE, resource.to_entity(), replace=True)

    async def resource(self, resource_id: str) -> Resource | None:
        entity = await self._tables.get(RESOURCES_TABLE, _PARTITION, resource_id)
        return None if entity is None else Resource.from_entity(entity)

    async def resources(self) -> list[Resource]:
        entities = await self._tables.partition(RESOURCES_TABLE, _PARTITION)
        return [Resource.from_entity(e) for e in entities]

    async def delete_resource(self, resource_id: str) -> None:
        await self._tables.delete(RESOURCES_TABLE, _PARTITION, resource_id)

    async def attach(self, event_id: str, resource_id: str) -> None:
        entity = {"PartitionKey": event_id, "RowKey": resource_id}
        await self._tables.upsert(CATALOG_TABLE, entity, replace=True)

    async def detach(self, event_id: str, resource_id: str) -> None:
        await self._tables.delete(CATALOG_TABLE, event_id, resource_id)

    async def resource_ids(self, event_id: str) -> list[str]:
        return [e["RowKey"] for e in await self._tables.partition(CATALOG_TABLE, event_id)]

    async def events_using(self, resource_id: str) -> list[str]:
        rows = await self._tables.query(CATALOG_TABLE, "RowKey eq @rk", {"rk": resource_id})
        return [row["PartitionKey"] for row in rows]

    async def event_resources(self, event_id: str) -> list[Resource]:
        """The resources in an event's catalog (detached or deleted ones are left out)."""
        wanted = set(await self.resource_ids(event_id))
        if not wanted:
            return []
        return [r for r in await self.resources() if r.id in wanted]
