"""Behind EasyAuth each organiser owns what it creates and sees only that; operators see all."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.azurite import Azurite
from tests.harness import SIM_KEY, AppHost, Simulator, host_answer, host_env, window


def easyauth(provider: str, user_id: str, name: str) -> dict[str, str]:
    """The headers App Service sets for a signed-in user (App Service principal shape)."""
    principal = {
        "auth_typ": provider,
        "claims": [
            {
                "typ": "http://schemas.microsoft.com/identity/claims/objectidentifier",
                "val": user_id,
            },
            {"typ": "preferred_username", "val": name},
        ],
        "name_typ": "preferred_username",
    }
    return {
        "x-ms-client-principal": base64.b64encode(json.dumps(principal).encode()).decode(),
        "x-ms-client-principal-id": user_id,
        "x-ms-client-principal-name": name,
        "x-ms-client-principal-idp": provider,
    }


ALICE = easyauth("aad", "oid-alice", "alice@contoso.com")
BOB = easyauth("aad", "oid-bob", "bob@contoso.com")


@pytest.fixture(scope="module")
def trusted(azurite: Azurite, log_dir: Path, prefix: str) -> Iterator[AppHost]:
    """An instance behind EasyAuth: it trusts the principal headers."""
    env = host_env(azurite.connection_string, prefix, AIPROXY_TRUST_EASYAUTH="true")
    server = AppHost(log_dir, env, name="devhost-owners")
    yield server
    server.stop()


class Organiser:
    """Management calls as one signed-in user (function key plus principal headers)."""

    def __init__(self, host: AppHost, headers: dict[str, str]) -> None:
        self.host = host
        self.headers = headers

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.host.manage.request(method, path, json=body, headers=self.headers)

    def create_event(self, name: str) -> dict[str, Any]:
        body = {"name": name, **window(), "max_token_cap": 64, "daily_request_cap": 10}
        created = self.call("POST", "/events", body)
        assert created.status_code == 201, created.text
        return created.json()

    def create_resource(self, sim: Simulator, name: str) -> dict[str, Any]:
        body = {
            "name": name,
            "deployment": "gpt-4o-mini",
            "model_class": "openai-chat",
            "endpoint": sim.url,
            "api_key": SIM_KEY,
        }
        created = self.call("POST", "/resources", body)
        assert created.status_code == 201, created.text
        return created.json()


@pytest.fixture(scope="module")
def world(trusted: AppHost, sim: Simulator) -> dict[str, Any]:
    """Alice's event with a resource and an attendee; Bob's event."""
    alice, bob = Organiser(trusted, ALICE), Organiser(trusted, BOB)
    event = alice.create_event("Alice's workshop")
    resource = alice.create_resource(sim, "alice's deployment")
    attached = alice.call("PUT", f"/events/{event['id']}/resources/{resource['id']}")
    assert attached.status_code == 200
    attendee = alice.call("POST", f"/events/{event['id']}/attendees", {"user": "student@x.org"})
    assert attendee.status_code == 201
    return {
        "alice": alice,
        "bob": bob,
        "event": event,
        "resource": resource,
        "attendee": attendee.json(),
        "bob_event": bob.create_event("Bob's class"),
    }


def test_creator_becomes_the_owner(world: dict[str, Any]) -> None:
    assert world["event"]["owner"] == "aad:oid-alice"
    assert world["resource"]["owner"] == "aad:oid-alice"
    assert world["bob_event"]["owner"] == "aad:oid-bob"


def test_owners_list_only_their_own(world: dict[str, Any]) -> None:
    alice, bob = world["alice"], world["bob"]
    alice_events = alice.call("GET", "/events").json()
    assert {e["owner"] for e in alice_events} == {"aad:oid-alice"}
    assert world["event"]["id"] in {e["id"] for e in alice_events}
    bob_events = bob.call("GET", "/events").json()
    assert [e["id"] for e in bob_events] == [world["bob_event"]["id"]]
    assert bob.call("GET", "/resources").json() == []
    alice_resources = alice.call("GET", "/resources").json()
    assert world["resource"]["id"] in {r["id"] for r in alice_resources}
    assert {r["owner"] for r in alice_resources} == {"aad:oid-alice"}


def test_someone_elses_things_are_404(world: dict[str, Any]) -> None:
    bob, event_id = world["bob"], world["event"]["id"]
    resource_id, attendee_id = world["resource"]["id"], world["attendee"]["id"]
    attempts = [
        ("GET", f"/events/{event_id}", None),
        ("PATCH", f"/events/{event_id}", {"name": "mine now"}),
        ("DELETE", f"/events/{event_id}?force=true", None),
        ("GET", f"/resources/{resource_id}", None),
        ("PATCH", f"/resources/{resource_id}", {"weight": 5}),
        ("DELETE", f"/resources/{resource_id}", None),
        ("GET", f"/events/{event_id}/resources", None),
        ("PUT", f"/events/{event_id}/resources/{resource_id}", None),
        ("PUT", f"/events/{world['bob_event']['id']}/resources/{resource_id}", None),
        ("DELETE", f"/events/{event_id}/resources/{resource_id}", None),
        ("GET", f"/events/{event_id}/attendees", None),
        ("POST", f"/events/{event_id}/attendees", {"user": "intruder"}),
        ("GET", f"/events/{event_id}/attendees/{attendee_id}", None),
        ("DELETE", f"/events/{event_id}/attendees/{attendee_id}", None),
        ("POST", f"/events/{event_id}/attendees/{attendee_id}/rotate", None),
        ("GET", f"/events/{event_id}/usage?group_by=attendee", None),
    ]
    for method, path, body in attempts:
        response = bob.call(method, path, body)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    # Nothing of Alice's changed.
    still = world["alice"].call("GET", f"/events/{event_id}").json()
    assert still["name"] == "Alice's workshop"
    attendee = world["alice"].call("GET", f"/events/{event_id}/attendees/{attendee_id}").json()
    assert attendee["active"] is True and attendee["api_key"] == world["attendee"]["api_key"]


def test_operator_with_only_the_function_key_sees_everything(
    trusted: AppHost, world: dict[str, Any]
) -> None:
    events = {e["id"] for e in trusted.manage.get("/events").json()}
    assert {world["event"]["id"], world["bob_event"]["id"]} <= events
    resource = trusted.manage.get(f"/resources/{world['resource']['id']}")
    assert resource.status_code == 200 and resource.json()["owner"] == "aad:oid-alice"
    created = trusted.manage.post(
        "/events", json={"name": "ops", **window(), "max_token_cap": 1, "daily_request_cap": 1}
    )
    assert created.json()["owner"] == ""
    assert world["alice"].call("GET", f"/events/{created.json()['id']}").status_code == 404


def test_conflict_names_only_events_the_caller_may_see(
    trusted: AppHost, world: dict[str, Any], sim: Simulator
) -> None:
    alice = world["alice"]
    resource = alice.create_resource(sim, "shared by an operator")
    bob_event = world["bob_event"]["id"]
    attach = trusted.manage.put(f"/events/{bob_event}/resources/{resource['id']}")
    assert attach.status_code == 200  # an operator may attach anyone's resource
    refused = alice.call("DELETE", f"/resources/{resource['id']}")
    assert refused.status_code == 409
    assert bob_event not in refused.json()["error"]["message"]
    assert "not yours" in refused.json()["error"]["message"]
    as_operator = trusted.manage.delete(f"/resources/{resource['id']}")
    assert as_operator.status_code == 409 and bob_event in as_operator.json()["error"]["message"]


def test_static_web_apps_principal_shape_is_understood(trusted: AppHost) -> None:
    principal = {"identityProvider": "github", "userId": "gh-99", "userDetails": "octocat"}
    headers = {"x-ms-client-principal": base64.b64encode(json.dumps(principal).encode()).decode()}
    created = Organiser(trusted, headers).create_event("SWA event")
    assert created["owner"] == "github:gh-99"


def test_malformed_principal_is_no_principal(trusted: AppHost) -> None:
    for value in ("not base64 !!", base64.b64encode(b"[1, 2]").decode()):
        created = Organiser(trusted, {"x-ms-client-principal": value}).create_event("odd")
        assert created["owner"] == ""


def test_forged_principal_changes_nothing_without_trust(
    host: AppHost, world: dict[str, Any]
) -> None:
    forged = Organiser(host, BOB)
    events = {e["id"] for e in forged.call("GET", "/events").json()}
    assert world["event"]["id"] in events  # still an operator: sees Alice's event too
    assert forged.create_event("forged")["owner"] == ""
    assert forged.call("GET", f"/events/{world['event']['id']}").status_code == 200


def test_principal_does_not_replace_the_function_key(trusted: AppHost) -> None:
    host_answer(trusted.http.get("/manage/events", headers=ALICE), 401)
