"""Revoking or rotating a key on one instance reaches every other within the cache TTL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.azurite import Azurite
from tests.harness import AppHost, EventSetup, Storage, host_env

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# Margin over the TTL for one storage read and the polling step.
MARGIN_SECONDS = 1.0


@pytest.fixture(scope="module")
def other(azurite: Azurite, log_dir: Path, prefix: str) -> Iterator[AppHost]:
    """A second instance of the app on the same storage."""
    server = AppHost(log_dir, host_env(azurite.connection_string, prefix), name="devhost-other")
    yield server
    server.stop()


def ttl(host: AppHost) -> float:
    return float(host.env["AIPROXY_CACHE_TTL_SECONDS"])


def call(host: AppHost, key: str) -> httpx.Response:
    return host.http.post(CHAT, json=HELLO, headers={"api-key": key})


def seconds_until_refused(host: AppHost, key: str, code: str, limit: float) -> float:
    """Poll until `host` refuses `key` with `code`; the seconds it took (fails past `limit`)."""
    start = time.monotonic()
    while True:
        response = call(host, key)
        elapsed = time.monotonic() - start
        if response.status_code == 401:
            assert response.json()["error"]["code"] == code
            return elapsed
        assert response.status_code == 200, response.text
        assert elapsed < limit, f"still accepted after {elapsed:.2f} s"
        time.sleep(0.05)


def test_revocation_reaches_the_other_instance_within_the_cache_ttl(
    host: AppHost, other: AppHost, event: EventSetup
) -> None:
    assert call(other, event.key).status_code == 200  # the other instance has the key cached
    revoked = host.manage.delete(f"/events/{event.id}/attendees/{event.attendee['id']}")
    assert revoked.status_code == 200
    assert call(host, event.key).json()["error"]["code"] == "key_revoked"  # at once here
    bound = ttl(other) + MARGIN_SECONDS
    took = seconds_until_refused(other, event.key, "key_revoked", bound)
    print(f"revocation reached the other instance after {took:.2f} s (TTL {ttl(other)} s)")
    assert took <= bound


def test_rotation_reaches_the_other_instance_within_the_cache_ttl(
    host: AppHost, other: AppHost, event: EventSetup
) -> None:
    assert call(host, event.key).status_code == 200  # host has the old key cached
    rotated = other.manage.post(f"/events/{event.id}/attendees/{event.attendee['id']}/rotate")
    assert rotated.status_code == 200
    new_key = rotated.json()["api_key"]
    assert call(host, new_key).status_code == 200  # the new key works everywhere at once
    bound = ttl(host) + MARGIN_SECONDS
    took = seconds_until_refused(host, event.key, "invalid_api_key", bound)
    print(f"rotation reached the other instance after {took:.2f} s (TTL {ttl(host)} s)")
    assert took <= bound
    assert call(host, new_key).status_code == 200
    assert call(other, new_key).status_code == 200


def test_deleting_the_event_stops_its_keys_on_every_instance(
    host: AppHost, other: AppHost, event: EventSetup
) -> None:
    assert call(other, event.key).status_code == 200  # the other instance has it cached
    assert host.manage.delete(f"/events/{event.id}?force=true").status_code == 204
    assert call(host, event.key).status_code == 401
    took = seconds_until_refused(other, event.key, "invalid_api_key", ttl(other) + MARGIN_SECONDS)
    assert took <= ttl(other) + MARGIN_SECONDS


def test_keys_are_stored_as_a_hash_and_a_sealed_copy(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    import hashlib

    key = event.key
    assert key.startswith("aip-") and len(key) == 36 and key[4:].isalnum()
    digest = hashlib.sha256(key.encode()).hexdigest()
    index = storage.rows("keys", f"PartitionKey eq '{digest}'")
    assert [(r["event_id"], r["attendee_id"]) for r in index] == [(event.id, event.attendee["id"])]
    row = storage.rows("attendees", f"RowKey eq '{event.attendee['id']}'")[0]
    assert row["key_hash"] == digest
    assert key not in str(row) and key[4:] not in row["key_sealed"]
    # The sealed copy lets the organiser see the key again.
    shown = host.manage.get(f"/events/{event.id}/attendees/{event.attendee['id']}")
    assert shown.json()["api_key"] == key
