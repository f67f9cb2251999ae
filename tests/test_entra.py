"""Entra ID access tokens instead of event keys, verified by the app against a local issuer:
the official SDK's azure_ad_token_provider works, each bad token is refused with its reason,
rotated keys are fetched once, and organisers manage their own events by token."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import orjson
import pytest

from local.azurite import Azurite
from shared.access.entra import CLOCK_SKEW_SECONDS, EntraVerifier
from shared.errors import ProxyError
from shared.platform.settings import Settings
from tests.entra_issuer import LocalIssuer, new_rsa_key
from tests.harness import (
    API_VERSION,
    CHAT,
    FUNCTION_KEY,
    App,
    EventSetup,
    Simulator,
    Storage,
    unique_prefix,
    window,
)
from tests.inprocess import Configured

HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
REFETCH_SECONDS = 1.0

pytestmark = pytest.mark.e2e  # tokens verified by the worker, callers on the official SDK
ORGANISERS = str(uuid.uuid4())  # the organisers' tenant
ORGANISER_AUDIENCE = "api://aiproxy-console"
ORGANISER_GROUP = str(uuid.uuid4())
ORGANISER_ROLE = "Event.Organizer"


def tenant() -> str:
    """A tenant of its own for each test: key fetches and event choices do not mix."""
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
def upstream(log_dir: Path) -> Iterator[Simulator]:
    server = Simulator(log_dir, name="entra")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def setup(configured: Configured, issuer: LocalIssuer) -> tuple[App, str]:
    """An app whose Entra authority is the local issuer, with organisers by token."""
    prefix = unique_prefix("entra")
    server = configured(
        "entra",
        prefix=prefix,
        AIPROXY_ENTRA_AUTHORITY=issuer.authority,
        AIPROXY_ENTRA_KEY_REFETCH_SECONDS=str(REFETCH_SECONDS),
        AIPROXY_ENTRA_ORGANIZER_TENANTS=ORGANISERS,
        AIPROXY_ENTRA_ORGANIZER_AUDIENCE=ORGANISER_AUDIENCE,
        AIPROXY_ENTRA_ORGANIZER_GROUPS=ORGANISER_GROUP,
        AIPROXY_ENTRA_ORGANIZER_ROLES=ORGANISER_ROLE,
        AIPROXY_TRUST_EASYAUTH="true",  # behind App Service sign-in, for the registration page
    )
    return server, prefix


@pytest.fixture(scope="module")
def host(setup: tuple[App, str]) -> App:
    return setup[0]


@pytest.fixture(scope="module")
def storage(azurite: Azurite, setup: tuple[App, str]) -> Storage:
    return Storage(azurite.connection_string, setup[1])


def from_address(host: App, address: str) -> httpx.Client:
    """A client calling from its own loopback address: the failed-key guard counts per address."""
    return httpx.Client(
        base_url=host.base, timeout=30, transport=httpx.HTTPTransport(local_address=address)
    )


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **headers}


def refused_token(response: httpx.Response, reason: str) -> str:
    """A 401 invalid_token in the contract's shape, with the RFC 6750 challenge."""
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_token", error
    assert reason in error["message"], error["message"]
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="'), challenge
    return error["message"]


def attendee_of(host: App, event_id: str, user: str) -> dict[str, Any]:
    listing = host.manage.get(f"/events/{event_id}/attendees")
    assert listing.status_code == 200, listing.text
    found = [a for a in listing.json() if a["user"] == user]
    assert len(found) == 1, listing.json()
    return found[0]


# --- the SDK as the client ---------------------------------------------------------------------


def test_sdk_token_provider_calls_as_the_tokens_attendee_and_is_metered(
    host: App, upstream: Simulator, issuer: LocalIssuer, storage: Storage
) -> None:
    contoso, oid = tenant(), str(uuid.uuid4())
    event = EventSetup(host, upstream, entra_tenants=[contoso])
    client = openai.AzureOpenAI(
        azure_endpoint=host.base,
        azure_ad_token_provider=lambda: issuer.token(contoso, oid=oid, name="ada@contoso.com"),
        api_version=API_VERSION,
        max_retries=0,
    )
    reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=4, **_messages())
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=4, stream=True, **_messages()
        )
    )
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4
    assert {m.id for m in client.models.list()} == {
        "gpt-35-turbo-instruct",
        "gpt-4o-mini",
        "text-embedding-3-small",
    }
    # The attendee was created from the token's object id, named from its claims.
    attendee = attendee_of(host, event.id, "aad:ada@contoso.com")
    assert attendee["requests"] == 2 and attendee["total_tokens"] > 8
    records = storage.usage(event.id, expect=2)
    assert [r["attendee_id"] for r in records] == [attendee["id"]] * 2
    info = host.http.get("/eventinfo", headers=bearer(issuer.token(contoso, oid=oid)))
    assert info.json()["attendee"] == {"id": attendee["id"], "user": "aad:ada@contoso.com"}
    assert info.json()["today"]["requests_used"] == 2


async def test_async_sdk_token_provider_works_too(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso, oid = tenant(), str(uuid.uuid4())
    event = EventSetup(host, upstream, entra_tenants=[contoso])

    async def provide() -> str:
        return issuer.token(contoso, oid=oid, name="grace@contoso.com")

    async with openai.AsyncAzureOpenAI(
        azure_endpoint=host.base,
        azure_ad_token_provider=provide,
        api_version=API_VERSION,
        max_retries=0,
    ) as client:
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=3, **_messages()
        )
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=3, stream=True, **_messages()
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == reply.choices[0].message.content
    assert attendee_of(host, event.id, "aad:grace@contoso.com")["requests"] == 2


def test_a_page_sign_in_and_a_token_of_one_person_are_one_attendee(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso, oid = tenant(), str(uuid.uuid4())
    event = EventSetup(host, upstream, entra_tenants=[contoso], self_registration="sign_in")
    # App Service's headers for the same user signed in on the registration page.
    principal = {"auth_typ": "aad", "claims": [{"typ": "oid", "val": oid}]}
    signed_in = {
        "x-ms-client-principal": base64.b64encode(orjson.dumps(principal)).decode(),
        "x-ms-client-principal-id": oid,
        "x-ms-client-principal-idp": "aad",
        "x-ms-client-principal-name": "ada@contoso.com",
    }
    registered = host.http.post(f"/events/{event.id}/register", headers=signed_in)
    assert registered.status_code == 201, registered.text
    key = registered.json()["api_key"]
    assert host.http.post(CHAT, json=HELLO, headers={"api-key": key}).status_code == 200
    token = issuer.token(contoso, oid=oid, name="ada@contoso.com")
    assert host.http.post(CHAT, json=HELLO, headers=bearer(token)).status_code == 200
    info = host.http.get("/eventinfo", headers=bearer(token)).json()
    assert info["attendee"]["id"] == registered.json()["attendee_id"]
    assert info["today"]["requests_used"] == 2  # one quota, whichever way the person calls
    attendee = attendee_of(host, event.id, "aad:ada@contoso.com")  # exactly one
    assert attendee["requests"] == 2


def test_upstream_gets_the_proxys_credentials_never_the_callers_token(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso = tenant()
    EventSetup(host, upstream, entra_tenants=[contoso])
    token = issuer.token(contoso)
    upstream.reset()
    answer = host.http.post(CHAT, json=HELLO, headers=bearer(token))
    assert answer.status_code == 200, answer.text
    (seen,) = upstream.stats()["last_requests"]
    assert seen["headers"]["api-key"] == {"present": True, "valid": True}
    assert seen["headers"]["authorization"]["present"] is False
    signature = token.rsplit(".", 1)[1]
    assert not [v for v in seen["headers"].values() if isinstance(v, str) and signature in v]


def test_caps_and_revocation_hold_for_token_attendees(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso, oid = tenant(), str(uuid.uuid4())
    event = EventSetup(host, upstream, entra_tenants=[contoso], daily_request_cap=2)
    headers = bearer(issuer.token(contoso, oid=oid, name="cap@contoso.com"))
    assert [host.http.post(CHAT, json=HELLO, headers=headers).status_code for _ in range(2)] == [
        200,
        200,
    ]
    capped = host.http.post(CHAT, json=HELLO, headers=headers)
    assert capped.status_code == 429 and capped.json()["error"]["code"] == (
        "daily_request_cap_exceeded"
    )
    attendee = attendee_of(host, event.id, "aad:cap@contoso.com")
    assert host.manage.delete(f"/events/{event.id}/attendees/{attendee['id']}").status_code == 200
    revoked = host.http.post(CHAT, json=HELLO, headers=headers)
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "key_revoked"
    # The same person with a new token is still that revoked attendee.
    again = host.http.post(CHAT, json=HELLO, headers=bearer(issuer.token(contoso, oid=oid)))
    assert again.json()["error"]["code"] == "key_revoked"


# --- refusals ---------------------------------------------------------------------------------

BAD_TOKENS: dict[str, tuple[dict[str, Any], str]] = {
    "expired": ({"lifetime": -(CLOCK_SKEW_SECONDS + 60)}, "The token expired at"),
    "not yet valid": ({"not_before": time.time() + 3600}, "is not valid before"),
    "wrong audience": ({"audience": "https://management.azure.com"}, "is for 'https://man"),
    "wrong issuer": ({"issuer": "https://sts.windows.net/other/"}, "The token's issuer"),
    "bad signature": ({"key": new_rsa_key()}, "signature does not match"),
    "unknown key id": ({"kid": "made-up", "key": new_rsa_key()}, "does not publish"),
}


def test_each_bad_token_is_refused_with_its_reason(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso = tenant()
    EventSetup(host, upstream, entra_tenants=[contoso])
    caller = from_address(host, "127.0.0.31")
    for case, (claims, reason) in BAD_TOKENS.items():
        answer = caller.post(CHAT, json=HELLO, headers=bearer(issuer.token(contoso, **claims)))
        assert refused_token(answer, reason), case
    stranger = caller.post(CHAT, json=HELLO, headers=bearer(issuer.token(tenant())))
    refused_token(stranger, "No event takes tokens of tenant")
    refused_token(caller.post(CHAT, json=HELLO, headers=bearer("abcd.efgh.ijkl")), "well-formed")
    shared_secret = jwt.encode({"tid": contoso, "oid": "x"}, "s" * 32, algorithm="HS256")
    refused_token(caller.post(CHAT, json=HELLO, headers=bearer(shared_secret)), "RS256")
    # The SDK raises the refusal with its sentence.
    client = openai.AzureOpenAI(
        azure_endpoint=host.base,
        azure_ad_token_provider=lambda: issuer.token(contoso, lifetime=-3600),
        api_version=API_VERSION,
        max_retries=0,
    )
    with pytest.raises(openai.AuthenticationError, match="The token expired at"):
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=3, **_messages())
    # And a good token still passes.
    assert caller.post(CHAT, json=HELLO, headers=bearer(issuer.token(contoso))).status_code == 200


def test_only_allowed_users_apps_and_groups_of_the_tenant_get_in(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso, person, group = tenant(), str(uuid.uuid4()), str(uuid.uuid4())
    EventSetup(host, upstream, entra_tenants=[contoso], entra_allowed=[person, group.upper()])
    caller = from_address(host, "127.0.0.32")
    by_id = issuer.token(contoso, oid=person.upper())
    by_group = issuer.token(contoso, groups=[str(uuid.uuid4()), group])
    app = issuer.token(contoso, name="", app_displayname="nightly job")
    assert caller.post(CHAT, json=HELLO, headers=bearer(by_id)).status_code == 200
    assert caller.post(CHAT, json=HELLO, headers=bearer(by_group)).status_code == 200
    message = refused_token(
        caller.post(CHAT, json=HELLO, headers=bearer(app)), "is not among the users"
    )
    assert "entra_allowed" in message


def test_made_up_key_ids_fetch_the_keys_at_most_once_per_interval(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso = tenant()
    EventSetup(host, upstream, entra_tenants=[contoso])
    caller = from_address(host, "127.0.0.33")
    assert caller.post(CHAT, json=HELLO, headers=bearer(issuer.token(contoso))).status_code == 200
    assert issuer.key_fetches(contoso) == 1
    started, tries, forger = time.monotonic(), 10, new_rsa_key()
    for n in range(tries):
        made_up = issuer.token(contoso, kid=f"made-up-{n}", key=forger)
        refused_token(caller.post(CHAT, json=HELLO, headers=bearer(made_up)), "does not publish")
    elapsed = time.monotonic() - started
    refetched = issuer.key_fetches(contoso) - 1
    assert refetched <= 1 + elapsed / REFETCH_SECONDS, (refetched, elapsed)
    assert refetched < tries


def test_a_rotated_key_is_fetched_once_and_accepted(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso = tenant()
    EventSetup(host, upstream, entra_tenants=[contoso])
    assert host.http.post(CHAT, json=HELLO, headers=bearer(issuer.token(contoso))).status_code == (
        200
    )
    assert issuer.key_fetches(contoso) == 1
    rotated = issuer.token(contoso, kid=issuer.publish_new_key())
    # Within the refetch interval of the first fetch the new key id is not looked up yet.
    deadline = time.monotonic() + 10 * REFETCH_SECONDS
    answer = host.http.post(CHAT, json=HELLO, headers=bearer(rotated))
    while answer.status_code == 401 and time.monotonic() < deadline:
        refused_token(answer, "does not publish")
        time.sleep(0.1)
        answer = host.http.post(CHAT, json=HELLO, headers=bearer(rotated))
    assert answer.status_code == 200, answer.text
    assert issuer.key_fetches(contoso) == 2
    # Both keys stay good, and nothing more is fetched.
    for token in (rotated, issuer.token(contoso)):
        assert host.http.post(CHAT, json=HELLO, headers=bearer(token)).status_code == 200
    assert issuer.key_fetches(contoso) == 2


def test_wrong_tokens_count_toward_the_failed_key_guard(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso = tenant()
    EventSetup(host, upstream, entra_tenants=[contoso])
    attacker = from_address(host, "127.0.0.34")
    codes, forger = [], new_rsa_key()
    for n in range(30):
        forged = issuer.token(contoso, oid=str(n), key=forger)
        codes.append(attacker.post(CHAT, json=HELLO, headers=bearer(forged)).json()["error"])
    assert [c["code"] for c in codes[:20]] == ["invalid_token"] * 20
    assert "too_many_failed_keys" in [c["code"] for c in codes[20:]]
    # A valid token from the same address always passes, never seen here before or not.
    for n in range(3):
        valid = bearer(issuer.token(contoso, oid=f"classmate-{n}"))
        assert attacker.post(CHAT, json=HELLO, headers=valid).status_code == 200
    # Anyone else is not affected.
    other = from_address(host, "127.0.0.35")
    assert other.post(CHAT, json=HELLO, headers=bearer(issuer.token(contoso))).status_code == 200


def test_random_event_ids_in_the_event_header_are_throttled_while_a_known_one_passes(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso = tenant()
    known = EventSetup(host, upstream, entra_tenants=[contoso])
    token = issuer.token(contoso, oid=str(uuid.uuid4()))
    flooding = from_address(host, "127.0.0.36")

    def named(event_id: str) -> httpx.Response:
        headers = bearer(token, **{"x-aiproxy-event": event_id})
        return flooding.post(CHAT, json=HELLO, headers=headers)

    first = [named(uuid.uuid4().hex[:12]) for _ in range(20)]
    assert {r.json()["error"]["code"] for r in first} == {"invalid_token"}
    with ThreadPoolExecutor(20) as pool:  # at once: past 20, two lookups a second
        burst = list(pool.map(named, [uuid.uuid4().hex[:12] for _ in range(20)]))
    throttled = [r for r in burst if r.status_code == 429]
    assert len(throttled) >= 10, [r.text for r in burst]
    assert {r.json()["error"]["code"] for r in throttled} == {"too_many_failed_keys"}
    assert "event ids" in throttled[0].json()["error"]["message"]
    # The known event, named from the same address, always answers.
    for _ in range(3):
        answer = named(known.id)
        assert answer.status_code == 200, answer.text


# --- which event -------------------------------------------------------------------------------


def test_a_tenant_in_several_running_events_names_its_event_in_a_header(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso, oid = tenant(), str(uuid.uuid4())
    first = EventSetup(host, upstream, name="Morning lab", entra_tenants=[contoso])
    second = EventSetup(host, upstream, name="Afternoon lab", entra_tenants=[contoso])
    token = issuer.token(contoso, oid=oid, name="lin@contoso.com")
    unsure = host.http.post(CHAT, json=HELLO, headers=bearer(token))
    assert unsure.status_code == 400, unsure.text
    error = unsure.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "x-aiproxy-event"
    assert first.id in error["message"] and second.id in error["message"]
    for event in (first, second):
        client = openai.AzureOpenAI(
            azure_endpoint=host.base,
            azure_ad_token_provider=lambda: token,
            api_version=API_VERSION,
            default_headers={"x-aiproxy-event": event.id},
            max_retries=0,
        )
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=2, **_messages())
        assert attendee_of(host, event.id, "aad:lin@contoso.com")["requests"] == 1
    elsewhere = EventSetup(host, upstream, name="Other tenant's lab")
    for named in (elsewhere.id, "no-such-event", "../bad id"):
        refused_token(
            host.http.post(CHAT, json=HELLO, headers=bearer(token, **{"x-aiproxy-event": named})),
            "does not exist or takes no tokens of tenant",
        )


def test_a_tenants_only_event_outside_its_window_says_when_it_runs(
    host: App, upstream: Simulator, issuer: LocalIssuer
) -> None:
    contoso = tenant()
    EventSetup(host, upstream, entra_tenants=[contoso], **window(-24, 48))
    early = host.http.post(CHAT, json=HELLO, headers=bearer(issuer.token(contoso)))
    assert early.status_code == 403 and early.json()["error"]["code"] == "event_not_started"


# --- organisers by token --------------------------------------------------------------------


def organiser(issuer: LocalIssuer, **claims: Any) -> dict[str, str]:
    token = issuer.token(ORGANISERS, audience=ORGANISER_AUDIENCE, **claims)
    return {"authorization": f"Bearer {token}"}


def new_event(host: App, headers: dict[str, str], name: str) -> httpx.Response:
    body = {"name": name, **window(), "max_token_cap": 64, "daily_request_cap": 10}
    return httpx.post(f"{host.base}/manage/events", json=body, headers=headers, timeout=30)


def test_organisers_by_token_own_what_they_create_and_see_only_that(
    host: App, issuer: LocalIssuer
) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    as_alice = organiser(issuer, oid=alice, groups=[ORGANISER_GROUP])
    as_bob = organiser(issuer, oid=bob, roles=[ORGANISER_ROLE])
    created = new_event(host, as_alice, "Alice's token event")
    assert created.status_code == 201, created.text
    assert created.json()["owner"] == f"aad:{alice}"
    bobs = new_event(host, as_bob, "Bob's token event").json()
    assert bobs["owner"] == f"aad:{bob}"
    listed = httpx.get(f"{host.base}/manage/events", headers=as_alice, timeout=30).json()
    assert [e["id"] for e in listed] == [created.json()["id"]]
    hidden = httpx.get(f"{host.base}/manage/events/{bobs['id']}", headers=as_alice, timeout=30)
    assert hidden.status_code == 404
    # The operator (the operator key, no token) sees both.
    everything = {e["id"] for e in host.manage.get("/events").json()}
    assert {created.json()["id"], bobs["id"]} <= everything


def test_organiser_tokens_are_refused_with_their_reason_never_taken_as_the_operator(
    host: App, issuer: LocalIssuer
) -> None:
    events = f"{host.base}/manage/events"
    cases = {
        "expired": (organiser(issuer, groups=[ORGANISER_GROUP], lifetime=-3600), "expired"),
        "an attendee's token": (
            bearer(issuer.token(ORGANISERS, groups=[ORGANISER_GROUP])),
            "not for api://aiproxy-console",
        ),
        "another tenant": (
            bearer(issuer.token(tenant(), audience=ORGANISER_AUDIENCE)),
            "not accepted for management",
        ),
        "forged": (organiser(issuer, groups=[ORGANISER_GROUP], key=new_rsa_key()), "signature"),
        # A function key beside a bad token changes nothing: the token is refused.
        "not a JWT": ({"x-functions-key": FUNCTION_KEY, **bearer("function-key")}, "well-formed"),
    }
    for case, (headers, reason) in cases.items():
        assert refused_token(httpx.get(events, headers=headers, timeout=30), reason), case
    outsider = httpx.get(events, headers=organiser(issuer, name="eve@contoso.com"), timeout=30)
    assert outsider.status_code == 403, outsider.text
    error = outsider.json()["error"]
    assert error["code"] == "forbidden"
    assert ORGANISER_GROUP in error["message"] and ORGANISER_ROLE in error["message"]
    # No function key is needed: the app itself looks at every token.
    refused_token(httpx.get(events, headers=bearer("abcd.efgh.ijkl"), timeout=30), "well-formed")


# --- the verifier itself -----------------------------------------------------------------------


async def test_made_up_key_ids_never_refetch_within_the_interval(issuer: LocalIssuer) -> None:
    contoso = tenant()
    verifier = EntraVerifier(
        Settings(entra_authority=issuer.authority, entra_key_refetch_seconds=300)
    )
    try:
        await verifier.verify(
            issuer.token(contoso), contoso, {"https://cognitiveservices.azure.com"}
        )
        forger = new_rsa_key()
        for n in range(20):
            with pytest.raises(ProxyError, match="does not publish"):
                made_up = issuer.token(contoso, kid=f"k{n}", key=forger)
                await verifier.verify(made_up, contoso, {"https://cognitiveservices.azure.com"})
        assert issuer.key_fetches(contoso) == 1
    finally:
        await verifier.close()


def _messages() -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Name three colours."}]}
