"""Behind EasyAuth each organiser owns what it creates and sees only that; operators (the
operator key, or an operator app role or group in the principal's claims) see all."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.azurite import Azurite
from tests.harness import FUNCTION_KEY, SIM_KEY, App, AppHost, Simulator, host_env, window
from tests.inprocess import Configured

OPERATOR_ROLE = "AIProxy.Operator"
OPERATOR_GROUP = "0f0e0d0c-0b0a-4908-8706-050403020100"


def easyauth(
    provider: str,
    user_id: str,
    name: str,
    *,
    roles: tuple[str, ...] | list[str] = (),
    groups: tuple[str, ...] | list[str] = (),
    tenant: str = "",
) -> dict[str, str]:
    """The headers App Service sets for a signed-in user (App Service principal shape): one
    claim per role and per group, as App Service writes them."""
    claims = [
        {"typ": "http://schemas.microsoft.com/identity/claims/objectidentifier", "val": user_id},
        {"typ": "preferred_username", "val": name},
    ]
    claims += [{"typ": "roles", "val": role} for role in roles]
    claims += [{"typ": "groups", "val": group} for group in groups]
    if tenant:
        claims.append(
            {"typ": "http://schemas.microsoft.com/identity/claims/tenantid", "val": tenant}
        )
    principal = {
        "auth_typ": provider,
        "claims": claims,
        "name_typ": "preferred_username",
        "role_typ": "roles",
    }
    return {
        "x-ms-client-principal": base64.b64encode(json.dumps(principal).encode()).decode(),
        "x-ms-client-principal-id": user_id,
        "x-ms-client-principal-name": name,
        "x-ms-client-principal-idp": provider,
    }


pytestmark = pytest.mark.e2e  # signed-in organisers through the host stand-in and the worker

ALICE = easyauth("aad", "oid-alice", "alice@contoso.com")
BOB = easyauth("aad", "oid-bob", "bob@contoso.com")


@pytest.fixture(scope="module")
def trusted(configured: Configured) -> App:
    """An instance behind EasyAuth: it trusts the principal headers."""
    return configured(
        "owners",
        AIPROXY_TRUST_EASYAUTH="true",
        AIPROXY_ENTRA_OPERATOR_ROLES=OPERATOR_ROLE,
        AIPROXY_ENTRA_OPERATOR_GROUPS=OPERATOR_GROUP,
    )


class Organiser:
    """Management calls as one signed-in user: its principal headers and nothing else."""

    def __init__(self, host: AppHost, headers: dict[str, str]) -> None:
        self.host = host
        self.headers = headers

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        url = f"{self.host.base}/manage{path}"
        return httpx.request(method, url, json=body, headers=self.headers, timeout=30)

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
        ("PATCH", f"/resources/{resource_id}", {"endpoint": "https://bob.example", "api_key": "k"}),
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


def test_the_operator_key_sees_everything(trusted: AppHost, world: dict[str, Any]) -> None:
    events = {e["id"] for e in trusted.manage.get("/events").json()}
    assert {world["event"]["id"], world["bob_event"]["id"]} <= events
    resource = trusted.manage.get(f"/resources/{world['resource']['id']}")
    assert resource.status_code == 200 and resource.json()["owner"] == "aad:oid-alice"
    created = trusted.manage.post(
        "/events", json={"name": "ops", **window(), "max_token_cap": 1, "daily_request_cap": 1}
    )
    assert created.json()["owner"] == ""
    assert world["alice"].call("GET", f"/events/{created.json()['id']}").status_code == 404


def test_a_principal_with_an_operator_role_or_group_is_the_operator(
    trusted: AppHost, world: dict[str, Any]
) -> None:
    for headers in (
        easyauth("aad", "oid-olga", "olga@contoso.com", roles=["Reader", OPERATOR_ROLE]),
        easyauth("aad", "oid-oscar", "oscar@contoso.com", groups=[OPERATOR_GROUP.upper()]),
    ):
        operator = Organiser(trusted, headers)
        events = {e["id"] for e in operator.call("GET", "/events").json()}
        assert {world["event"]["id"], world["bob_event"]["id"]} <= events
        attendee = operator.call(
            "GET", f"/events/{world['event']['id']}/attendees/{world['attendee']['id']}"
        )
        assert attendee.status_code == 200
        assert operator.create_event("operator's own")["owner"] == ""
    # Another role or group makes nobody the operator.
    other = Organiser(trusted, easyauth("aad", "oid-rita", "rita@x", roles=["Reader"]))
    assert other.call("GET", "/events").json() == []
    assert other.create_event("Rita's")["owner"] == "aad:oid-rita"


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
        refused = Organiser(trusted, {"x-ms-client-principal": value}).call("GET", "/events")
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "unauthorized"


def test_forged_principal_is_nobody_without_trust(app_host: AppHost, world: dict[str, Any]) -> None:
    host = app_host  # an instance that does not trust the headers
    forged = Organiser(host, BOB)
    for method, path in (("GET", "/events"), ("GET", f"/events/{world['event']['id']}")):
        refused = forged.call(method, path)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "unauthorized"
    # With the operator key beside it, the forged principal changes nothing: still the operator.
    created = host.manage.post(
        "/events",
        json={"name": "forged", **window(), "max_token_cap": 1, "daily_request_cap": 1},
        headers=BOB,
    )
    assert created.status_code == 201 and created.json()["owner"] == ""


def test_signed_in_organisers_need_no_function_key(trusted: AppHost, world: dict[str, Any]) -> None:
    listed = trusted.http.get("/manage/events", headers=ALICE)
    assert listed.status_code == 200
    assert {e["owner"] for e in listed.json()} == {"aad:oid-alice"}


def test_an_organiser_without_its_sign_in_is_refused_everywhere(
    trusted: AppHost, world: dict[str, Any]
) -> None:
    # Alice's own things, without her principal: the function key, or nothing, opens nothing.
    event_id, attendee_id = world["event"]["id"], world["attendee"]["id"]
    paths = [
        ("GET", "/events"),
        ("GET", f"/events/{event_id}"),
        ("GET", f"/events/{event_id}/attendees"),
        ("POST", f"/events/{event_id}/attendees/{attendee_id}/rotate"),
        ("DELETE", f"/resources/{world['resource']['id']}"),
    ]
    for headers in ({}, {"x-functions-key": FUNCTION_KEY}):
        for method, path in paths:
            refused = Organiser(trusted, headers).call(method, path)
            assert refused.status_code == 401, (method, path, refused.text)
            assert refused.json()["error"]["code"] == "unauthorized"
    assert world["alice"].call("GET", f"/events/{event_id}/attendees").status_code == 200


def test_organisers_let_only_their_own_tenant_into_events(
    trusted: AppHost, world: dict[str, Any]
) -> None:
    own, other = "11111111-2222-4333-8444-555555555555", "66666666-7777-4888-8999-000000000000"
    dana = Organiser(trusted, easyauth("aad", "oid-dana", "dana@fabrikam.com", tenant=own))
    body = {"name": "Dana's", **window(), "max_token_cap": 1, "daily_request_cap": 1}
    refused = dana.call("POST", "/events", {**body, "entra_tenants": [other]})
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("forbidden", "entra_tenants")
    assert other in error["message"]
    created = dana.call("POST", "/events", {**body, "entra_tenants": [own.upper()]})
    assert created.status_code == 201 and created.json()["entra_tenants"] == [own]
    # A GitHub sign-in belongs to no tenant: it may add none.
    github = Organiser(trusted, easyauth("github", "gh-7", "octo", tenant=own))
    assert github.call("POST", "/events", {**body, "entra_tenants": [own]}).status_code == 403


def test_once_organiser_roles_are_named_a_sign_in_needs_one(
    azurite: Azurite, log_dir: Path, prefix: str
) -> None:
    """Naming organiser roles narrows sign-ins as it narrows tokens: a signed-in user without
    one is refused (403 naming the role), one with it owns what it creates."""
    env = host_env(
        azurite.connection_string,
        prefix,
        AIPROXY_TRUST_EASYAUTH="true",
        AIPROXY_ENTRA_ORGANIZER_ROLES="AIProxy.Organizer",
    )
    server = AppHost(log_dir, env, name="devhost-organiser-roles")
    try:
        stranger = Organiser(server, easyauth("aad", "oid-sam", "sam@contoso.com"))
        refused = stranger.call("GET", "/events")
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "forbidden"
        assert "AIProxy.Organizer" in refused.json()["error"]["message"]
        organiser = Organiser(
            server, easyauth("aad", "oid-ora", "ora@contoso.com", roles=["AIProxy.Organizer"])
        )
        assert organiser.create_event("Ora's")["owner"] == "aad:oid-ora"
    finally:
        server.stop()


def test_a_signed_in_change_from_another_site_is_refused(
    trusted: AppHost, world: dict[str, Any]
) -> None:
    """The sign-in is a cookie any site's form or script could make the browser send: changes
    made with it must come from the app's own pages (Sec-Fetch-Site, else Origin). Reading
    stays allowed (another site cannot read the answer), and keys and tokens are not cookies."""
    alice = world["alice"]
    event_id, attendee_id = world["event"]["id"], world["attendee"]["id"]
    before = alice.call("GET", f"/events/{event_id}/attendees/{attendee_id}").json()["api_key"]
    body = {"name": "forged", **window(), "max_token_cap": 64, "daily_request_cap": 10}
    for evidence in (
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
        {"origin": "https://evil.example"},
    ):
        forged = Organiser(trusted, {**ALICE, **evidence})
        for method, path, payload in (
            ("POST", "/events", body),
            ("POST", f"/events/{event_id}/attendees/{attendee_id}/rotate", None),
            ("DELETE", f"/events/{event_id}", None),
        ):
            answer = forged.call(method, path, payload)
            assert answer.status_code == 403, (evidence, path, answer.text)
            assert "another site" in answer.json()["error"]["message"]
        assert forged.call("GET", "/events").status_code == 200
    # Nothing changed: no forged event, the attendee's key as it was.
    assert "forged" not in {e["name"] for e in alice.call("GET", "/events").json()}
    after = alice.call("GET", f"/events/{event_id}/attendees/{attendee_id}").json()["api_key"]
    assert after == before
    # The console's own page (same origin, as the browser says) may change things.
    host = trusted.base.split("/")[2]
    for evidence in ({"sec-fetch-site": "same-origin"}, {"origin": f"http://{host}"}):
        same = Organiser(trusted, {**ALICE, **evidence})
        created = same.call("POST", "/events", {**body, "name": "from the console"})
        assert created.status_code == 201, created.text
