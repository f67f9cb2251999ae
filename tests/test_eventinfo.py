"""An attendee's key tells them their event, caps, window and deployments."""

from __future__ import annotations

from tests.harness import AppHost, EventSetup


def test_eventinfo_lists_caps_and_deployments_by_class(host: AppHost, event: EventSetup) -> None:
    info = host.http.get("/eventinfo", headers={"authorization": f"Bearer {event.key}"})
    assert info.status_code == 200
    body = info.json()
    assert body["name"] == "Test event"
    assert body["status"] == "live"
    assert body["max_token_cap"] == 512
    assert body["daily_request_cap"] == 1000
    assert body["deployments"] == {
        "openai-chat": ["gpt-4o-mini"],
        "openai-completions": ["gpt-35-turbo-instruct"],
        "openai-embeddings": ["text-embedding-3-small"],
    }
    assert "shared_code" not in body and "organizer_email" not in body


def test_eventinfo_refuses_a_bad_key(host: AppHost) -> None:
    info = host.http.get("/eventinfo", headers={"api-key": "aip-" + "Z" * 32})
    assert info.status_code == 401
    assert info.json()["error"]["code"] == "invalid_api_key"


def test_public_event_info_needs_no_key_and_hides_secrets(host: AppHost, event: EventSetup) -> None:
    public = host.http.get(f"/events/{event.id}")
    assert public.status_code == 200
    assert public.json()["name"] == "Test event"
    assert "shared_code" not in public.json()
    assert host.http.get("/events/nope").status_code == 404
