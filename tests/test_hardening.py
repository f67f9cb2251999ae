"""Faults, hostile input and secrets: the proxy keeps working, answers in the contract's shape,
and keeps keys, upstream secrets and prompts out of its logs."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from local.azurite import Azurite, free_port
from tests.harness import (
    CHAT,
    FUNCTION_KEY,
    OPERATOR,
    OPERATOR_KEY,
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    host_env,
    host_with_standins,
    unique_prefix,
    wait_until,
)


def chat(host: AppHost, key: str, content: str, **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], **extra}
    return host.http.post(CHAT, json=body, headers={"api-key": key})


def contract_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["status"] == status and error["message"]


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_storage_down_at_start_is_reported_then_recovers_without_restart(
    log_dir: Path, sim: Simulator
) -> None:
    port = free_port()
    storage = Azurite(port)
    host = AppHost(log_dir, host_env(storage.connection_string, unique_prefix("cold")), "cold")
    try:
        assert host.http.get("/health").status_code == 503
        refused = host.http.post(CHAT, json={}, headers={"api-key": "aip-" + "C" * 32})
        contract_error(refused, 503, "storage_unavailable")
        assert refused.headers["retry-after"] == "5"
        # The console's calls too; the operator's log says what storage answered.
        listed = host.manage.get("/events")
        contract_error(listed, 503, "storage_unavailable")
        wait_until(
            lambda: "/api/manage/events" in host.log() and "storage unavailable:" in host.log()
        )
        storage.start()
        assert host.http.get("/health").status_code == 200
        setup = EventSetup(host, sim)
        assert chat(host, setup.key, "hello").status_code == 200
    finally:
        host.stop()
        storage.stop()


def test_upstream_reset_mid_body_is_an_upstream_error_and_recorded(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    contract_error(chat(host, event.key, "[sim:cut_after=1]"), 502, "upstream_error")
    [record] = storage.usage(event.id, expect=1)
    assert record["outcome"] == "upstream_error"


def test_very_slow_first_byte_is_an_upstream_timeout(host: AppHost, event: EventSetup) -> None:
    started = time.monotonic()
    contract_error(chat(host, event.key, "[sim:first_byte_ms=6000]"), 504, "upstream_timeout")
    assert time.monotonic() - started < 5.5  # the 3 s read timeout, not the upstream's 6 s


def test_slow_client_reading_a_stream_gets_every_chunk(host: AppHost, event: EventSetup) -> None:
    body = {"messages": [{"role": "user", "content": "[sim:tokens=40] go"}], "stream": True}
    pieces = []
    with host.http.stream("POST", CHAT, json=body, headers={"api-key": event.key}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                pieces.append(line)
            time.sleep(0.02)  # a reader slower than the upstream
            if line:
                last = line
    assert last == "data: [DONE]"
    assert len([p for p in pieces if '"content":""' not in p]) == 40


def test_revocation_during_an_open_stream_lets_it_finish_and_refuses_the_next_call(
    host: AppHost, event: EventSetup
) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=event.key, api_version="2024-10-21", max_retries=0
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "[sim:tokens=10 latency_ms_per_token=100] go"}],
        stream=True,
    )
    chunks = iter(stream)
    next(chunks)
    revoked = host.manage.delete(f"/events/{event.id}/attendees/{event.attendee['id']}")
    assert revoked.status_code == 200
    rest = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(rest) >= 9  # the call was authorised when it started: it completes
    contract_error(chat(host, event.key, "again"), 401, "key_revoked")


# --- hostile input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,  # deeper than any parser should follow
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8
        b'{"messages": ',  # cut short
        b"",
    ],
)
def test_malformed_bodies_are_refused_in_the_contract_shape(
    host: AppHost, event: EventSetup, body: bytes
) -> None:
    response = host.http.post(
        CHAT, content=body, headers={"api-key": event.key, "content-type": "application/json"}
    )
    contract_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "name", ["..", "%2E%2E", "a%2Fb", "x" * 300, "gpt%0d%0aX-Injected:%201", "%00", "a b"]
)
def test_odd_deployment_names_are_not_found(host: AppHost, event: EventSetup, name: str) -> None:
    path = f"/openai/deployments/{name}/chat/completions?api-version=2024-10-21"
    response = host.http.post(path, json={"messages": []}, headers={"api-key": event.key})
    assert response.status_code == 404, response.text
    # The app's answer; a path that matches no route is the host's (empty), and one with a line
    # break the runtime's own (its catch-all route does not match it: see docs/api.md#answers-of-the-host-itself).
    if response.content:
        body = response.json()
        assert body == {"detail": "Not Found"} or body["error"]["code"] == "deployment_not_found"
    assert "x-injected" not in response.headers


def test_key_in_the_query_string_is_neither_accepted_nor_forwarded(
    host: AppHost, event: EventSetup, sim: Simulator
) -> None:
    refused = host.http.post(
        CHAT + f"&api-key={event.key}", json={"messages": [{"role": "user", "content": "x"}]}
    )
    contract_error(refused, 401, "invalid_api_key")
    ok = host.http.post(
        CHAT + f"&api-key={event.key}&code=secret&seed=1",
        json={"messages": [{"role": "user", "content": "x"}]},
        headers={"api-key": event.key},
    )
    assert ok.status_code == 200
    forwarded = sim.stats()["last_requests"][-1]["query"]
    assert forwarded == {"seed": "1", "api-version": "2024-10-21"}


def test_oversized_headers_are_refused(host: AppHost, event: EventSetup) -> None:
    response = host.http.post(
        CHAT, json={}, headers={"api-key": event.key, "x-padding": "p" * 70_000}
    )
    assert response.status_code in (400, 413, 431)


def test_cross_origin_browsers_get_no_cors_grant(host: AppHost, event: EventSetup) -> None:
    preflight = host.http.options(
        CHAT,
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    answer = host.http.get(
        "/eventinfo", headers={"api-key": event.key, "origin": "https://evil.example"}
    )
    assert answer.status_code == 200
    assert "access-control-allow-origin" not in answer.headers


# --- secrets ----------------------------------------------------------------------------------


def test_every_management_route_refuses_without_a_credential(host: AppHost) -> None:
    walked = 0
    for function in host.status()["functions"]:
        if function["trigger"] != "httpTrigger" or not (function["route"] or "").startswith(
            "manage/"
        ):
            continue
        path = "/" + re.sub(r"\{[^}]*\}", "x1", function["route"])
        for method in function["methods"]:
            for headers in ({}, {"x-functions-key": FUNCTION_KEY}):
                response = host.http.request(method, path, json={}, headers=headers)
                assert response.status_code == 401, (method, path)
                assert response.json()["error"]["code"] == "unauthorized", (method, path)
                walked += 1
    assert walked >= 30


def from_address(host: AppHost, address: str) -> httpx.Client:
    return httpx.Client(
        base_url=host.base, timeout=30, transport=httpx.HTTPTransport(local_address=address)
    )


def test_repeated_wrong_keys_are_slowed_without_hurting_others(
    host: AppHost, event: EventSetup
) -> None:
    # Callers from their own loopback addresses: the host adds each one's address, as Azure does.
    attacker, other = from_address(host, "127.0.0.7"), from_address(host, "127.0.0.8")
    codes = []
    for n in range(40):
        headers = {"api-key": f"aip-{n:032d}"}
        codes.append(attacker.post(CHAT, json={}, headers=headers).json()["error"]["code"])
    assert codes[:20] == ["invalid_api_key"] * 20
    assert codes.count("too_many_failed_keys") >= 15
    limited = attacker.post(CHAT, json={}, headers={"api-key": "aip-" + "9" * 32})
    assert limited.status_code in (401, 429)
    if limited.status_code == 429:
        assert int(limited.headers["retry-after"]) >= 1
    # A valid (cached) key from the same address, and anyone else, are not affected.
    assert chat(host, event.key, "hi").status_code == 200
    same_place = attacker.post(
        CHAT, json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"api-key": event.key},
    )  # fmt: skip
    assert same_place.status_code == 200
    contract_error(
        other.post(CHAT, json={}, headers={"api-key": "aip-" + "8" * 32}), 401, "invalid_api_key"
    )
    # A forwarded chain the caller wrote itself is not its address: the last hop is.
    spoofed = other.post(
        CHAT, json={}, headers={"x-forwarded-for": "127.0.0.7", "api-key": "aip-" + "6" * 32}
    )
    contract_error(spoofed, 401, "invalid_api_key")


@pytest.mark.e2e
def test_logs_hold_no_key_no_upstream_secret_and_no_prompt(
    log_dir: Path, azurite: Azurite, sim: Simulator
) -> None:
    secret_prompt = "the-launch-code-is-ZEBRA-4471"
    host = AppHost(
        log_dir, host_env(azurite.connection_string, unique_prefix("logs")), name="logscan"
    )
    try:
        setup = EventSetup(host, sim)
        client = openai.AzureOpenAI(
            azure_endpoint=host.base, api_key=setup.key, api_version="2024-10-21", max_retries=0
        )
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": secret_prompt}]
        )
        for directive in ("[sim:cut_after=2] ", "[sim:status=500] ", "[sim:garbage] "):
            try:
                list(
                    client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": directive + secret_prompt}],
                        stream=True,
                    )
                )
            except openai.APIError:
                pass
        last = host.http.post(CHAT, json={}, headers={"api-key": setup.key[:-1] + "X"})
        host.manage.post(f"/events/{setup.id}/attendees", json={"user": "second"})
        # Every call's lines are in: the three failed streams' and the refused key's.
        wait_until(lambda: host.log().count('"outcome":') >= 3)
        wait_until(lambda: last.headers["x-aiproxy-request-id"] in host.log())
        wait_until(lambda: not host.unanswered())
    finally:
        host.stop()
    log = host.proc.log_path.read_text(errors="replace")
    assert '"request_id"' in log  # the structured lines are there: the scan read real logs
    for secret in (
        setup.key,
        setup.key[4:],
        "simkey",
        FUNCTION_KEY,
        OPERATOR_KEY,
        secret_prompt,
        "ZEBRA",
    ):
        assert secret not in log, f"{secret[:8]}… appears in the log"


@pytest.mark.slow
@pytest.mark.e2e
async def test_spans_and_metrics_carry_event_and_deployment(
    azurite: Azurite, sim: Simulator, log_dir: Path
) -> None:
    throttled = Simulator(log_dir, name="otel429")
    throttled.configure(status=429, retry_after_ms=5000)
    try:
        with host_with_standins(
            log_dir, azurite.connection_string, unique_prefix("otel"), "otel"
        ) as (host, standins):
            async with httpx.AsyncClient(base_url=host.base, timeout=30) as client:
                manage = OPERATOR
                event = (await client.post("/manage/events", headers=manage, json={
                    "name": "otel", "starts_at": "2020-01-01T00:00:00",
                    "ends_at": "2099-01-01T00:00:00", "time_zone": "UTC",
                    "max_token_cap": 50, "daily_request_cap": 2})).json()  # fmt: skip
                for url, priority in ((throttled.url, 1), (sim.url, 2)):
                    resource = await client.post("/manage/resources", headers=manage, json={
                        "name": url, "deployment": "gpt", "model_class": "openai-chat",
                        "endpoint": url, "api_key": "simkey", "priority": priority})  # fmt: skip
                    await client.put(
                        f"/manage/events/{event['id']}/resources/{resource.json()['id']}",
                        headers=manage,
                    )
                key = (await client.post(
                    f"/manage/events/{event['id']}/attendees", headers=manage, json={"user": "o"}
                )).json()["api_key"]  # fmt: skip
                path = "/openai/deployments/gpt/chat/completions?api-version=2024-10-21"
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
                answers = [
                    await client.post(path, json=body, headers={"api-key": key}) for _ in range(3)
                ]
                assert [a.status_code for a in answers] == [200, 200, 429]
            telemetry = standins.telemetry()
    finally:
        throttled.stop()
    upstream = [s for s in telemetry["spans"] if s["name"] == "upstream"]
    assert {s["attributes"]["aiproxy.event_id"] for s in upstream} == {event["id"]}
    assert {
        s["attributes"]["aiproxy.failure"] for s in upstream if "aiproxy.failure" in s["attributes"]
    } == {"throttled"}
    assert any(s["attributes"].get("http.response.status_code") == 200 for s in upstream)
    points = telemetry["metrics"]
    ok = [p for p in points["aiproxy.requests"] if p["attributes"]["event_id"] == event["id"]]
    assert sum(p["value"] for p in ok) == 2 and ok[0]["attributes"]["deployment"] == "gpt"
    tokens = [p for p in points["aiproxy.tokens"] if p["attributes"]["event_id"] == event["id"]]
    assert {p["attributes"]["kind"] for p in tokens} == {"prompt", "completion"}
    assert sum(p["value"] for p in points["aiproxy.failovers"]) >= 1
    refusals = [p for p in points["aiproxy.refusals"] if p["attributes"]["event_id"] == event["id"]]
    assert refusals[0]["attributes"]["code"] == "daily_request_cap_exceeded"


@pytest.mark.e2e  # the host stand-in's invocations and the worker's log
def test_client_that_hangs_up_while_sending_its_body_is_not_an_error(
    app_host: AppHost, event: EventSetup
) -> None:
    import socket

    host = app_host
    before = host.log().count("ERROR")
    earlier = host.unanswered()
    with socket.create_connection(("127.0.0.1", host.port)) as sock:
        sock.sendall(
            b"POST /api/openai/deployments/gpt-4o-mini/chat/completions HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"api-key: {event.key}\r\n".encode()
            + b"Content-Length: 100000\r\n\r\n"
            + b'{"messages": ['
        )
        running = wait_until(lambda: host.unanswered() - earlier)  # the call's invocation
    # The worker answered it, so its lines about the call are in the log.
    wait_until(lambda: not running & host.unanswered())
    assert host.log().count("ERROR") == before
    assert chat(host, event.key, "still here").status_code == 200
