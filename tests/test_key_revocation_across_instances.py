"""Revoking or rotating a key on one instance reaches every other within the cache TTL."""

from __future__ import annotations

import time

import pytest

from tests.harness import HELLO, AppHost, EventSetup, Storage, chat

pytestmark = pytest.mark.e2e  # two app instances

# Margin over the TTL for one storage read and the polling step.
MARGIN_SECONDS = 1.0


def ttl(host: AppHost) -> float:
    return float(host.env["AIPROXY_CACHE_TTL_SECONDS"])


def seconds_until_refused(host: AppHost, key: str, code: str, limit: float) -> float:
    """Poll until `host` refuses `key` with `code`; the seconds it took (fails past `limit`)."""
    start = time.monotonic()
    while True:
        response = chat(host, key, HELLO)
        elapsed = time.monotonic() - start
        if response.status_code == 401:
            assert response.json()["error"]["code"] == code
            return elapsed
        assert response.status_code == 200, response.text
        assert elapsed < limit, f"still accepted after {elapsed:.2f} s"
        time.sleep(0.05)


def test_revocation_reaches_the_other_instance_within_the_cache_ttl(
    host: AppHost, second_host: AppHost, event: EventSetup
) -> None:
    assert (
        chat(second_host, event.key, HELLO).status_code == 200
    )  # the second_host instance has the key cached
    revoked = host.manage.delete(f"/events/{event.id}/attendees/{event.attendee['id']}")
    assert revoked.status_code == 200
    assert chat(host, event.key, HELLO).json()["error"]["code"] == "key_revoked"  # at once here
    bound = ttl(second_host) + MARGIN_SECONDS
    took = seconds_until_refused(second_host, event.key, "key_revoked", bound)
    print(
        f"revocation reached the second_host instance after {took:.2f} s (TTL {ttl(second_host)} s)"
    )
    assert took <= bound


def test_rotation_reaches_the_other_instance_within_the_cache_ttl(
    host: AppHost, second_host: AppHost, event: EventSetup
) -> None:
    assert chat(host, event.key, HELLO).status_code == 200  # host has the old key cached
    rotated = second_host.manage.post(f"/events/{event.id}/attendees/{event.attendee['id']}/rotate")
    assert rotated.status_code == 200
    new_key = rotated.json()["api_key"]
    assert chat(host, new_key, HELLO).status_code == 200  # the new key works everywhere at once
    bound = ttl(host) + MARGIN_SECONDS
    took = seconds_until_refused(host, event.key, "invalid_api_key", bound)
    print(f"rotation reached the second_host instance after {took:.2f} s (TTL {ttl(host)} s)")
    assert took <= bound
    assert chat(host, new_key, HELLO).status_code == 200
    assert chat(second_host, new_key, HELLO).status_code == 200


def test_deleting_the_event_stops_its_keys_on_every_instance(
    host: AppHost, second_host: AppHost, event: EventSetup
) -> None:
    assert (
        chat(second_host, event.key, HELLO).status_code == 200
    )  # the second_host instance has it cached
    assert host.manage.delete(f"/events/{event.id}?force=true").status_code == 204
    assert chat(host, event.key, HELLO).status_code == 401
    took = seconds_until_refused(
        second_host, event.key, "invalid_api_key", ttl(second_host) + MARGIN_SECONDS
    )
    assert took <= ttl(second_host) + MARGIN_SECONDS


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
