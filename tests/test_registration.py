"""Attendees register themselves: signed in, or with email and the event's shared code."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.harness import (
    CHAT,
    HELLO,
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    host_answer,
    window,
)


def easyauth(provider: str, user_id: str, name: str = "") -> dict[str, str]:
    """The headers App Service sets for a signed-in user."""
    claims = [
        {"typ": "http://schemas.microsoft.com/identity/claims/objectidentifier", "val": user_id}
    ]
    if name:
        claims.append({"typ": "preferred_username", "val": name})
    principal = {"auth_typ": provider, "claims": claims, "name_typ": "preferred_username"}
    headers = {
        "x-ms-client-principal": base64.b64encode(json.dumps(principal).encode()).decode(),
        "x-ms-client-principal-id": user_id,
        "x-ms-client-principal-idp": provider,
    }
    if name:
        headers["x-ms-client-principal-name"] = name
    return headers


@pytest.fixture(scope="module")
def trusted(app_hosts: Callable[..., AppHost]) -> AppHost:
    """An instance behind EasyAuth: it trusts the principal headers."""
    return app_hosts("devhost-trusted", AIPROXY_TRUST_EASYAUTH="true")


def with_code(host: AppHost, sim: Simulator, code: str = "SPRING-26", **fields: Any) -> EventSetup:
    return EventSetup(host, sim, shared_code=code, **fields)


def register(host: AppHost, event_id: str, body: Any = None, **kw: Any) -> httpx.Response:
    return host.http.post(f"/events/{event_id}/register", json=body, **kw)


def refused(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["status"] == status
    assert response.headers["x-aiproxy-request-id"]
    return error["message"]


def test_email_and_shared_code_give_a_working_key_once(
    host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = with_code(host, sim)
    first = register(host, setup.id, {"email": " Grace@Example.ORG ", "shared_code": "SPRING-26"})
    assert first.status_code == 201, first.text
    answer = first.json()
    assert answer["api_key"].startswith("aip-") and len(answer["api_key"]) == 36
    assert answer["endpoint"] == host.base
    assert answer["user"] == "grace@example.org"
    public = host.http.get(f"/events/{setup.id}").json()
    assert public.pop("registration") == {"open": True, "shared_code": True, "sign_in": False}
    assert answer["event"] == public and public["self_registration"] == "auto"
    assert "shared_code" not in answer["event"] and "owner" not in answer["event"]
    # Once: whoever else knows the code and the address gets no key, but how to get one.
    again = register(host, setup.id, {"email": "grace@example.org", "shared_code": "SPRING-26"})
    message = refused(again, 409, "conflict")
    assert answer["api_key"] not in again.text and "aip-" not in again.text
    assert "rotate" in message and "grace@example.org" in message
    # The key works against the endpoint it came with, and the organiser sees the attendee.
    with httpx.Client(base_url=answer["endpoint"], timeout=30) as client:
        call = client.post(CHAT, json=HELLO, headers={"api-key": answer["api_key"]})
    assert call.status_code == 200, call.text
    listed = host.manage.get(f"/events/{setup.id}/attendees").json()
    assert answer["attendee_id"] in {a["id"] for a in listed}
    row = storage.rows("attendees", f"RowKey eq '{answer['attendee_id']}'")[0]
    assert answer["api_key"] not in json.dumps(row, default=str)  # only hash and sealed copy


def test_the_code_never_obtains_the_key_the_organiser_issued(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim)
    added = setup.add_attendee("Lin@Example.com")
    registered = register(host, setup.id, {"email": "lin@example.com", "shared_code": "SPRING-26"})
    message = refused(registered, 409, "conflict")
    assert added["api_key"] not in registered.text and "aip-" not in registered.text
    assert "ask the organiser to rotate it" in message
    # The issued key is still the only one, and still works.
    call = host.http.post(CHAT, json=HELLO, headers={"api-key": added["api_key"]})
    assert call.status_code == 200, call.text


def test_wrong_or_missing_shared_code_is_refused(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim)
    message = refused(
        register(host, setup.id, {"email": "a@example.com", "shared_code": "spring-26"}),
        403,
        "registration_refused",
    )
    assert "code" in message and "organiser" in message
    missing = register(host, setup.id, {"email": "a@example.com"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "shared_code"
    users = [a["user"] for a in host.manage.get(f"/events/{setup.id}/attendees").json()]
    assert users == ["attendee@example.com"]  # nobody was registered


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"email": "not-an-address", "shared_code": "SPRING-26"}, "email"),
        ({"email": "", "shared_code": "SPRING-26"}, "email"),
        ({"email": 7, "shared_code": "SPRING-26"}, "email"),
        ({"shared_code": "SPRING-26"}, "email"),
        ({"email": "a@example.com", "shared_code": 26}, "shared_code"),
        ({"email": "a@example.com", "shared_code": "SPRING-26", "code": "x"}, "code"),
    ],
)
def test_bad_registration_field_is_named(
    host: AppHost, sim: Simulator, body: dict[str, Any], param: str
) -> None:
    setup = with_code(host, sim)
    response = register(host, setup.id, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["param"] == param


def test_body_that_is_not_a_json_object_is_refused(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim)
    for content in (b"{oops", b"[1]"):
        response = host.http.post(f"/events/{setup.id}/register", content=content)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_request"


def test_event_without_shared_code_needs_a_signed_in_attendee(
    host: AppHost, sim: Simulator
) -> None:
    setup = EventSetup(host, sim)
    message = refused(
        register(host, setup.id, {"email": "a@example.com", "shared_code": "anything"}),
        403,
        "registration_refused",
    )
    assert "organiser" in message


def test_forged_principal_is_ignored_without_trust(host: AppHost, sim: Simulator) -> None:
    setup = EventSetup(host, sim)
    forged = register(
        host, setup.id, headers=easyauth("aad", "oid-mallory", "mallory@evil.example")
    )
    refused(forged, 403, "registration_refused")


@pytest.mark.e2e
def test_signed_in_attendee_registers_without_a_code(trusted: AppHost, sim: Simulator) -> None:
    setup = EventSetup(trusted, sim, self_registration="sign_in")
    headers = easyauth("github", "12345", "octocat")
    first = register(trusted, setup.id, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["user"] == "github:octocat"
    assert first.json()["endpoint"] == trusted.base
    again = register(trusted, setup.id, headers=headers)
    assert again.status_code == 200 and again.json()["api_key"] == first.json()["api_key"]
    call = trusted.http.post(CHAT, json=HELLO, headers={"api-key": first.json()["api_key"]})
    assert call.status_code == 200
    nameless = register(trusted, setup.id, headers=easyauth("aad", "oid-7"))
    assert nameless.status_code == 201 and nameless.json()["user"] == "aad:oid-7"
    users = {a["user"] for a in trusted.manage.get(f"/events/{setup.id}/attendees").json()}
    assert {"github:octocat", "aad:oid-7"} <= users


@pytest.mark.e2e
def test_a_signed_in_attendee_is_its_id_at_the_provider_never_its_name(
    trusted: AppHost, sim: Simulator
) -> None:
    setup = EventSetup(trusted, sim, self_registration="sign_in")
    first = register(trusted, setup.id, headers=easyauth("github", "4001", "hubot"))
    assert first.status_code == 201, first.text
    # The same person renamed: its own attendee and key still.
    renamed = register(trusted, setup.id, headers=easyauth("github", "4001", "hubot-renamed"))
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["api_key"] == first.json()["api_key"]
    assert renamed.json()["attendee_id"] == first.json()["attendee_id"]
    # Somebody else who took the freed name: a new attendee, never the first one's key.
    taker = register(trusted, setup.id, headers=easyauth("github", "4002", "hubot"))
    assert taker.status_code == 201, taker.text
    assert taker.json()["api_key"] != first.json()["api_key"]
    assert taker.json()["attendee_id"] != first.json()["attendee_id"]
    listing = trusted.manage.get(f"/events/{setup.id}/attendees").json()
    signed_in = sorted(a["user"] for a in listing if a["user"].startswith("github:"))
    assert signed_in == ["github:hubot", "github:hubot"]
    # The command line asks which one, rather than revoke the first of the two.
    from tests.test_cli import cli, failed

    both = (first.json()["attendee_id"], taker.json()["attendee_id"])
    revoke = ("attendees", "revoke", "--event", setup.id)
    asked = failed(cli(trusted, *revoke, "--user", "github:hubot"), 2)
    assert "--attendee" in asked and all(ident in asked for ident in both)
    assert cli(trusted, *revoke, "--attendee", both[1]).returncode == 0
    users = {
        a["id"]: a["active"] for a in trusted.manage.get(f"/events/{setup.id}/attendees").json()
    }
    assert users[both[0]] is True and users[both[1]] is False


@pytest.mark.e2e
def test_trusted_instance_without_principal_still_takes_the_code(
    trusted: AppHost, sim: Simulator
) -> None:
    setup = with_code(trusted, sim)
    response = register(trusted, setup.id, {"email": "b@example.com", "shared_code": "SPRING-26"})
    assert response.status_code == 201
    no_code_event = EventSetup(trusted, sim, self_registration="sign_in")
    message = refused(register(trusted, no_code_event.id, {}), 403, "registration_refused")
    assert "Sign in" in message


def test_inactive_event_refuses_registration(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim, active=False)
    body = {"email": "c@example.com", "shared_code": "SPRING-26"}
    refused(register(host, setup.id, body), 403, "event_inactive")
    assert host.manage.patch(f"/events/{setup.id}", json={"active": True}).status_code == 200
    assert register(host, setup.id, body).status_code == 201


def test_ended_event_refuses_registration(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim, **window(hours_before=48, hours_after=-1, zone="Asia/Tokyo"))
    body = {"email": "d@example.com", "shared_code": "SPRING-26"}
    message = refused(register(host, setup.id, body), 403, "event_ended")
    assert "Asia/Tokyo" in message


def test_registration_opens_before_the_event_starts(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim, **window(hours_before=-24, hours_after=48))
    body = {"email": "early@example.com", "shared_code": "SPRING-26"}
    response = register(host, setup.id, body)
    assert response.status_code == 201
    call = host.http.post(CHAT, json=HELLO, headers={"api-key": response.json()["api_key"]})
    assert call.status_code == 403 and call.json()["error"]["code"] == "event_not_started"


def test_revoked_attendee_cannot_register_again(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim)
    body = {"email": "e@example.com", "shared_code": "SPRING-26"}
    attendee_id = register(host, setup.id, body).json()["attendee_id"]
    assert host.manage.delete(f"/events/{setup.id}/attendees/{attendee_id}").status_code == 200
    message = refused(register(host, setup.id, body), 403, "registration_refused")
    assert "revoked" in message


def test_unknown_event_is_404(host: AppHost) -> None:
    for event_id in ("nosuchevent", "bad id!"):
        response = register(host, event_id, {"email": "a@example.com", "shared_code": "x"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_register_takes_only_post(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim)
    host_answer(host.http.get(f"/events/{setup.id}/register"), 404)  # the host's: no GET route


def test_guessing_the_code_is_paused_after_ten_tries(host: AppHost, sim: Simulator) -> None:
    setup = with_code(host, sim, code="correct-horse")
    for attempt in range(10):
        body = {"email": "guess@example.com", "shared_code": f"guess-{attempt}"}
        refused(register(host, setup.id, body), 403, "registration_refused")
    wrong = {"email": "guess@example.com", "shared_code": "guess-10"}
    paused = register(host, setup.id, wrong)
    refused(paused, 429, "too_many_failed_keys")
    assert 1 <= int(paused.headers["retry-after"]) <= 60
    # Only wrong codes are refused: the right one still passes, from the same address.
    body = {"email": "guess@example.com", "shared_code": "correct-horse"}
    assert register(host, setup.id, body).status_code == 201
    other = with_code(host, sim, code="correct-horse")  # counted per event
    refused(
        register(host, other.id, {**wrong, "shared_code": "guess-0"}), 403, "registration_refused"
    )


def test_every_bad_registration_field_is_listed_and_no_code_is_tried(
    host: AppHost, sim: Simulator
) -> None:
    setup = with_code(host, sim, code="only-one")
    for _ in range(12):  # more than the ten wrong codes that pause an address
        response = register(host, setup.id, {"email": "nope", "shared_code": 5, "role": "x"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert [d["field"] for d in error["details"]] == ["email", "shared_code", "role"]
        assert error["param"] == "email" and "2 more fields" in error["message"]
    body = {"email": "Kai@Example.com", "shared_code": " only-one "}
    assert register(host, setup.id, body).json()["user"] == "kai@example.com"
