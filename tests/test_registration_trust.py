"""An event's code is no key to other people's accounts: what a code registration or a key made
of the code can reach, how hard codes are to guess, and how the event's policy decides who may
register (issue 23)."""

from __future__ import annotations

import re
import select
import socket
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.harness import CHAT, HELLO, App, AppHost, EventSetup, Simulator, Storage
from tests.test_registration import easyauth, refused, register

CODE = "SPRING-2026"
WRONG_PER_MINUTE = 6
NEW_PER_HOUR = 3

pytestmark = pytest.mark.e2e  # registrations and code keys through the worker


@pytest.fixture(scope="module")
def pair(app_hosts: Callable[..., AppHost]) -> tuple[AppHost, AppHost]:
    """Two instances on the same storage, behind EasyAuth, with low registration limits."""
    limits = {
        "AIPROXY_TRUST_EASYAUTH": "true",
        "AIPROXY_WRONG_CODES_PER_EVENT_MINUTE": str(WRONG_PER_MINUTE),
        "AIPROXY_NEW_ATTENDEES_PER_ADDRESS_HOUR": str(NEW_PER_HOUR),
    }
    return app_hosts("devhost-limits-a", **limits), app_hosts("devhost-limits-b", **limits)


def from_address(host: AppHost, address: str) -> httpx.Client:
    """A client whose connections come from `address` (any of 127.0.0.0/8)."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=host.base, timeout=30, transport=transport)


def code_key(event: EventSetup, email: str, code: str = CODE) -> str:
    return f"{event.id}@{code}/{email}"


def chat(client: httpx.Client | App, key: str) -> httpx.Response:
    http = client if isinstance(client, httpx.Client) else client.http
    return http.post(CHAT, json=HELLO, headers={"api-key": key})


def v1(host: AppHost, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{host.base}/openai/v1", api_key=key, max_retries=0)


def attendees(event: EventSetup) -> dict[str, dict[str, Any]]:
    listed = event.host.manage.get(f"/events/{event.id}/attendees")
    assert listed.status_code == 200, listed.text
    return {a["user"]: a for a in listed.json()}


def test_a_code_key_for_an_issued_email_spends_a_quota_of_its_own(
    host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = EventSetup(host, sim, shared_code=CODE, daily_request_cap=2)
    issued = setup.add_attendee("lin@example.com")
    stranger = code_key(setup, "Lin@Example.com")
    assert [chat(host, stranger).status_code for _ in range(2)] == [200, 200]
    capped = chat(host, stranger)
    assert capped.status_code == 429, capped.text
    assert capped.json()["error"]["code"] == "daily_request_cap_exceeded"
    # The issued attendee's day is untouched: its own two requests still pass.
    assert [chat(host, issued["api_key"]).status_code for _ in range(2)] == [200, 200]
    rows = storage.usage(setup.id, expect=4)
    spent: dict[str, int] = {}
    for row in rows:
        spent[row["attendee_id"]] = spent.get(row["attendee_id"], 0) + 1
    found = attendees(setup)
    code_attendee = found["code:lin@example.com"]
    assert code_attendee["id"] != issued["id"]
    assert spent == {code_attendee["id"]: 2, issued["id"]: 2}
    assert (found["lin@example.com"]["requests"], code_attendee["requests"]) == (2, 2)


def test_a_code_key_does_not_reach_the_issued_attendees_responses(
    host: AppHost, sim: Simulator
) -> None:
    setup = EventSetup(host, sim, shared_code=CODE)
    owner = v1(host, setup.add_attendee("kim@example.com")["api_key"])
    created = owner.responses.create(model="gpt-4o-mini", input="Private.")
    thief = v1(host, code_key(setup, "kim@example.com"))
    for attempt in (
        lambda: thief.responses.retrieve(created.id),
        lambda: thief.responses.create(
            model="gpt-4o-mini", input="Peek", previous_response_id=created.id
        ),
    ):
        with pytest.raises(openai.NotFoundError) as refusal:
            attempt()
        assert refusal.value.code == "not_found"
    assert owner.responses.retrieve(created.id).id == created.id


def test_the_organiser_never_hands_out_a_key_a_code_registrant_has_seen(
    host: AppHost, sim: Simulator
) -> None:
    """Someone with the code registers Bob's address before the organiser issues Bob's key:
    the organiser's add gives Bob a key nobody else has seen, and the squatter's stops."""
    setup = EventSetup(host, sim, shared_code=CODE)
    squatted = register(host, setup.id, {"email": "bob@example.com", "shared_code": CODE})
    assert squatted.status_code == 201, squatted.text
    squatter_key = squatted.json()["api_key"]
    assert attendees(setup)["bob@example.com"]["self_registered"] is True
    assert chat(host, squatter_key).status_code == 200  # cached on this instance from now on
    issued = host.manage.post(f"/events/{setup.id}/attendees", json={"user": "Bob@example.com"})
    assert issued.status_code == 200, issued.text  # the same attendee ...
    bob = issued.json()
    assert bob["id"] == squatted.json()["attendee_id"] and bob["self_registered"] is False
    assert bob["api_key"] != squatter_key  # ... with a key only the organiser has seen
    stopped = chat(host, squatter_key)
    assert stopped.status_code == 401 and stopped.json()["error"]["code"] == "invalid_api_key"
    answer = v1(host, bob["api_key"]).chat.completions.create(model="gpt-4o-mini", **HELLO)
    assert answer.choices
    # Adding Bob again hands out the same, issued key; the code still gets no key of his.
    again = host.manage.post(f"/events/{setup.id}/attendees", json={"user": "bob@example.com"})
    assert again.status_code == 200 and again.json()["api_key"] == bob["api_key"]
    refused_again = register(host, setup.id, {"email": "bob@example.com", "shared_code": CODE})
    assert refused_again.status_code == 409 and "aip-" not in refused_again.text
    # A rotation too makes a registrant's key the organiser's.
    carol = register(host, setup.id, {"email": "carol@example.com", "shared_code": CODE}).json()
    rotated = host.manage.post(f"/events/{setup.id}/attendees/{carol['attendee_id']}/rotate")
    assert rotated.status_code == 200 and rotated.json()["self_registered"] is False


def test_names_that_look_like_a_signed_in_user_are_refused_everywhere(
    pair: tuple[AppHost, AppHost], sim: Simulator
) -> None:
    host, _ = pair
    setup = EventSetup(host, sim, shared_code=CODE, self_registration="both")
    alice = register(host, setup.id, headers=easyauth("aad", "oid-alice", "alice@contoso.com"))
    assert alice.status_code == 201 and alice.json()["user"] == "aad:alice@contoso.com"
    key = alice.json()["api_key"]
    # By code, with Alice's signed-in name as the email: refused, and her key never shown.
    body = {"email": "AAD:alice@contoso.com", "shared_code": CODE}
    posed = register(host, setup.id, body)
    assert posed.status_code == 400, posed.text
    assert posed.json()["error"]["param"] == "email" and key not in posed.text
    # A key made of the code with that name is no key at all.
    call = chat(host, code_key(setup, "aad:alice@contoso.com"))
    assert call.status_code == 401 and call.json()["error"]["code"] == "invalid_api_key"
    # Organisers cannot add such names either: not Alice's, nor a code key's.
    for user in ("aad:alice@contoso.com", "code:bob@example.com", "github:octocat"):
        added = host.manage.post(f"/events/{setup.id}/attendees", json={"user": user})
        assert added.status_code == 400, added.text
        error = added.json()["error"]
        assert error["param"] == "user" and key not in added.text
        assert "':'" in error["details"][0]["problem"]
    # Nor does a sign-in provider the operator happened to name 'code'.
    posing = register(host, setup.id, headers=easyauth("code", "oid-bob", "bob@example.com"))
    refused(posing, 403, "registration_refused")
    assert set(attendees(setup)) == {"attendee@example.com", "aad:alice@contoso.com"}


def test_shared_codes_are_long_enough_or_generated(
    host: AppHost, sim: Simulator, storage: Storage
) -> None:
    base = {"name": "Short code", "starts_at": "2026-01-01T09:00:00", "time_zone": "UTC"}
    body = {**base, "ends_at": "2036-01-01T09:00:00", "max_token_cap": 8}
    short = host.manage.post("/events", json={**body, "daily_request_cap": 5, "shared_code": "x7"})
    assert short.status_code == 400, short.text
    error = short.json()["error"]
    assert error["param"] == "shared_code" and "8 characters" in error["message"]
    assert "'generate'" in error["details"][0]["fix"]
    # "generate": the proxy makes one, and the organiser's answer shows it.
    setup = EventSetup(host, sim, shared_code="generate")
    made = setup.event["shared_code"]
    assert re.fullmatch(r"[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}", made), made
    first = register(host, setup.id, {"email": "gen@example.com", "shared_code": made})
    assert first.status_code == 201, first.text
    patched = host.manage.patch(f"/events/{setup.id}", json={"shared_code": "generate"})
    assert patched.status_code == 200, patched.text
    remade = patched.json()["shared_code"]
    assert remade != made and len(remade) == 14
    assert host.manage.get(f"/events/{setup.id}").json()["shared_code"] == remade
    # A policy that needs a code needs one.
    unset = host.manage.patch(
        f"/events/{setup.id}", json={"shared_code": "", "self_registration": "code"}
    )
    assert unset.status_code == 400 and unset.json()["error"]["param"] == "self_registration"
    # A short code stored before the minimum keeps working until the organiser changes it.
    older = EventSetup(host, sim)
    events = storage.service.get_table_client(storage.prefix + "events")
    row = events.get_entity("event", older.id)
    row["shared_code"] = "old1"
    events.update_entity(row)
    renamed = host.manage.patch(f"/events/{older.id}", json={"name": "Renamed"})
    assert renamed.status_code == 200 and renamed.json()["shared_code"] == "old1"
    joined = register(host, older.id, {"email": "old@example.com", "shared_code": "old1"})
    assert joined.status_code == 201, joined.text
    again = host.manage.patch(f"/events/{older.id}", json={"shared_code": "old2"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "shared_code"


def test_wrong_codes_add_up_over_instances_while_the_right_code_passes(
    pair: tuple[AppHost, AppHost], sim: Simulator
) -> None:
    first, second = pair
    setup = EventSetup(first, sim, shared_code=CODE)
    for attempt in range(WRONG_PER_MINUTE):  # each from its own address, over both instances
        host = (first, second)[attempt % 2]
        with from_address(host, f"127.0.0.{10 + attempt}") as client:
            body = {"email": "guess@example.com", "shared_code": f"guess-{attempt:04}"}
            refused(
                client.post(f"/events/{setup.id}/register", json=body), 403, "registration_refused"
            )
    for host, address in ((second, "127.0.0.30"), (first, "127.0.0.31")):
        with from_address(host, address) as client:
            body = {"email": "guess@example.com", "shared_code": "guess-again"}
            paused = client.post(f"/events/{setup.id}/register", json=body)
            message = refused(paused, 429, "too_many_failed_keys")
            assert 1 <= int(paused.headers["retry-after"]) <= 60 and "wrong codes" in message
            wrong_key = chat(client, code_key(setup, "guess@example.com", "guess-key"))
            assert wrong_key.status_code == 429
            assert wrong_key.json()["error"]["code"] == "too_many_failed_keys"
    # The right code passes on both instances, by registration and as a key.
    with from_address(first, "127.0.0.32") as client:
        body = {"email": "right@example.com", "shared_code": CODE}
        assert client.post(f"/events/{setup.id}/register", json=body).status_code == 201
    with from_address(second, "127.0.0.33") as client:
        assert chat(client, code_key(setup, "keyed@example.com")).status_code == 200


def test_new_attendees_by_code_are_limited_per_address_and_hour(
    pair: tuple[AppHost, AppHost], sim: Simulator
) -> None:
    first, second = pair
    setup = EventSetup(first, sim, shared_code=CODE)

    def join(client: httpx.Client, email: str) -> httpx.Response:
        body = {"email": email, "shared_code": CODE}
        return client.post(f"/events/{setup.id}/register", json=body)

    with from_address(first, "127.0.0.40") as here, from_address(second, "127.0.0.40") as there:
        assert join(here, "n1@example.com").status_code == 201
        assert join(there, "n2@example.com").status_code == 201
        assert chat(here, code_key(setup, "n3@example.com")).status_code == 200
        over = join(there, "n4@example.com")
        message = refused(over, 429, "rate_limit_exceeded")
        assert 1 <= int(over.headers["retry-after"]) <= 3600 and "organiser" in message
        keyed = chat(here, code_key(setup, "n5@example.com"))
        assert keyed.status_code == 429 and keyed.json()["error"]["code"] == "rate_limit_exceeded"
        # Who exists already is not new: the code key's attendee keeps working.
        assert chat(there, code_key(setup, "n3@example.com")).status_code == 200
    with from_address(second, "127.0.0.41") as elsewhere:
        assert join(elsewhere, "n4@example.com").status_code == 201
    users = set(attendees(setup))
    assert "n4@example.com" in users and "code:n5@example.com" not in users


def test_sign_in_registration_follows_the_events_policy(
    pair: tuple[AppHost, AppHost], sim: Simulator
) -> None:
    host, _ = pair
    stranger = easyauth("github", "4242", "stranger")
    # No code and no policy: nobody registers, signed in or not.
    plain = EventSetup(host, sim)
    message = refused(register(host, plain.id, headers=stranger), 403, "registration_refused")
    assert "organiser" in message
    info = host.http.get(f"/events/{plain.id}").json()
    assert info["self_registration"] == "auto"
    assert info["registration"] == {"open": True, "shared_code": False, "sign_in": False}
    # A code alone: the code, not the sign-in, is what is asked for.
    coded = EventSetup(host, sim, shared_code=CODE)
    asked = register(host, coded.id, headers=stranger)
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "email"
    # Sign-in only when the organiser asks for it.
    opened = EventSetup(host, sim, self_registration="sign_in")
    first = register(host, opened.id, headers=stranger)
    assert first.status_code == 201 and first.json()["user"] == "github:stranger"
    again = register(host, opened.id, headers=stranger)  # the principal proves who it is
    assert again.status_code == 200 and again.json()["api_key"] == first.json()["api_key"]
    info = host.http.get(f"/events/{opened.id}").json()["registration"]
    assert info == {"open": True, "shared_code": False, "sign_in": True}
    # 'none' with a code set: neither the code nor a key made of it works.
    closed = EventSetup(host, sim, shared_code=CODE, self_registration="none")
    body = {"email": "late@example.com", "shared_code": CODE}
    refused(register(host, closed.id, body), 403, "registration_refused")
    call = chat(host, code_key(closed, "late@example.com"))
    assert call.status_code == 401 and call.json()["error"]["code"] == "invalid_api_key"


def test_the_registration_body_is_limited_while_it_is_read(host: AppHost, sim: Simulator) -> None:
    setup = EventSetup(host, sim, shared_code=CODE)
    padded = {"email": "pad@example.com", "shared_code": CODE, "note": "x" * 20_000}
    refused(register(host, setup.id, padded), 413, "payload_too_large")
    # An endless chunked body (no content-length: only reading finds the size) is answered
    # while it is still being sent: the proxy stopped reading at the limit.
    url = httpx.URL(host.base)
    with socket.create_connection((url.host, url.port), timeout=30) as conn:
        path = f"{url.path.rstrip('/')}/events/{setup.id}/register"
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"x" * 16_384
        sent, answer = 0, b""
        while sent < 64 * 1024 * 1024 and not answer:
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if select.select([conn], [], [], 0)[0]:
                answer = conn.recv(65_536)
        if not answer:
            answer = conn.recv(65_536)
        # The head and the body can arrive in separate segments: read to the body's length.
        head, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        while length and len(body) < int(length[1]):
            more = conn.recv(65_536)
            if not more:
                break
            body += more
        answer = head + b"\r\n\r\n" + body
    print(f"answered after {sent} bytes of an endless body")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"payload_too_large" in answer
    # Answered while sending; the buffers between here and the worker hold some megabytes.
    assert sent < 64 * 1024 * 1024
    assert "pad@example.com" not in attendees(setup)
