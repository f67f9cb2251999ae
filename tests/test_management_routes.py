"""Every management and attendee route answers over HTTP, with each refusal it can give."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.harness import (
    FUNCTION_KEY,
    OPERATOR,
    SIM_KEY,
    AppHost,
    EventSetup,
    Simulator,
    host_answer,
    window,
)
from tests.test_openapi import Route, registered

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
CAPS = {"max_token_cap": 64, "daily_request_cap": 10}


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The docs/api.md#errors error body, checked."""
    assert response.status_code == status, (response.request.url, response.text)
    error = response.json()["error"]
    assert error["code"] == code
    assert error["status"] == status
    assert len(error["message"]) > 10
    return error


def invalid_field(response: httpx.Response, field: str) -> None:
    error = error_of(response, 400, "invalid_request")
    assert error["param"] == field and field in error["message"]


def concrete(path: str, **ids: str) -> str:
    """A route template with its placeholders filled (unknown ids unless given)."""
    return re.sub(r"\{(\w+)\}", lambda m: ids.get(m.group(1), f"nosuch{m.group(1)}"), path)


def management_routes(host: AppHost) -> list[Route]:
    return [r for r in registered(host) if r.path.startswith("/manage/")]


# --- sweeps over every registered route -----------------------------------------------------


def test_every_management_route_is_the_apps_to_refuse_not_the_hosts(host: AppHost) -> None:
    # The host lets manage/* through (anonymous); the app answers 401 in the contract's shape,
    # to a function key too: it grants nothing here.
    routes = management_routes(host)
    assert {r.path for r in routes} >= {
        "/manage/events",
        "/manage/events/{event_id}",
        "/manage/resources",
        "/manage/resources/{resource_id}",
        "/manage/events/{event_id}/resources/{resource_id}",
        "/manage/events/{event_id}/attendees",
        "/manage/events/{event_id}/attendees/{attendee_id}",
        "/manage/events/{event_id}/attendees/{attendee_id}/rotate",
        "/manage/events/{event_id}/usage",
    }
    assert {r.auth_level for r in routes} == {"anonymous"}
    for route in routes:
        for method in route.methods:
            for headers in ({}, {"x-functions-key": FUNCTION_KEY}):
                response = host.http.request(method, concrete(route.path), headers=headers)
                error = error_of(response, 401, "unauthorized")
                assert "x-aiproxy-operator-key" in error["message"], error


def test_every_route_refuses_a_wrong_method(host: AppHost) -> None:
    # The host matches methods as route constraints: a wrong method matches no route (404).
    for route in registered(host):
        wrong = next(m for m in METHODS if m not in route.methods)
        response = host.http.request(wrong, concrete(route.path), headers=OPERATOR)
        host_answer(response, 404)


def test_every_management_route_with_an_id_is_404_for_unknown_ids(host: AppHost) -> None:
    checked = 0
    for route in management_routes(host):
        if "{" not in route.path:
            continue
        for method in route.methods:
            body = {"user": "someone"} if method in ("POST", "PATCH", "PUT") else None
            response = host.http.request(
                method,
                concrete(route.path),
                json=body,
                headers=OPERATOR,
            )
            assert "nosuch" in error_of(response, 404, "not_found")["message"], route.path
            checked += 1
    assert checked >= 14


def test_unknown_ids_inside_a_real_event_are_404(host: AppHost, event: EventSetup) -> None:
    attendee = f"/events/{event.id}/attendees/nosuchattendee"
    for method, path in (
        ("GET", attendee),
        ("DELETE", attendee),
        ("POST", attendee + "/rotate"),
        ("PUT", f"/events/{event.id}/resources/nosuchresource"),
        ("DELETE", f"/events/{event.id}/resources/nosuchresource"),
    ):
        error_of(host.manage.request(method, path), 404, "not_found")
    # An attendee of one event is not found through another event.
    other = host.manage.post("/events", json={"name": "other", **window()} | CAPS).json()
    error_of(
        host.manage.get(f"/events/{other['id']}/attendees/{event.attendee['id']}"), 404, "not_found"
    )


def test_unknown_event_is_404_on_the_anonymous_routes(host: AppHost) -> None:
    error_of(host.http.get("/events/nosuchevent"), 404, "not_found")
    error_of(host.http.post("/events/nosuchevent/register", json={}), 404, "not_found")


# --- events ---------------------------------------------------------------------------------


def test_event_create_read_update_delete(host: AppHost) -> None:
    created = host.manage.post(
        "/events", json={"name": "CRUD", **window(zone="Europe/Lisbon"), **CAPS}
    )
    assert created.status_code == 201
    event = created.json()
    assert event["time_zone"] == "Europe/Lisbon" and event["active"] is True
    assert host.manage.get(f"/events/{event['id']}").json() == event
    assert event["id"] in {e["id"] for e in host.manage.get("/events").json()}
    patched = host.manage.patch(
        f"/events/{event['id']}", json={"daily_request_cap": 99, "shared_code": "abcdefgh"}
    )
    assert patched.status_code == 200
    assert patched.json()["daily_request_cap"] == 99 and patched.json()["shared_code"] == "abcdefgh"
    assert patched.json()["max_token_cap"] == 64
    invalid_field(host.manage.patch(f"/events/{event['id']}", json={"colour": "red"}), "colour")
    invalid_field(host.manage.patch(f"/events/{event['id']}", json={"active": 1}), "active")
    deleted = host.manage.delete(f"/events/{event['id']}")  # no attendees: no force needed
    assert deleted.status_code == 204 and deleted.content == b""
    error_of(host.manage.get(f"/events/{event['id']}"), 404, "not_found")


def test_event_with_attendees_needs_force_and_force_removes_the_keys(
    host: AppHost, event: EventSetup
) -> None:
    assert host.http.post(CHAT, json=HELLO, headers={"api-key": event.key}).status_code == 200
    error = error_of(host.manage.delete(f"/events/{event.id}"), 409, "conflict")
    assert "1 attendees" in error["message"] and "force=true" in error["message"]
    assert host.manage.get(f"/events/{event.id}").status_code == 200
    assert host.manage.delete(f"/events/{event.id}", params={"force": "true"}).status_code == 204
    refused = host.http.post(CHAT, json=HELLO, headers={"api-key": event.key})
    error_of(refused, 401, "invalid_api_key")


def test_public_event_info_shows_no_secrets(host: AppHost, sim: Simulator) -> None:
    setup = EventSetup(
        host,
        sim,
        shared_code="s3cret-code",
        organizer_name="Ada",
        organizer_email="ada@example.com",
        description_markdown="# Welcome",
    )
    public = host.http.get(f"/events/{setup.id}")
    assert public.status_code == 200
    info = public.json()
    assert info["organizer_name"] == "Ada" and info["description_markdown"] == "# Welcome"
    assert info["starts_at"] == setup.event["starts_at"]
    assert "s3cret-code" not in public.text and "ada@example.com" not in public.text
    assert "owner" not in info and "shared_code" not in info


# --- resources and catalogs -----------------------------------------------------------------


def resource_body(sim: Simulator, **extra: Any) -> dict[str, Any]:
    return {
        "name": "r",
        "deployment": "gpt-4o-mini",
        "model_class": "openai-chat",
        "endpoint": sim.url,
        "api_key": SIM_KEY,
        **extra,
    }


def test_resource_create_read_update_delete(host: AppHost, sim: Simulator) -> None:
    created = host.manage.post("/resources", json=resource_body(sim, region="westeurope"))
    assert created.status_code == 201
    resource = created.json()
    assert resource["upstream_deployment"] == "gpt-4o-mini" and resource["region"] == "westeurope"
    assert host.manage.get(f"/resources/{resource['id']}").json() == resource
    listed = host.manage.get("/resources")
    assert resource["id"] in {r["id"] for r in listed.json()} and SIM_KEY not in listed.text
    patched = host.manage.patch(f"/resources/{resource['id']}", json={"weight": 3, "priority": 2})
    assert (patched.json()["weight"], patched.json()["priority"]) == (3, 2)
    invalid_field(host.manage.patch(f"/resources/{resource['id']}", json={"weight": 0}), "weight")
    assert host.manage.delete(f"/resources/{resource['id']}").status_code == 204
    error_of(host.manage.get(f"/resources/{resource['id']}"), 404, "not_found")


def test_resource_needs_a_key_unless_it_uses_the_managed_identity(
    host: AppHost, sim: Simulator
) -> None:
    body = resource_body(sim)
    del body["api_key"]
    invalid_field(host.manage.post("/resources", json=body), "api_key")
    invalid_field(host.manage.post("/resources", json={**body, "name": None}), "name")
    managed = host.manage.post("/resources", json={**body, "auth": "managed_identity"})
    assert managed.status_code == 201 and managed.json()["has_api_key"] is False


def test_patching_the_upstream_key_takes_effect_and_stays_write_only(
    host: AppHost, sim: Simulator
) -> None:
    setup = EventSetup(host, sim)
    wrong = setup.add_resource(sim.url, "keyed", "openai-chat", api_key="not-the-sim-key")
    path = "/openai/deployments/keyed/chat/completions?api-version=2024-10-21"
    before = host.http.post(path, json=HELLO, headers={"api-key": setup.key})
    assert before.status_code != 200
    patched = host.manage.patch(f"/resources/{wrong['id']}", json={"api_key": SIM_KEY})
    assert patched.status_code == 200
    assert "api_key" not in patched.json() and SIM_KEY not in patched.text
    after = host.http.post(path, json=HELLO, headers={"api-key": setup.key})
    assert after.status_code == 200, after.text


def test_switching_a_resource_off_takes_it_out_of_the_catalog(
    host: AppHost, event: EventSetup
) -> None:
    chat = next(i for i, r in event.resources.items() if r["model_class"] == "openai-chat")
    assert host.manage.patch(f"/resources/{chat}", json={"active": False}).status_code == 200
    response = host.http.post(CHAT, json=HELLO, headers={"api-key": event.key})
    error_of(response, 404, "deployment_not_found")
    assert host.manage.patch(f"/resources/{chat}", json={"active": True}).status_code == 200
    assert host.http.post(CHAT, json=HELLO, headers={"api-key": event.key}).status_code == 200


def test_attach_and_detach(host: AppHost, event: EventSetup, sim: Simulator) -> None:
    extra = host.manage.post("/resources", json=resource_body(sim, deployment="extra")).json()
    attached = host.manage.put(f"/events/{event.id}/resources/{extra['id']}")
    assert attached.status_code == 200
    assert attached.json() == {"event_id": event.id, "resource": extra}
    assert host.manage.put(f"/events/{event.id}/resources/{extra['id']}").status_code == 200
    catalog = host.manage.get(f"/events/{event.id}/resources").json()
    assert [r["id"] for r in catalog].count(extra["id"]) == 1
    assert len(catalog) == len(event.resources) + 1
    error = error_of(host.manage.delete(f"/resources/{extra['id']}"), 409, "conflict")
    assert event.id in error["message"]
    detached = host.manage.delete(f"/events/{event.id}/resources/{extra['id']}")
    assert detached.status_code == 204
    again = host.manage.delete(f"/events/{event.id}/resources/{extra['id']}")
    assert "not in this event's catalog" in error_of(again, 404, "not_found")["message"]
    assert host.manage.delete(f"/resources/{extra['id']}").status_code == 204


# --- attendees and usage --------------------------------------------------------------------


def test_attendee_add_show_list_revoke_rotate(host: AppHost, event: EventSetup) -> None:
    added = host.manage.post(f"/events/{event.id}/attendees", json={"user": "kim@example.com"})
    assert added.status_code == 201
    attendee = added.json()
    shown = host.manage.get(f"/events/{event.id}/attendees/{attendee['id']}")
    assert shown.json()["api_key"] == attendee["api_key"] and shown.json()["active"] is True
    invalid_field(host.manage.post(f"/events/{event.id}/attendees", json={"user": 3}), "user")
    invalid_field(
        host.manage.post(f"/events/{event.id}/attendees", json={"user": "x" * 201}), "user"
    )
    assert host.http.post(CHAT, json=HELLO, headers={"api-key": attendee["api_key"]}).is_success
    listed = {a["id"]: a for a in host.manage.get(f"/events/{event.id}/attendees").json()}
    assert set(listed) == {event.attendee["id"], attendee["id"]}
    assert "api_key" not in listed[attendee["id"]]
    rotated = host.manage.post(f"/events/{event.id}/attendees/{attendee['id']}/rotate")
    assert rotated.status_code == 200
    assert (
        rotated.json()["id"] == attendee["id"] and rotated.json()["api_key"] != attendee["api_key"]
    )
    revoked = host.manage.delete(f"/events/{event.id}/attendees/{attendee['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["active"] is False and revoked.json()["revoked_at"]
    response = host.http.post(CHAT, json=HELLO, headers={"api-key": rotated.json()["api_key"]})
    error_of(response, 401, "key_revoked")


def test_usage_report_answers_and_names_bad_query_fields(host: AppHost, event: EventSetup) -> None:
    assert host.http.post(CHAT, json=HELLO, headers={"api-key": event.key}).status_code == 200
    invalid_field(host.manage.get(f"/events/{event.id}/usage?group_by=colour"), "group_by")
    invalid_field(host.manage.get(f"/events/{event.id}/usage?format=xml"), "format")
    report = host.manage.get(f"/events/{event.id}/usage?group_by=attendee").json()
    assert report["event_id"] == event.id and report["group_by"] == "attendee"
    assert report["totals"]["requests"] == 1
    assert [(r["attendee_id"], r["requests"]) for r in report["rows"] if r["requests"]] == [
        (event.attendee["id"], 1)
    ]
    csv = host.manage.get(f"/events/{event.id}/usage?group_by=deployment&format=csv")
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0] == (
        "deployment,requests,prompt_tokens,completion_tokens,total_tokens,units,"
        "cached_tokens,reasoning_tokens,audio_tokens,cost_nano,unpriced,audio_output_tokens,cost"
    )


def test_health_answers_ok(host: AppHost) -> None:
    health = host.http.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["storage"] == "ok"
