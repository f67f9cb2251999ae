"""Organisers by Entra token keep to their own events, attendees and resources; without their
token they reach nothing; the operator's powers (everything, the app's managed identity, any
tenant) stay the operator's; an organiser's endpoints cannot aim inside; and a stored upstream
key never follows a new endpoint. Through the host stand-in and the worker, attendees calling
with the official openai SDK."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from azure.data.tables import TableServiceClient

from local.azurite import Azurite
from tests.entra_issuer import LocalIssuer
from tests.harness import (
    API_VERSION,
    FUNCTION_KEY,
    HELLO,
    OPERATOR_KEY,
    SIM_KEY,
    App,
    AppHost,
    Simulator,
    StandIns,
    unique_prefix,
    window,
)
from tests.inprocess import Configured

ORGANISERS = str(uuid.uuid4())  # the organisers' tenant
PARTNERS = str(uuid.uuid4())  # a tenant no organiser belongs to
AUDIENCE = "api://aiproxy-trust"
ORGANISER_GROUP = str(uuid.uuid4())
ORGANISER_ROLE = "Event.Organizer"
OPERATOR_GROUP = str(uuid.uuid4())
OPERATOR_ROLE = "AIProxy.Operator"
CHAT = "/openai/deployments/{}/chat/completions?api-version=2024-10-21"

pytestmark = pytest.mark.e2e  # organisers' tokens and attendees' calls through the worker


@pytest.fixture(scope="module")
def upstreams(log_dir: Path) -> Iterator[tuple[Simulator, Simulator]]:
    """Two upstreams of this module's own: what each one saw is this module's doing."""
    first, second = Simulator(log_dir, name="trust-a"), Simulator(log_dir, name="trust-b")
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture(scope="module")
def app(configured: Configured, issuer: LocalIssuer) -> tuple[App, StandIns, str]:
    """Organisers and operators by token, and a stand-in managed identity that works: a token
    the app asked for would reach the upstream."""
    prefix = unique_prefix("trust")
    host, standins = configured.with_standins(
        "trust",
        prefix=prefix,
        AIPROXY_ENTRA_AUTHORITY=issuer.authority,
        AIPROXY_ENTRA_ORGANIZER_TENANTS=ORGANISERS,
        AIPROXY_ENTRA_ORGANIZER_AUDIENCE=AUDIENCE,
        AIPROXY_ENTRA_ORGANIZER_GROUPS=ORGANISER_GROUP,
        AIPROXY_ENTRA_ORGANIZER_ROLES=ORGANISER_ROLE,
        AIPROXY_ENTRA_OPERATOR_GROUPS=OPERATOR_GROUP,
        AIPROXY_ENTRA_OPERATOR_ROLES=OPERATOR_ROLE,
    )
    return host, standins, prefix


@pytest.fixture(scope="module")
def host(app: tuple[App, StandIns, str]) -> AppHost:
    return app[0]


class Signed:
    """Management calls with one set of headers and nothing else (no operator key)."""

    def __init__(self, host: AppHost, headers: dict[str, str], address: str = "127.0.0.1"):
        self.client = httpx.Client(
            base_url=f"{host.base}/manage",
            headers=headers,
            timeout=30,
            transport=httpx.HTTPTransport(local_address=address),
        )

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.client.request(method, path, json=body)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        response = self.call(method, path, body)
        assert response.status_code == status, (method, path, response.text)
        return response.json() if response.content else None


def token_of(issuer: LocalIssuer, host: AppHost, **claims: Any) -> Signed:
    token = issuer.token(ORGANISERS, audience=AUDIENCE, **claims)
    return Signed(host, {"authorization": f"Bearer {token}"})


def event_body(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, **window(), "max_token_cap": 64, "daily_request_cap": 50, **extra}


def resource_body(url: str, deployment: str, **extra: Any) -> dict[str, Any]:
    return {"name": deployment, "deployment": deployment, "model_class": "openai-chat",
            "endpoint": url, "api_key": SIM_KEY, **extra}  # fmt: skip


def refusal(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["status"] == status, error
    return error


@pytest.fixture(scope="module")
def alice_world(
    host: AppHost, issuer: LocalIssuer, upstreams: tuple[Simulator, Simulator]
) -> dict[str, Any]:
    """Alice's event with her resource on the first upstream and an attendee."""
    alice = token_of(issuer, host, oid=str(uuid.uuid4()), groups=[ORGANISER_GROUP])
    event = alice.ok("POST", "/events", event_body("Alice's lab"), 201)
    resource = alice.ok("POST", "/resources", resource_body(upstreams[0].url, "alice-gpt"), 201)
    alice.ok("PUT", f"/events/{event['id']}/resources/{resource['id']}")
    attendee = alice.ok("POST", f"/events/{event['id']}/attendees", {"user": "s@x.org"}, 201)
    return {"alice": alice, "event": event, "resource": resource, "attendee": attendee}


def every_route(world: dict[str, Any], own_event: str = "") -> list[tuple[str, str, Any]]:
    """Every management route and method, on Alice's things."""
    event, resource = world["event"]["id"], world["resource"]["id"]
    attendee = world["attendee"]["id"]
    return [
        ("GET", "/events", None),
        ("POST", "/events", event_body("x")),
        ("GET", f"/events/{event}", None),
        ("PATCH", f"/events/{event}", {"name": "taken"}),
        ("DELETE", f"/events/{event}?force=true", None),
        ("GET", "/resources", None),
        ("POST", "/resources", resource_body("https://elsewhere.example", "x")),
        ("GET", f"/resources/{resource}", None),
        ("PATCH", f"/resources/{resource}", {"endpoint": "https://evil.example", "api_key": "k"}),
        ("DELETE", f"/resources/{resource}", None),
        ("GET", f"/events/{event}/resources", None),
        ("PUT", f"/events/{own_event or event}/resources/{resource}", None),
        ("DELETE", f"/events/{event}/resources/{resource}", None),
        ("GET", f"/events/{event}/attendees", None),
        ("POST", f"/events/{event}/attendees", {"user": "intruder"}),
        ("GET", f"/events/{event}/attendees/{attendee}", None),
        ("DELETE", f"/events/{event}/attendees/{attendee}", None),
        ("POST", f"/events/{event}/attendees/{attendee}/rotate", None),
        ("GET", f"/events/{event}/usage", None),
        ("GET", f"/events/{event}/alerts", None),
        ("POST", f"/events/{event}/alerts/secret", None),
        ("GET", f"/events/{event}/toolcalls", None),
    ]


def test_the_walk_covers_every_management_route() -> None:
    """every_route names each method of each manage/* route of the route table: a route
    added there is walked by the tests below, or this fails."""
    from shared.management.routes import ROUTES
    from shared.management.routing import MANAGER

    declared = {
        (method, route.path.removeprefix("manage"))
        for route in ROUTES
        if route.access == MANAGER
        for method in route.methods
    }
    world = {"event": {"id": "{event_id}"}, "resource": {"id": "{resource_id}"},
             "attendee": {"id": "{attendee_id}"}}  # fmt: skip
    walked = {(method, path.split("?")[0]) for method, path, _ in every_route(world)}
    assert walked == declared


def alice_untouched(host: AppHost, world: dict[str, Any], upstream: Simulator) -> None:
    """Alice's event, resource and attendee as she left them: her attendee's key still works,
    against her upstream."""
    event = host.manage.get(f"/events/{world['event']['id']}").json()
    assert event["name"] == "Alice's lab"
    resource = host.manage.get(f"/resources/{world['resource']['id']}").json()
    assert resource["endpoint"] == upstream.url and resource["has_api_key"] is True
    catalog = host.manage.get(f"/events/{world['event']['id']}/resources").json()
    assert [r["id"] for r in catalog] == [world["resource"]["id"]]
    sdk = openai.AzureOpenAI(azure_endpoint=host.base, api_key=world["attendee"]["api_key"],
                             api_version=API_VERSION, max_retries=0)  # fmt: skip
    answer = sdk.chat.completions.create(model="alice-gpt", **HELLO)
    assert answer.choices and answer.usage is not None


# --- organisers keep to their own ---------------------------------------------------------


def test_an_organiser_cannot_reach_another_organisers_things(
    host: AppHost, issuer: LocalIssuer, alice_world: dict[str, Any], upstreams: Any
) -> None:
    bob = token_of(issuer, host, oid=str(uuid.uuid4()), roles=[ORGANISER_ROLE])
    bobs_event = bob.ok("POST", "/events", event_body("Bob's class"), 201)
    walked = 0
    for method, path, body in every_route(alice_world, own_event=bobs_event["id"]):
        if path in ("/events", "/resources"):
            continue  # Bob's own lists and creations: below
        refusal(bob.call(method, path, body), 404, "not_found")
        walked += 1
    assert walked == 18
    assert [e["id"] for e in bob.ok("GET", "/events")] == [bobs_event["id"]]
    assert bob.ok("GET", "/resources") == []
    alice_untouched(host, alice_world, upstreams[0])


def test_without_its_token_an_organiser_reaches_nothing(
    host: AppHost, alice_world: dict[str, Any], upstreams: Any
) -> None:
    routes = every_route(alice_world)
    for headers in ({}, {"x-functions-key": FUNCTION_KEY}):
        for method, path, body in routes:
            error = refusal(Signed(host, headers).call(method, path, body), 401, "unauthorized")
            assert "x-aiproxy-operator-key" in error["message"]
            assert "Bearer" in error["message"] and AUDIENCE in error["message"]
    # The function key as the ?code= parameter neither.
    refusal(Signed(host, {}).call("GET", f"/events?code={FUNCTION_KEY}"), 401, "unauthorized")
    # A wrong operator key: 401, counted by the failed-key guard of its address, which slows
    # it down after 20 (429) without refusing anyone else.
    guessing = Signed(host, {"x-aiproxy-operator-key": "guess"}, address="127.0.0.31")
    # (20 routes: the guard allows 20 wrong keys a minute from one address.)
    codes = [guessing.call(method, path, body).status_code for method, path, body in routes[:20]]
    assert codes == [401] * 20
    codes += [guessing.call("GET", "/events").status_code for _ in range(30)]
    assert codes[:20] == [401] * 20 and 429 in codes[20:], codes
    # The right key from the same address, right after the flood, always passes.
    right = Signed(host, {"x-aiproxy-operator-key": OPERATOR_KEY}, address="127.0.0.31")
    assert [right.call("GET", "/events").status_code for _ in range(5)] == [200] * 5
    assert host.manage.get("/events").status_code == 200
    alice_untouched(host, alice_world, upstreams[0])


def test_the_operator_by_app_role_or_group_sees_everything(
    host: AppHost, issuer: LocalIssuer, alice_world: dict[str, Any]
) -> None:
    event_id, attendee = alice_world["event"]["id"], alice_world["attendee"]
    for claims in ({"roles": [OPERATOR_ROLE]}, {"groups": [OPERATOR_GROUP]}):
        operator = token_of(issuer, host, **claims)
        assert event_id in {e["id"] for e in operator.ok("GET", "/events")}
        assert alice_world["resource"]["id"] in {r["id"] for r in operator.ok("GET", "/resources")}
        seen = operator.ok("GET", f"/events/{event_id}/attendees/{attendee['id']}")
        assert seen["api_key"] == attendee["api_key"]
        assert operator.ok("POST", "/events", event_body("ops"), 201)["owner"] == ""
    # A valid token with neither an organiser's nor the operator's role or group: 403.
    error = refusal(
        token_of(issuer, host, roles=["Reader"]).call("GET", "/events"), 403, "forbidden"
    )
    assert ORGANISER_ROLE in error["message"] and ORGANISER_GROUP in error["message"]


# --- the app's managed identity is the operator's ------------------------------------------


def test_organisers_cannot_set_up_managed_identity_resources(
    host: AppHost, issuer: LocalIssuer, upstreams: tuple[Simulator, Simulator]
) -> None:
    carol = token_of(issuer, host, oid=str(uuid.uuid4()), groups=[ORGANISER_GROUP])
    body = resource_body(upstreams[0].url, "carol-mi", auth="managed_identity")
    del body["api_key"]
    error = refusal(carol.call("POST", "/resources", body), 403, "forbidden")
    assert error["param"] == "auth" and "operator" in error["message"]
    assert carol.ok("GET", "/resources") == []
    own = carol.ok("POST", "/resources", resource_body(upstreams[0].url, "carol-key"), 201)
    switched = carol.call("PATCH", f"/resources/{own['id']}", {"auth": "managed_identity"})
    assert refusal(switched, 403, "forbidden")["param"] == "auth"
    kept = carol.ok("GET", f"/resources/{own['id']}")
    assert (kept["auth"], kept["has_api_key"]) == ("key", True)
    # The operator may.
    assert host.manage.post("/resources", json=body).status_code == 201


def test_an_organisers_managed_identity_resource_is_never_sent_a_token(
    app: tuple[App, StandIns, str],
    azurite: Azurite,
    issuer: LocalIssuer,
    upstreams: tuple[Simulator, Simulator],
) -> None:
    host, standins, prefix = app
    upstream = upstreams[1]
    dave_id = str(uuid.uuid4())
    dave = token_of(issuer, host, oid=dave_id, groups=[ORGANISER_GROUP])
    event = dave.ok("POST", "/events", event_body("Dave's lab"), 201)
    # As an organiser could have stored it before managed identity became the operator's.
    resource_id = secrets.token_hex(8)
    legacy = {"PartitionKey": "resource", "RowKey": resource_id, "name": "legacy",
              "deployment": "dave-mi", "model_class": "openai-chat", "endpoint": upstream.url,
              "upstream_deployment": "dave-mi", "auth": "managed_identity", "priority": 1,
              "weight": 1, "region": "", "active": True, "quota_requests_per_minute": 0,
              "quota_tokens_per_minute": 0, "owner": f"aad:{dave_id}", "created_at": "",
              "has_api_key": False}  # fmt: skip
    tables = TableServiceClient.from_connection_string(azurite.connection_string)
    tables.get_table_client(f"{prefix}resources").upsert_entity(legacy)
    dave.ok("PUT", f"/events/{event['id']}/resources/{resource_id}")
    key = dave.ok("POST", f"/events/{event['id']}/attendees", {"user": "d@x.org"}, 201)["api_key"]
    seen_before = upstream.stats()["total_requests"]
    answer = host.http.post(CHAT.format("dave-mi"), json=HELLO, headers={"api-key": key})
    error = refusal(answer, 502, "upstream_error")
    assert "identity" in error["message"] and "organiser" in error["message"]
    assert upstream.stats()["total_requests"] == seen_before  # nothing was sent at all
    assert standins.credential_scopes() == []  # and no token was even asked for
    assert f"resource {resource_id} of owner aad:{dave_id} uses the app's managed identity" in (
        host.log()
    )


# --- a stored key never follows a new endpoint ---------------------------------------------


def test_a_new_endpoint_takes_its_key_in_the_same_body(
    host: AppHost, issuer: LocalIssuer, upstreams: tuple[Simulator, Simulator]
) -> None:
    first, second = upstreams
    erin = token_of(issuer, host, oid=str(uuid.uuid4()), groups=[ORGANISER_GROUP])
    event = erin.ok("POST", "/events", event_body("Erin's lab"), 201)
    # Stored with a key the upstreams do not take: a call that works later used the new one.
    made = erin.ok(
        "POST", "/resources", resource_body(first.url, "erin-gpt", api_key="old-key"), 201
    )
    erin.ok("PUT", f"/events/{event['id']}/resources/{made['id']}")
    key = erin.ok("POST", f"/events/{event['id']}/attendees", {"user": "e@x.org"}, 201)["api_key"]
    path = f"/resources/{made['id']}"
    error = refusal(erin.call("PATCH", path, {"endpoint": second.url}), 400, "invalid_request")
    assert error["param"] == "api_key"
    assert [d["field"] for d in error["details"]] == ["api_key"]
    assert "never sent to a new endpoint" in error["details"][0]["fix"]
    assert erin.ok("GET", path)["endpoint"] == first.url
    # A change that leaves endpoint and auth alone needs no key.
    assert erin.ok("PATCH", path, {"weight": 2, "endpoint": first.url + "/"})["weight"] == 2
    moved = erin.ok("PATCH", path, {"endpoint": second.url, "api_key": SIM_KEY})
    assert moved["endpoint"] == second.url
    before = first.stats()["total_requests"]
    answer = host.http.post(CHAT.format("erin-gpt"), json=HELLO, headers={"api-key": key})
    assert answer.status_code == 200, answer.text
    assert second.stats()["last_requests"][-1]["headers"]["api-key"]["valid"] is True
    assert first.stats()["total_requests"] == before
    # Switched to the app's identity (the operator may), its key is gone; back to 'key', the
    # switch takes a key in the same body too.
    switched = host.manage.patch(path, json={"auth": "managed_identity"})
    assert switched.status_code == 200 and switched.json()["has_api_key"] is False
    error = refusal(host.manage.patch(path, json={"auth": "key"}), 400, "invalid_request")
    assert [d["field"] for d in error["details"]] == ["api_key"]
    assert host.manage.get(path).json()["auth"] == "managed_identity"


INSIDE = [
    "https://169.254.169.254/metadata/identity/oauth2/token",  # the platform's metadata service
    "http://10.0.0.4:8080",
    "https://[::ffff:a9fe:a9fe]",  # the metadata service as an IPv4-mapped IPv6 address
    "https://0x7f000001",  # loopback, spelled in hex
    "https://sql-server.internal",  # a name only a private network answers for
    "https://contoso.openai.azure.com.evil.example",
    "https://evil.example\\@contoso.openai.azure.com",
]


def test_an_organisers_endpoint_cannot_aim_inside_on_create_or_change(
    host: AppHost, issuer: LocalIssuer, upstreams: tuple[Simulator, Simulator]
) -> None:
    gus = token_of(issuer, host, oid=str(uuid.uuid4()), groups=[ORGANISER_GROUP])
    for endpoint in INSIDE:
        error = refusal(gus.call("POST", "/resources", resource_body(endpoint, "g")), 400,
                        "invalid_request")  # fmt: skip
        assert [d["field"] for d in error["details"]] == ["endpoint"], (endpoint, error)
    assert gus.ok("GET", "/resources") == []
    made = gus.ok("POST", "/resources", resource_body(upstreams[0].url, "gus-gpt"), 201)
    path = f"/resources/{made['id']}"
    for endpoint in INSIDE:
        error = refusal(gus.call("PATCH", path, {"endpoint": endpoint, "api_key": "k"}), 400,
                        "invalid_request")  # fmt: skip
        assert [d["field"] for d in error["details"]] == ["endpoint"], (endpoint, error)
    kept = gus.ok("GET", path)
    assert (kept["endpoint"], kept["has_api_key"]) == (upstreams[0].url, True)


# --- Entra tenants on events ---------------------------------------------------------------


def test_organisers_add_only_their_own_tenant_the_operator_any(
    host: AppHost, issuer: LocalIssuer
) -> None:
    fay = token_of(issuer, host, oid=str(uuid.uuid4()), groups=[ORGANISER_GROUP])
    body = event_body("Fay's lab")
    error = refusal(
        fay.call("POST", "/events", {**body, "entra_tenants": [PARTNERS]}), 403, "forbidden"
    )
    assert error["param"] == "entra_tenants" and PARTNERS in error["message"]
    event = fay.ok("POST", "/events", {**body, "entra_tenants": [ORGANISERS]}, 201)
    path = f"/events/{event['id']}"
    added = fay.call("PATCH", path, {"entra_tenants": [ORGANISERS, PARTNERS]})
    assert refusal(added, 403, "forbidden")["param"] == "entra_tenants"
    # The operator may let any tenant in; Fay may then change other fields, and keep it.
    operator = host.manage.patch(path, json={"entra_tenants": [ORGANISERS, PARTNERS]})
    assert operator.status_code == 200, operator.text
    assert fay.ok("PATCH", path, {"name": "Fay's lab, day 2"})["entra_tenants"] == [
        ORGANISERS,
        PARTNERS,
    ]
    assert fay.ok("PATCH", path, {"entra_tenants": [PARTNERS]})["entra_tenants"] == [PARTNERS]
    third = str(uuid.uuid4())
    refusal(fay.call("PATCH", path, {"entra_tenants": [PARTNERS, third]}), 403, "forbidden")
    created = host.manage.post("/events", json={**body, "entra_tenants": [third]})
    assert created.status_code == 201 and created.json()["entra_tenants"] == [third]
