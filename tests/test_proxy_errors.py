"""Every refusal of docs/api.md#errors that the proxy path makes, with its status and code."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from local.azurite import free_port
from tests.harness import CHAT, AppHost, EventSetup, Simulator, window

HELLO = {"messages": [{"role": "user", "content": "hello"}]}


def post(
    host: AppHost, key: str | None, body: Any = HELLO, path: str = CHAT, **kw: Any
) -> httpx.Response:
    headers = {"api-key": key} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, bytes):
        return host.http.post(path, content=body, headers=headers, **kw)
    return host.http.post(path, json=body, headers=headers, **kw)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["status"] == status
    assert len(error["message"]) > 20
    assert len(response.headers["x-aiproxy-request-id"]) == 16
    return error


def test_missing_key_is_refused(host: AppHost, event: EventSetup) -> None:
    error = error_of(post(host, None), 401, "invalid_api_key")
    assert "api-key" in error["message"]


def test_malformed_key_is_refused(host: AppHost, event: EventSetup) -> None:
    error_of(post(host, "not-a-key"), 401, "invalid_api_key")


def test_unknown_key_is_refused(host: AppHost, event: EventSetup) -> None:
    error_of(post(host, "aip-" + "A" * 32), 401, "invalid_api_key")


def test_sdk_sees_an_authentication_error_for_a_bad_key(host: AppHost, event: EventSetup) -> None:
    client = openai.OpenAI(
        base_url=f"{host.base}/openai/v1", api_key="aip-" + "B" * 32, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO["messages"])
    assert caught.value.code == "invalid_api_key"


def test_revoked_key_is_refused_on_the_next_request(host: AppHost, event: EventSetup) -> None:
    assert post(host, event.key).status_code == 200
    revoked = host.manage.delete(f"/events/{event.id}/attendees/{event.attendee['id']}")
    assert revoked.status_code == 200 and revoked.json()["active"] is False
    error_of(post(host, event.key), 401, "key_revoked")


def test_rotated_key_replaces_the_old_one(host: AppHost, event: EventSetup) -> None:
    rotated = host.manage.post(f"/events/{event.id}/attendees/{event.attendee['id']}/rotate")
    assert rotated.status_code == 200
    new_key = rotated.json()["api_key"]
    assert new_key != event.key
    error_of(post(host, event.key), 401, "invalid_api_key")
    assert post(host, new_key).status_code == 200


def test_event_not_started_names_the_window_in_both_zones(host: AppHost, sim: Simulator) -> None:
    setup = EventSetup(host, sim, **window(hours_before=-48, hours_after=72, zone="Europe/Berlin"))
    error = error_of(post(host, setup.key), 403, "event_not_started")
    assert "Europe/Berlin" in error["message"] and "UTC" in error["message"]
    assert setup.event["starts_at"] in error["message"]


def test_event_ended_is_refused(host: AppHost, sim: Simulator) -> None:
    setup = EventSetup(
        host, sim, **window(hours_before=72, hours_after=-48, zone="America/New_York")
    )
    error = error_of(post(host, setup.key), 403, "event_ended")
    assert "America/New_York" in error["message"]


def test_switched_off_event_is_refused_at_once(host: AppHost, event: EventSetup) -> None:
    assert post(host, event.key).status_code == 200
    assert host.manage.patch(f"/events/{event.id}", json={"active": False}).status_code == 200
    error_of(post(host, event.key), 403, "event_inactive")


def test_unknown_deployment_lists_the_ones_in_the_catalog(host: AppHost, event: EventSetup) -> None:
    path = "/openai/deployments/gpt-5/chat/completions?api-version=2024-10-21"
    error = error_of(post(host, event.key, path=path), 404, "deployment_not_found")
    assert "gpt-4o-mini" in error["message"]
    assert "text-embedding-3-small" not in error["message"]  # an embeddings model is no chat model


def test_deployment_of_another_class_is_not_found(host: AppHost, event: EventSetup) -> None:
    path = "/openai/deployments/text-embedding-3-small/chat/completions?api-version=2024-10-21"
    error_of(post(host, event.key, path=path), 404, "deployment_not_found")


def test_body_that_is_not_json_is_refused(host: AppHost, event: EventSetup) -> None:
    response = post(host, event.key, b"{not json", headers={"content-type": "application/json"})
    error_of(response, 400, "invalid_request")


def test_wrong_content_type_is_refused(host: AppHost, event: EventSetup) -> None:
    response = post(host, event.key, b"hello", headers={"content-type": "text/plain"})
    assert "application/json" in error_of(response, 400, "invalid_request")["message"]


def test_json_that_is_not_an_object_is_refused(host: AppHost, event: EventSetup) -> None:
    error_of(post(host, event.key, [1, 2]), 400, "invalid_request")


def test_v1_request_without_model_is_refused(host: AppHost, event: EventSetup) -> None:
    response = post(host, event.key, HELLO, path="/openai/v1/chat/completions")
    assert error_of(response, 400, "invalid_request")["param"] == "model"


def test_max_tokens_above_the_cap_is_refused(host: AppHost, event: EventSetup) -> None:
    error = error_of(
        post(host, event.key, {**HELLO, "max_tokens": 513}), 400, "max_tokens_exceeds_cap"
    )
    assert "512" in error["message"] and error["param"] == "max_tokens"
    body = {**HELLO, "max_completion_tokens": 10_000}
    assert (
        error_of(post(host, event.key, body), 400, "max_tokens_exceeds_cap")["param"]
        == "max_completion_tokens"
    )
    assert post(host, event.key, {**HELLO, "max_tokens": 512}).status_code == 200


def test_max_tokens_of_the_wrong_type_is_refused(host: AppHost, event: EventSetup) -> None:
    error_of(post(host, event.key, {**HELLO, "max_tokens": "ten"}), 400, "invalid_request")


def test_body_above_the_limit_is_refused(host: AppHost, event: EventSetup) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 26_214_400 + b'"}]}'
    response = post(host, event.key, big, headers={"content-type": "application/json"})
    error_of(response, 413, "payload_too_large")


def test_unreachable_upstream_gives_upstream_error(host: AppHost, sim: Simulator) -> None:
    setup = EventSetup(host, sim)
    setup.add_resource(f"http://127.0.0.1:{free_port()}", "gpt-down", "openai-chat")
    path = "/openai/deployments/gpt-down/chat/completions?api-version=2024-10-21"
    error_of(post(host, setup.key, path=path), 502, "upstream_error")


def test_upstream_garbage_gives_upstream_error(host: AppHost, event: EventSetup) -> None:
    body = {"messages": [{"role": "user", "content": "[sim:garbage]"}]}
    error_of(post(host, event.key, body), 502, "upstream_error")


def test_upstream_that_never_answers_gives_upstream_timeout(
    host: AppHost, event: EventSetup
) -> None:
    body = {"messages": [{"role": "user", "content": "[sim:hang]"}]}
    error_of(post(host, event.key, body), 504, "upstream_timeout")


def test_throttled_only_deployment_gives_no_capacity_with_retry_after(
    host: AppHost, event: EventSetup
) -> None:
    body = {"messages": [{"role": "user", "content": "[sim:status=429 retry_after=7]"}]}
    response = post(host, event.key, body)
    error_of(response, 429, "no_capacity")
    assert response.headers["retry-after"] == "7"
    again = post(host, event.key)  # the pool is still cooling: refused without asking upstream
    error_of(again, 429, "no_capacity")
    assert 1 <= int(again.headers["retry-after"]) <= 7


def test_upstream_content_filter_is_passed_through(host: AppHost, event: EventSetup) -> None:
    body = {"messages": [{"role": "user", "content": "[sim:content_filter]"}]}
    response = post(host, event.key, body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "content_filter"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream_options": [1]}, "stream_options"),
    ],
)
def test_stream_fields_of_the_wrong_type_are_refused(
    host: AppHost, event: EventSetup, extra: dict[str, Any], param: str
) -> None:
    response = post(host, event.key, {**HELLO, **extra})
    assert error_of(response, 400, "invalid_request")["param"] == param
