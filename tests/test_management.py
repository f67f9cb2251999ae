"""Organisers set up a whole event over the management API; bad input names the field."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.harness import SIM_KEY, AppHost, EventSetup, Simulator, Storage, window

EVENT = {
    "name": "Workshop",
    **window(),
    "max_token_cap": 256,
    "daily_request_cap": 100,
}


def invalid_field(response: httpx.Response, field: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["param"] == field
    assert field in error["message"]
    return error["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": 5}, "name"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"starts_at": "next tuesday"}, "starts_at"),
        ({"ends_at": "2020-01-01T00:00:00"}, "ends_at"),
        ({"max_token_cap": 0}, "max_token_cap"),
        ({"max_token_cap": "lots"}, "max_token_cap"),
        ({"daily_request_cap": -1}, "daily_request_cap"),
        ({"daily_token_cap": 1.5}, "daily_token_cap"),
        ({"active": "yes"}, "active"),
        ({"colour": "blue"}, "colour"),
        ({"image_url": "javascript:alert(1)"}, "image_url"),
    ],
)
def test_bad_event_field_is_named(host: AppHost, change: dict[str, Any], field: str) -> None:
    invalid_field(host.manage.post("/events", json={**EVENT, **change}), field)


def test_missing_event_field_is_named(host: AppHost) -> None:
    body = {k: v for k, v in EVENT.items() if k != "daily_request_cap"}
    assert "required" in invalid_field(host.manage.post("/events", json=body), "daily_request_cap")


def test_body_that_is_not_a_json_object_is_refused(host: AppHost) -> None:
    for content in (b"[1]", b"{oops"):
        response = host.manage.post("/events", content=content)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_request"


def test_event_round_trip_keeps_wall_clock_times_and_adds_utc(host: AppHost) -> None:
    body = {
        **EVENT,
        "starts_at": "2026-03-28T09:00:00",
        "ends_at": "2026-03-30T17:00:00",
        "time_zone": "Europe/Berlin",
    }
    created = host.manage.post("/events", json=body)
    assert created.status_code == 201
    event = host.manage.get(f"/events/{created.json()['id']}").json()
    assert event["starts_at"] == "2026-03-28T09:00:00"
    assert event["starts_at_utc"] == "2026-03-28T08:00:00Z"  # CET, +01:00
    assert event["ends_at_utc"] == "2026-03-30T15:00:00Z"  # CEST after the DST change, +02:00
    assert event["id"] in [e["id"] for e in host.manage.get("/events").json()]


def test_event_patch_changes_only_what_is_sent(host: AppHost) -> None:
    created = host.manage.post("/events", json=EVENT).json()
    changed = host.manage.patch(f"/events/{created['id']}", json={"max_token_cap": 64})
    assert changed.status_code == 200
    assert changed.json()["max_token_cap"] == 64
    assert changed.json()["name"] == "Workshop"
    invalid_field(
        host.manage.patch(f"/events/{created['id']}", json={"ends_at": "2000-01-01"}), "ends_at"
    )


def test_unknown_event_is_404(host: AppHost) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        response = host.manage.request(method, "/events/nosuchevent", json={})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_event_with_attendees_is_only_deleted_with_force(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    refused = host.manage.delete(f"/events/{event.id}")
    assert refused.status_code == 409
    assert "force=true" in refused.json()["error"]["message"]
    assert host.manage.delete(f"/events/{event.id}?force=true").status_code == 204
    assert host.manage.get(f"/events/{event.id}").status_code == 404
    assert storage.rows("attendees", f"PartitionKey eq '{event.id}'") == []


def test_resource_api_key_is_write_only(host: AppHost, sim: Simulator, storage: Storage) -> None:
    body = {
        "name": "east",
        "deployment": "gpt-4o",
        "model_class": "openai-chat",
        "endpoint": sim.url,
        "api_key": "super-secret-upstream-key",
    }
    created = host.manage.post("/resources", json=body)
    assert created.status_code == 201
    assert "api_key" not in created.json() and created.json()["has_api_key"] is True
    listed = host.manage.get("/resources").text
    assert "super-secret-upstream-key" not in listed
    sealed = storage.rows("secrets", f"RowKey eq 'resource-{created.json()['id']}'")
    assert len(sealed) == 1 and "super-secret-upstream-key" not in str(sealed[0])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_class": "openai-video"}, "model_class"),
        ({"endpoint": "ftp://example.com"}, "endpoint"),
        ({"deployment": "../etc"}, "deployment"),
        ({"auth": "password"}, "auth"),
        ({"weight": 0}, "weight"),
        ({"priority": -1}, "priority"),
        ({"api_key": None}, "api_key"),
    ],
)
def test_bad_resource_field_is_named(
    host: AppHost, sim: Simulator, change: dict[str, Any], field: str
) -> None:
    body = {
        "name": "r",
        "deployment": "gpt-4o",
        "model_class": "openai-chat",
        "endpoint": sim.url,
        "api_key": SIM_KEY,
        **change,
    }
    invalid_field(host.manage.post("/resources", json=body), field)


def test_resource_in_use_cannot_be_deleted_until_detached(host: AppHost, event: EventSetup) -> None:
    resource_id = next(iter(event.resources))
    refused = host.manage.delete(f"/resources/{resource_id}")
    assert refused.status_code == 409
    assert event.id in refused.json()["error"]["message"]
    assert host.manage.delete(f"/events/{event.id}/resources/{resource_id}").status_code == 204
    catalog = host.manage.get(f"/events/{event.id}/resources").json()
    assert resource_id not in [r["id"] for r in catalog]
    assert host.manage.delete(f"/resources/{resource_id}").status_code == 204
    assert host.manage.get(f"/resources/{resource_id}").status_code == 404


def test_detached_deployment_is_no_longer_served(host: AppHost, event: EventSetup) -> None:
    chat_id = next(i for i, r in event.resources.items() if r["model_class"] == "openai-chat")
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert host.http.post(path, json=body, headers={"api-key": event.key}).status_code == 200
    host.manage.delete(f"/events/{event.id}/resources/{chat_id}")
    after = host.http.post(path, json=body, headers={"api-key": event.key})
    assert after.status_code == 404
    assert after.json()["error"]["code"] == "deployment_not_found"


def test_adding_the_same_attendee_twice_returns_the_same_key(
    host: AppHost, event: EventSetup
) -> None:
    first = host.manage.post(f"/events/{event.id}/attendees", json={"user": "Ada@Example.com"})
    again = host.manage.post(f"/events/{event.id}/attendees", json={"user": "ada@example.com"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert first.json()["api_key"] == again.json()["api_key"]
    assert first.json()["api_key"].startswith("aip-")
    listed = host.manage.get(f"/events/{event.id}/attendees").json()
    assert {a["user"] for a in listed} == {"attendee@example.com", "Ada@Example.com"}
    assert all("api_key" not in a for a in listed)


def test_attendee_without_user_is_refused(host: AppHost, event: EventSetup) -> None:
    invalid_field(host.manage.post(f"/events/{event.id}/attendees", json={}), "user")
    invalid_field(host.manage.post(f"/events/{event.id}/attendees", json={"user": "  "}), "user")


def test_a_function_key_is_no_management_credential(host: AppHost) -> None:
    from tests.harness import FUNCTION_KEY

    for headers, params in (
        ({}, {}),
        ({"x-functions-key": FUNCTION_KEY}, {}),
        ({}, {"code": FUNCTION_KEY}),
    ):
        response = host.http.get("/manage/events", headers=headers, params=params)
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "unauthorized"
        assert "'x-aiproxy-operator-key' header" in error["message"], error


def test_caps_beyond_32_bits_are_refused_with_the_field_named(host: AppHost) -> None:
    for field in ("max_token_cap", "daily_request_cap", "daily_token_cap"):
        invalid_field(host.manage.post("/events", json={**EVENT, field: 2**31}), field)
    created = host.manage.post("/events", json={**EVENT, "daily_request_cap": 2**31 - 1})
    assert created.status_code == 201
    patched = host.manage.patch(f"/events/{created.json()['id']}", json={"max_token_cap": 2**63})
    invalid_field(patched, "max_token_cap")


def test_attendee_with_unknown_fields_is_refused(host: AppHost, event: EventSetup) -> None:
    response = host.manage.post(f"/events/{event.id}/attendees", json={"user": "a", "role": "x"})
    invalid_field(response, "role")


def test_every_bad_field_is_listed_in_details_the_first_as_param(host: AppHost) -> None:
    body = {**EVENT, "name": "", "max_token_cap": 0, "requests_per_minute": -1, "colour": "blue"}
    body.pop("daily_request_cap")
    response = host.manage.post("/events", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    fields = [d["field"] for d in error["details"]]
    assert sorted(fields) == [
        "colour", "daily_request_cap", "max_token_cap", "name", "requests_per_minute",
    ]  # fmt: skip
    assert error["param"] == fields[0] and f"'{fields[0]}'" in error["message"]
    assert "4 more fields" in error["message"]
    for detail in error["details"]:
        assert set(detail) == {"field", "problem", "fix"} and detail["problem"] and detail["fix"]
    one = host.manage.post("/events", json={**EVENT, "tokens_per_minute": "many"}).json()["error"]
    assert one["param"] == "tokens_per_minute"
    assert [d["field"] for d in one["details"]] == ["tokens_per_minute"]
    resource = host.manage.post(
        "/resources", json={"name": "", "model_class": "x", "quota_tokens_per_minute": 1.5}
    ).json()["error"]
    assert {d["field"] for d in resource["details"]} == {
        "name", "deployment", "model_class", "endpoint", "quota_tokens_per_minute", "api_key",
    }  # fmt: skip


def test_per_minute_limits_are_optional_and_editable(host: AppHost) -> None:
    created = host.manage.post("/events", json=EVENT).json()
    assert created["requests_per_minute"] == 0 and created["tokens_per_minute"] == 0
    path = f"/events/{created['id']}"
    limited = host.manage.patch(path, json={"requests_per_minute": 30, "tokens_per_minute": 9000})
    assert limited.status_code == 200, limited.text
    shown = host.manage.get(path).json()
    assert (shown["requests_per_minute"], shown["tokens_per_minute"]) == (30, 9000)
    cleared = host.manage.patch(path, json={"requests_per_minute": None}).json()
    assert (cleared["requests_per_minute"], cleared["tokens_per_minute"]) == (0, 9000)
    invalid_field(host.manage.patch(path, json={"tokens_per_minute": 2**31}), "tokens_per_minute")


def test_resource_quotas_are_optional_and_editable(host: AppHost, sim: Simulator) -> None:
    body = {"name": "q", "deployment": "gpt-4o", "model_class": "openai-chat",
            "endpoint": sim.url, "api_key": SIM_KEY}  # fmt: skip
    created = host.manage.post("/resources", json=body).json()
    assert created["quota_requests_per_minute"] == 0 and created["quota_tokens_per_minute"] == 0
    path = f"/resources/{created['id']}"
    quotas = {"quota_requests_per_minute": 300, "quota_tokens_per_minute": 50_000}
    assert host.manage.patch(path, json=quotas).status_code == 200
    shown = next(r for r in host.manage.get("/resources").json() if r["id"] == created["id"])
    assert {k: shown[k] for k in quotas} == quotas
    invalid_field(
        host.manage.patch(path, json={"quota_requests_per_minute": -5}),
        "quota_requests_per_minute",
    )


def details_of(response: httpx.Response) -> list[dict[str, str]]:
    """The details of a 400, each complete; `param` and the message name the first."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    for detail in error["details"]:
        assert set(detail) == {"field", "problem", "fix"}, detail
        assert detail["problem"] and detail["fix"].endswith("."), detail
    assert error["param"] == error["details"][0]["field"]
    assert error["message"].startswith(f"Field '{error['param']}' ")
    return error["details"]


def test_three_bad_fields_get_three_details_the_first_as_param(
    host: AppHost, sim: Simulator
) -> None:
    event = {**EVENT, "name": 5, "time_zone": "Mars/Olympus", "max_token_cap": 0}
    response = host.manage.post("/events", json=event)
    details = details_of(response)
    assert [d["field"] for d in details] == ["name", "time_zone", "max_token_cap"]
    assert "2 more fields to fix" in response.json()["error"]["message"]
    assert "'Mars/Olympus'" in details[1]["problem"]
    assert details[2]["fix"] == "Send a whole number from 1 to 2147483647, without quotes."
    resource = {"name": "r", "deployment": "../etc", "model_class": "openai-chat",
                "endpoint": "ftp://example.com", "api_key": SIM_KEY, "weight": 0}  # fmt: skip
    details = details_of(host.manage.post("/resources", json=resource))
    assert [d["field"] for d in details] == ["deployment", "endpoint", "weight"]
    assert "Azure portal" in details[1]["fix"]
    attendee = host.manage.post("/events", json=EVENT).json()["id"]
    details = details_of(
        host.manage.post(f"/events/{attendee}/attendees", json={"user": "", "a": 1, "b": 2})
    )
    assert [d["field"] for d in details] == ["user", "a", "b"]


def test_checks_across_fields_are_listed_with_the_other_problems(
    host: AppHost, sim: Simulator
) -> None:
    late = {**EVENT, "name": "", "ends_at": "2000-01-01T00:00:00", "active": "yes"}
    details = details_of(host.manage.post("/events", json=late))
    assert [d["field"] for d in details] == ["name", "ends_at", "active"]
    assert details[1]["problem"] == "must be after starts_at"
    keyless = {"name": "r", "deployment": "gpt-4o", "model_class": "openai-chat",
               "endpoint": sim.url, "priority": -1}  # fmt: skip
    details = details_of(host.manage.post("/resources", json=keyless))
    assert [d["field"] for d in details] == ["priority", "api_key"]
    assert details[1]["problem"] == "is required when auth is 'key'"


def test_a_time_zone_that_names_a_folder_is_refused_with_the_field_named(host: AppHost) -> None:
    # "Europe" is a folder of the time zone database, not a zone.
    invalid_field(host.manage.post("/events", json={**EVENT, "time_zone": "Europe"}), "time_zone")


def test_a_patch_is_checked_against_the_fields_it_leaves_alone(
    host: AppHost, sim: Simulator
) -> None:
    body = {**EVENT, "starts_at": "2026-05-04T09:00:00", "ends_at": "2026-05-04T17:00:00"}
    created = host.manage.post("/events", json={**body, "time_zone": "Europe/Berlin"}).json()
    path = f"/events/{created['id']}"
    late = host.manage.patch(path, json={"starts_at": "2026-05-04T18:00:00"})
    assert [d["field"] for d in details_of(late)] == ["ends_at"]
    moved = host.manage.patch(path, json={"time_zone": "America/New_York"}).json()
    assert (moved["starts_at"], moved["starts_at_utc"]) == (
        "2026-05-04T09:00:00",
        "2026-05-04T13:00:00Z",
    )
    cleared = host.manage.patch(
        path, json={"organizer_name": None, "shared_code": "  x-x-x-x-x  "}
    ).json()
    assert (cleared["organizer_name"], cleared["shared_code"]) == ("", "x-x-x-x-x")
    assert host.manage.get(path).json()["name"] == "Workshop"
    resource = {"name": "r", "deployment": "gpt-4o", "model_class": "openai-chat",
                "endpoint": sim.url + "/", "api_key": SIM_KEY}  # fmt: skip
    made = host.manage.post("/resources", json=resource).json()
    assert made["endpoint"] == sim.url and made["upstream_deployment"] == "gpt-4o"
    # The stored key still counts for a change that leaves endpoint and auth alone.
    rpath = f"/resources/{made['id']}"
    assert host.manage.patch(rpath, json={"weight": 3}).json()["has_api_key"] is True
    # Switching to the app's identity drops it: switching back takes a key in the same body.
    switched = host.manage.patch(rpath, json={"auth": "managed_identity"}).json()
    assert switched["has_api_key"] is False
    assert [d["field"] for d in details_of(host.manage.patch(rpath, json={"auth": "key"}))] == [
        "api_key"
    ]
    back = host.manage.patch(rpath, json={"auth": "key", "api_key": SIM_KEY}).json()
    assert back["has_api_key"] is True
