"""Upstream resources (model deployments) and each event's catalog of them."""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from shared.directory.validation import (
    Problems,
    boolean,
    known_fields,
    required,
    text,
    whole_number,
)
from shared.errors import invalid
from shared.platform.tables import Tables

RESOURCES_TABLE = "resources"
CAP_LIMIT = 2**31 - 1  # numbers are stored as 32-bit integers
CATALOG_TABLE = "catalog"
_PARTITION = "resource"

MODEL_CLASSES = (
    "openai-chat",
    "openai-completions",
    "openai-embeddings",
    "openai-images",
    "openai-audio",
    "azure-ai-search",
)
AUTH_KINDS = ("key", "managed_identity")
_DEPLOYMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
    return _DEPLOYMENT_NAME.match(name) is not None


_FIELDS = {
    "name",
    "deployment",
    "model_class",
    "endpoint",
    "upstream_deployment",
    "auth",
    "api_key",
    "priority",
    "weight",
    "region",
    "active",
    "quota_requests_per_minute",
    "quota_tokens_per_minute",
}


def _apply(resource: Resource, body: dict[str, Any], problems: Problems) -> str | None:
    """Validate and set the fields in body; return a new api_key if one was given. Every bad
    field is noted in `problems`."""
    with problems.check():
        known_fields(body, _FIELDS, "a resource")
    name_fix = "Use letters, digits, '.', '_' and '-', starting with a letter or digit."
    if "name" in body:
        with problems.check():
            resource.name = text("name", body["name"], limit=200, required=True)
    if "deployment" in body:
        with problems.check():
            resource.deployment = text("deployment", body["deployment"], limit=64, required=True)
            if not valid_deployment_name(resource.deployment):
                raise invalid(
                    "deployment",
                    "may hold letters, digits, '.', '_' and '-' (at most 64)",
                    name_fix,
                )
    if "upstream_deployment" in body:
        with problems.check():
            value = text("upstream_deployment", body["upstream_deployment"], limit=64)
            if value and not valid_deployment_name(value):
                raise invalid(
                    "upstream_deployment", "may hold letters, digits, '.', '_' and '-'", name_fix
                )
            resource.upstream_deployment = value
    if not resource.upstream_deployment:
        resource.upstream_deployment = resource.deployment
    if "model_class" in body:
        if body["model_class"] in MODEL_CLASSES:
            resource.model_class = body["model_class"]
        else:
            problems.add(
                invalid(
                    "model_class",
                    f"must be one of {', '.join(MODEL_CLASSES)}",
                    "Send one of the listed model classes.",
                )
            )
    if "endpoint" in body:
        with problems.check():
            endpoint = text("endpoint", body["endpoint"], limit=500, required=True).rstrip("/")
            parts = urlsplit(endpoint)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise invalid(
                    "endpoint",
                    "must be an http(s) URL such as https://NAME.openai.azure.com",
                    "Send the resource's endpoint from the Azure portal (Keys and Endpoint).",
                )
            if parts.query or parts.fragment:
                raise invalid(
                    "endpoint", "must not carry a query or fragment", "Leave out '?…' and '#…'."
                )
            resource.endpoint = endpoint
    if "auth" in body:
        if body["auth"] in AUTH_KINDS:
            resource.auth = body["auth"]
        else:
            problems.add(
                invalid(
                    "auth",
                    "must be 'key' or 'managed_identity'",
                    "Send 'key' or 'managed_identity'.",
                )
            )
    numbers = (
        ("priority", 0, 1000),
        ("weight", 1, 1000),
        ("quota_requests_per_minute", 0, CAP_LIMIT),
        ("quota_tokens_per_minute", 0, CAP_LIMIT),
    )
    for param, minimum, maximum in numbers:
        if param in body:
            value = body[param]
            if param.startswith("quota_") and value is None:
                value = 0  # null: the quota is not known
            with problems.check():
                setattr(
                    resource, param, whole_number(param, value, minimum=minimum, maximum=maximum)
                )
    if "region" in body:
        with problems.check():
            resource.region = text("region", body["region"], limit=64)
    if "active" in body:
        with problems.check():
            resource.active = boolean("active", body["active"])
    api_key = None
    if "api_key" in body and body["api_key"] is not None:
        with problems.check():
            api_key = text("api_key", body["api_key"], limit=500, required=True)
    return api_key


_KEY_FIX = "Send the resource's key as 'api_key', or use auth 'managed_identity'."


def new_resource(body: dict[str, Any], *, owner: str, now: datetime) -> tuple[Resource, str | None]:
    problems = Problems()
    required(body, ("name", "deployment", "model_class", "endpoint"), problems)
    resource = Resource(
        id=secrets.token_hex(8),
        name="",
        deployment="",
        model_class="",
        endpoint="",
        upstream_deployment="",
        owner=owner,
        created_at=now.isoformat(),
    )
    api_key = _apply(resource, body, problems)
    if resource.auth == "key" and api_key is None and not problems.bad("api_key", "auth"):
        problems.add(invalid("api_key", "is required when auth is 'key'", _KEY_FIX))
    problems.raise_any()
    return resource, api_key


def patch_resource(resource: Resource, body: dict[str, Any]) -> str | None:
    problems = Problems()
    api_key = _apply(resource, body, problems)
    if (
        resource.auth == "key"
        and api_key is None
        and not resource.has_api_key
        and not problems.bad("api_key", "auth")
    ):
        problems.add(invalid("api_key", "is required when auth is 'key'", _KEY_FIX))
    problems.raise_any()
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
