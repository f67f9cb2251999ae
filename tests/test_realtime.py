"""Realtime voice: a WebRTC call's setup goes through the proxy, admitted and capped like any
call, and the media then flows between the caller and the deployment's peer; ephemeral client
secrets are admitted, capped and short-lived."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.harness import AppHost, EventSetup, Simulator, Storage, window
from tests.realtime_peer import Caller, eventually, form, sim_call

pytestmark = pytest.mark.e2e  # the call waits for the queue function to meter it

REALTIME = "gpt-realtime"
CALLS = "/openai/v1/realtime/calls"
SECRETS = "/openai/v1/realtime/client_secrets"


def realtime_event(host: AppHost, sim: Simulator, **fields: Any) -> EventSetup:
    setup = EventSetup(host, sim, **fields)
    setup.add_resource(sim.url, REALTIME, "openai-realtime", upstream_deployment="rt-upstream")
    return setup


async def post_offer(
    host: AppHost, key: str, caller: Caller, session: dict[str, Any] | None, **options: Any
) -> httpx.Response:
    sdp = await caller.offer()
    async with httpx.AsyncClient(base_url=host.base, timeout=30) as client:
        return await client.post(
            CALLS, files=form(sdp, session), headers={"api-key": key}, **options
        )


async def test_a_call_is_set_up_capped_and_its_audio_reaches_the_deployments_peer(
    host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = realtime_event(host, sim, max_token_cap=300)
    caller = Caller()
    try:
        answer = await post_offer(
            host, setup.key, caller, {"type": "realtime", "model": REALTIME, "instructions": "Hi"}
        )
        assert answer.status_code == 201, answer.text
        assert answer.headers["content-type"].startswith("application/sdp")
        assert answer.text.startswith("v=0")
        call_id = answer.headers["location"].rpartition("/")[2]
        assert call_id.startswith("rtc_")
        assert answer.headers["location"] == f"/api{CALLS}/{call_id}"
        await caller.answer(answer.text)
        seen = await eventually(
            lambda: sim_call(sim.url, call_id), timeout=5
        )  # the deployment's peer has the call, with the session as capped
        assert seen["session"]["model"] == "rt-upstream"
        assert seen["session"]["max_output_tokens"] == 300
        assert seen["session"]["instructions"] == "Hi"

        async def heard() -> bool:
            call = await sim_call(sim.url, call_id)
            return bool(call and call["audio_seconds"] > 0.2 and call["data_channel"])

        await eventually(heard)  # media flows caller ↔ deployment, not through the proxy
        await eventually(lambda: _async("session.created" in caller.types()))
    finally:
        await caller.close()
    records = [r for r in storage.usage(setup.id, expect=1) if r["outcome"] == "ok"]
    assert [(r["deployment"], r["model_class"], r["units"], r["status"]) for r in records] == [
        (REALTIME, "openai-realtime", 1, 201)
    ]  # the session; its responses are metered through the sideband (test_realtime_metering)


async def _async(value: Any) -> Any:
    return value


async def test_an_application_sdp_offer_names_the_deployment_in_the_query(
    host: AppHost, sim: Simulator
) -> None:
    setup = realtime_event(host, sim)
    caller = Caller()
    try:
        sdp = await caller.offer()
        async with httpx.AsyncClient(base_url=host.base, timeout=30) as client:
            answer = await client.post(
                CALLS,
                params={"model": REALTIME},
                content=sdp,
                headers={"authorization": f"Bearer {setup.key}", "content-type": "application/sdp"},
            )
        assert answer.status_code == 201, answer.text
        call = await sim_call(sim.url, answer.headers["location"].rpartition("/")[2])
        assert call is not None and call["session"]["max_output_tokens"] == 512
        # Connected, so that closing ends the call (one never connected lasts until its
        # connection attempt fails, its metering with it).
        await caller.connect(answer.text)
    finally:
        await caller.close()


@pytest.mark.parametrize(
    ("session", "status", "code"),
    [
        ({"model": REALTIME, "max_output_tokens": 513}, 400, "max_tokens_exceeds_cap"),
        ({"model": REALTIME, "max_output_tokens": "lots"}, 400, "invalid_request"),
        ({"model": REALTIME, "type": "transcription"}, 400, "invalid_request"),
        ({"model": "gpt-4o-mini"}, 404, "deployment_not_found"),  # a chat deployment
        ({"model": "nope"}, 404, "deployment_not_found"),
        ({}, 400, "invalid_request"),
        (None, 400, "invalid_request"),
    ],
)
async def test_refusals_come_before_anything_reaches_the_deployment(
    host: AppHost, sim: Simulator, session: Any, status: int, code: str
) -> None:
    setup = realtime_event(host, sim)
    before = len((httpx.get(f"{sim.url}/_sim/realtime").json())["calls"])
    caller = Caller()
    try:
        answer = await post_offer(host, setup.key, caller, session)
    finally:
        await caller.close()
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code
    if code == "deployment_not_found":
        assert REALTIME in error["message"]  # names what the event offers for realtime
    assert len(httpx.get(f"{sim.url}/_sim/realtime").json()["calls"]) == before


async def test_the_window_the_key_and_the_daily_cap_are_checked(
    host: AppHost, sim: Simulator
) -> None:
    ended = realtime_event(host, sim, **window(hours_before=3, hours_after=-1))
    session = {"model": REALTIME}
    caller, connected = Caller(), Caller()
    try:
        answer = await post_offer(host, ended.key, caller, session)
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "event_ended"
        wrong = await post_offer(host, "aip-" + "0" * 40, caller, session)
        assert wrong.status_code == 401
        capped = realtime_event(host, sim, daily_request_cap=1)
        first = await post_offer(host, capped.key, connected, session)
        assert first.status_code == 201, first.text
        second = await post_offer(host, capped.key, caller, session)
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "daily_request_cap_exceeded"
        await connected.connect(first.text)  # so that closing it ends the call let in
    finally:
        await caller.close()
        await connected.close()


async def test_bodies_that_are_no_offer_are_refused(host: AppHost, sim: Simulator) -> None:
    setup = realtime_event(host, sim)
    headers = {"api-key": setup.key}
    async with httpx.AsyncClient(base_url=host.base, timeout=30) as client:
        for content, content_type in (
            (b"hello", "application/sdp"),
            (b"\xff\xfe", "application/sdp"),
            (b'{"sdp": "v=0"}', "application/json"),
            (b"v=0\r\n" + b"a" * 70_000, "application/sdp"),
        ):
            answer = await client.post(
                CALLS,
                params={"model": REALTIME},
                content=content,
                headers={**headers, "content-type": content_type},
            )
            assert answer.status_code in (400, 413), answer.text
            assert answer.json()["error"]["code"] in ("invalid_request", "payload_too_large")
        bad_json = await client.post(
            CALLS, files={"sdp": (None, "v=0\r\n"), "session": (None, "{")}, headers=headers
        )
        assert bad_json.status_code == 400 and bad_json.json()["error"]["param"] == "session"


def test_client_secrets_are_refused_unless_the_event_allows_them(
    host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = realtime_event(host, sim)  # realtime_client_secrets: false, the default
    assert host.manage.get(f"/events/{setup.id}").json()["realtime_client_secrets"] is False
    body = {"session": {"type": "realtime", "model": REALTIME}}
    refused = host.http.post(SECRETS, json=body, headers={"api-key": setup.key})
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "forbidden" and error["status"] == 403
    assert "/openai/v1/realtime/calls" in error["message"]
    assert "realtime_client_secrets" in error["message"]
    assert "x-aiproxy-realtime-calls-url" not in refused.headers  # no endpoint is named
    # The organiser turns them on: the next ask gets its key.
    changed = host.manage.patch(f"/events/{setup.id}", json={"realtime_client_secrets": True})
    assert changed.status_code == 200 and changed.json()["realtime_client_secrets"] is True
    answer = host.http.post(SECRETS, json=body, headers={"api-key": setup.key})
    assert answer.status_code == 200, answer.text
    assert answer.json()["value"].startswith("ek_")
    records = storage.usage(setup.id, expect=1)  # the key only: the refusal reached nothing
    assert [(r["units"], r["status"]) for r in records] == [(1, 200)]


def test_a_client_secret_is_capped_short_lived_and_opens_a_call_at_the_deployment(
    host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = realtime_event(host, sim, max_token_cap=200, realtime_client_secrets=True)
    body = {
        "expires_after": {"anchor": "created_at", "seconds": 3600},
        "session": {"type": "realtime", "model": REALTIME, "instructions": "Be brief"},
    }
    answer = host.http.post(SECRETS, json=body, headers={"api-key": setup.key})
    assert answer.status_code == 200, answer.text
    secret = answer.json()
    assert secret["value"].startswith("ek_")
    assert secret["expires_at"] <= time.time() + 61
    assert secret["session"]["max_output_tokens"] == 200
    assert secret["session"]["model"] == REALTIME  # the event's name, not the upstream's
    assert answer.headers["x-aiproxy-realtime-calls-url"] == f"{sim.url}/openai/v1/realtime/calls"
    records = storage.usage(setup.id, expect=1)
    assert [(r["units"], r["status"]) for r in records] == [(1, 200)]
    too_much = {**body, "session": {**body["session"], "max_output_tokens": 201}}
    refused = host.http.post(SECRETS, json=too_much, headers={"api-key": setup.key})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "max_tokens_exceeds_cap"
    for lifetime in ({"seconds": 5}, {"seconds": "60"}, "soon"):
        bad = host.http.post(
            SECRETS, json={**body, "expires_after": lifetime}, headers={"api-key": setup.key}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "expires_after"
    missing = host.http.post(SECRETS, json={}, headers={"api-key": setup.key})
    assert missing.status_code == 400


async def test_the_client_secret_holder_calls_the_deployment_itself(
    host: AppHost, sim: Simulator
) -> None:
    setup = realtime_event(host, sim, realtime_client_secrets=True)
    body = {"session": {"type": "realtime", "model": REALTIME}}
    async with httpx.AsyncClient(base_url=host.base, timeout=30) as client:
        answer = await client.post(SECRETS, json=body, headers={"api-key": setup.key})
        assert answer.status_code == 200, answer.text
        caller = Caller()
        try:
            sdp = await caller.offer()
            call = await client.post(
                answer.headers["x-aiproxy-realtime-calls-url"],
                content=sdp,
                headers={
                    "authorization": f"Bearer {answer.json()['value']}",
                    "content-type": "application/sdp",
                },
            )
            assert call.status_code == 201, call.text
            seen = await sim_call(sim.url, call.headers["location"].rpartition("/")[2])
            assert seen is not None and seen["session"]["max_output_tokens"] == 512
        finally:
            await caller.close()
