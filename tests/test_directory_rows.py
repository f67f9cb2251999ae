"""The directory's rows: events, resources and attendees keep the stored format, and rows written
before a field existed still load, with the field's default."""

from __future__ import annotations

from datetime import datetime

import pytest
from cryptography.fernet import Fernet

from local.azurite import Azurite
from shared.directory.attendees import ATTENDEES_TABLE, Attendee, AttendeeStore
from shared.directory.catalog import RESOURCES_TABLE, CatalogStore, Resource
from shared.directory.events import EVENTS_TABLE, Event, EventStore
from shared.directory.models import AttendeeView, EventCreate, ResourceView
from shared.directory.records import record, to_entity
from shared.platform.settings import load
from shared.platform.tables import Tables
from shared.platform.vault import Sealer
from tests.harness import unique_prefix


def tables_for(azurite: Azurite, name: str) -> Tables:
    return Tables(load({"AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
                        "AIPROXY_TABLE_PREFIX": unique_prefix(name)}))  # fmt: skip


# An event as the first versions stored it: no event caps, per-minute limits, code policy or
# Entra fields; an empty self_registration as some rows hold it.
OLD_EVENT = {
    "PartitionKey": "event", "RowKey": "old1", "name": "Spring", "starts_at": "2026-05-04T09:00:00",
    "ends_at": "2026-05-05T18:00:00", "time_zone": "Europe/Berlin", "max_token_cap": 2048,
    "daily_request_cap": 500, "shared_code": "SPRING26", "self_registration": "",
    "owner": "aad:someone", "created_at": "2026-04-01T10:00:00+00:00",
}  # fmt: skip


async def test_an_event_stored_before_its_newer_fields_loads_with_their_defaults(
    azurite: Azurite,
) -> None:
    tables = tables_for(azurite, "oldevent")
    try:
        await tables.insert(EVENTS_TABLE, OLD_EVENT)
        event = await EventStore(tables).get("old1")
    finally:
        await tables.close()
    assert event is not None
    assert event.id == "old1" and event.name == "Spring" and event.owner == "aad:someone"
    assert event.starts_at == datetime(2026, 5, 4, 9) and event.ends_at == datetime(2026, 5, 5, 18)
    assert (event.max_token_cap, event.daily_request_cap) == (2048, 500)
    assert event.self_registration == "auto"  # empty: the default
    assert event.entra_tenants == [] and event.entra_allowed == []
    assert event.active is True
    for name in ("daily_token_cap", "event_daily_request_cap", "requests_per_minute"):
        assert getattr(event, name) == 0, name
    assert event.takes_code  # the code and the default policy: registration by code works


async def test_an_event_round_trips_in_the_stored_format(azurite: Azurite) -> None:
    event = Event(id="ev2", name="Round", starts_at=datetime(2026, 5, 4, 9),
                  ends_at=datetime(2026, 5, 5, 18), time_zone="UTC", max_token_cap=100,
                  daily_request_cap=10, entra_tenants=["t1", "t2"], active=False)  # fmt: skip
    row = to_entity(event, "event")
    # Tables hold no lists or date-times: ids joined by commas, wall-clock times as ISO text.
    assert row["entra_tenants"] == "t1,t2" and row["entra_allowed"] == ""
    assert row["starts_at"] == "2026-05-04T09:00:00" and row["active"] is False
    # Every field the API answers, but the id (the row key) and what the window gives.
    answered = set(EventCreate.model_fields) | {"owner", "created_at"}
    assert set(row) == answered | {"PartitionKey", "RowKey"}
    tables = tables_for(azurite, "roundevent")
    try:
        store = EventStore(tables)
        await store.create(event)
        assert await store.get("ev2") == event
        assert [e.id for e in await store.list()] == ["ev2"]
        await store.delete("ev2")
        assert await store.get("ev2") is None
    finally:
        await tables.close()


async def test_a_resource_stored_before_its_quotas_and_region_loads(azurite: Azurite) -> None:
    old = {"PartitionKey": "resource", "RowKey": "r1", "name": "east", "deployment": "chat",
           "model_class": "openai-chat", "endpoint": "https://east.openai.azure.com",
           "upstream_deployment": "chat", "auth": "key", "priority": 1, "weight": 3,
           "active": True, "owner": "", "created_at": "", "has_api_key": True}  # fmt: skip
    tables = tables_for(azurite, "oldresource")
    try:
        await tables.insert(RESOURCES_TABLE, old)
        catalog = CatalogStore(tables)
        found = await catalog.resources.get("r1")
        assert found is not None
        assert (found.weight, found.region, found.quota_tokens_per_minute) == (3, "", 0)
        assert found.has_api_key is True
        assert found.to_json() == {**{k: v for k, v in old.items() if "Key" not in k},
                                   "id": "r1", "region": "", "quota_requests_per_minute": 0,
                                   "quota_tokens_per_minute": 0,
                                   "prices": "", "allowed_tools": None}  # fmt: skip
        assert set(found.to_json()) == set(ResourceView.model_fields)
        found.weight = 5
        await catalog.resources.save(found)
        assert await catalog.resources.get("r1") == found
        row = await tables.get(RESOURCES_TABLE, "resource", "r1")
        assert row is not None and row["weight"] == 5 and "id" not in row
    finally:
        await tables.close()


async def test_an_mcp_servers_tools_keep_null_apart_from_none(azurite: Azurite) -> None:
    """allowed_tools null is every tool, [] is none: stored as JSON text, not joined."""
    tables = tables_for(azurite, "mcptools")
    try:
        catalog = CatalogStore(tables)
        for ident, tools in (("all", None), ("none", []), ("two", ["search", "get.doc"])):
            resource = Resource(id=ident, name=ident, deployment="docs", model_class="mcp",
                                endpoint="https://tools.example.com/mcp", auth="none",
                                upstream_deployment="docs", allowed_tools=tools)  # fmt: skip
            await catalog.resources.save(resource)
            row = await tables.get(RESOURCES_TABLE, "resource", ident)
            assert row is not None and isinstance(row["allowed_tools"], str)
            found = await catalog.resources.get(ident)
            assert found is not None and found.allowed_tools == tools
    finally:
        await tables.close()


async def test_an_attendee_is_stored_in_its_events_partition(azurite: Azurite) -> None:
    tables = tables_for(azurite, "attendeerow")
    sealer = Sealer(Fernet.generate_key().decode())
    try:
        store = AttendeeStore(tables, sealer)
        added, created = await store.add("ev9", " Ada@example.com ", now=datetime(2026, 5, 4))
        assert created
        row = await tables.get(ATTENDEES_TABLE, "ev9", added.id)
        assert row is not None
        assert set(row) - {"Timestamp"} == {
            "PartitionKey", "RowKey", "user", "key_hash", "key_sealed", "active", "created_at",
            "revoked_at", "self_registered",
        }  # fmt: skip
        assert (row["user"], row["active"], row["revoked_at"]) == ("Ada@example.com", True, "")
        assert row["self_registered"] is False
        found = await store.get("ev9", added.id)
        assert found == added and isinstance(found, Attendee)
        # A row stored before the field existed reads as issued, not self-registered.
        older = {k: v for k, v in row.items() if k not in ("Timestamp", "self_registered")}
        await tables.upsert(ATTENDEES_TABLE, older, replace=True)
        assert (await store.get("ev9", added.id)) == added
        shown = found.to_json(sealer)
        assert set(shown) == {*AttendeeView.model_fields, "api_key"}
        assert shown["event_id"] == "ev9" and shown["api_key"].startswith("aip-")
        await store.revoke(found, now=datetime(2026, 5, 5))
        again = await store.get("ev9", added.id)
        assert again is not None and again.active is False and again.revoked_at
    finally:
        await tables.close()


def test_a_record_built_in_code_takes_the_models_defaults() -> None:
    resource = Resource(id="r", name="r", deployment="chat", model_class="openai-chat",
                        endpoint="https://example.com", upstream_deployment="chat")  # fmt: skip
    assert (resource.auth, resource.priority, resource.weight, resource.active) == (
        "key", 1, 1, True)  # fmt: skip
    assert resource.owner == "" and resource.has_api_key is False


def test_a_default_for_no_required_field_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(TypeError, match="nosuch"):
        record(ResourceView, defaults={"nosuch": 1})(type("Probe", (), {}))
    with pytest.raises(TypeError, match="weight"):  # it has its model's default already
        record(ResourceView, defaults={"weight": 2})(type("Probe", (), {}))
