"""MCP servers behind the attendee's key, through the worker: the official MCP Python SDK's
client against /api/mcp/{name}, and the same SDK's server (local/mcpserver.py) behind it.

Covers the streamable HTTP transport (JSON and event-stream answers, progress and log
notifications relayed), the allowed tools (listed and called), sessions across two app
instances and sealed to their attendee, limits and the event's window on tool calls, the usage
record of every tool call, and hostile input.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import ElicitResult

from tests.harness import (
    AppHost,
    EventSetup,
    Process,
    Simulator,
    Storage,
    listening,
    wait_until,
    window,
)

pytestmark = pytest.mark.e2e

TOKEN = "mcp-server-token-for-tests"
ALLOWED = ["add", "slow", "spell", "ask", "fail", "hold"]
PROTOCOL = "2025-06-18"


class McpServer:
    """local/mcpserver.py in a process of its own on 127.0.0.1."""

    def __init__(self, log_dir: Path, *, json_response: bool = False) -> None:
        args = [sys.executable, "-m", "local.mcpserver", "--port", "0"]
        args += ["--token", TOKEN] + (["--json"] if json_response else [])
        name = "json" if json_response else "sse"
        self.proc = Process(args, {**__import__("os").environ}, log_dir / f"mcp-{name}.log")
        self.port = listening(self.proc, r"mcp server on http://127\.0\.0\.1:(\d+)/")
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.port}/_stats").json()

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="module")
def mcp_sse(log_dir: Path) -> Iterator[McpServer]:
    server = McpServer(log_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mcp_json(log_dir: Path) -> Iterator[McpServer]:
    server = McpServer(log_dir, json_response=True)
    yield server
    server.stop()


def mcp_event(host: AppHost, sim: Simulator, sse: McpServer, json: McpServer, **fields: Any):
    setup = EventSetup(host, sim, **fields)
    auth = {"auth": "bearer", "api_key": TOKEN}
    setup.add_resource(sse.url, "tools", "mcp", allowed_tools=ALLOWED, **auth)
    setup.add_resource(json.url, "jsontools", "mcp", **auth)
    return setup


@pytest.fixture(scope="module")
def setup(app_host: AppHost, sim: Simulator, mcp_sse: McpServer, mcp_json: McpServer):
    return mcp_event(app_host, sim, mcp_sse, mcp_json)


def client(host: AppHost, name: str, key: str, http: httpx2.AsyncClient) -> Client:
    transport = streamable_http_client(f"{host.base}/mcp/{name}", http_client=http)
    return Client(transport, mode="legacy")


def keyed(key: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)


def rpc(method: str, params: dict[str, Any] | None = None, id: int | None = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    if id is not None:
        message["id"] = id
    return message


HEADERS = {"accept": "application/json, text/event-stream", "mcp-protocol-version": PROTOCOL}
INIT = {
    "protocolVersion": PROTOCOL,
    "capabilities": {},
    "clientInfo": {"name": "raw", "version": "1"},
}


def open_session(host: AppHost, name: str, key: str) -> str:
    """initialize and initialized over plain HTTP; the sealed session id."""
    headers = {**HEADERS, "authorization": f"Bearer {key}"}
    answer = host.http.post(f"/mcp/{name}", json=rpc("initialize", INIT), headers=headers)
    assert answer.status_code == 200, answer.text
    session = answer.headers["mcp-session-id"]
    headers["mcp-session-id"] = session
    done = host.http.post(f"/mcp/{name}", json=rpc("notifications/initialized", id=None),
                          headers=headers)  # fmt: skip
    assert done.status_code == 202, done.text
    return session


def sse_messages(text: str) -> list[dict[str, Any]]:
    import json

    found = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(
            line[5:].lstrip() for line in event.split("\n") if line.startswith("data:")
        )
        if data:
            found.append(json.loads(data))
    return found


# --- the SDK's client through the proxy ------------------------------------------------------


def test_sdk_lists_only_the_allowed_tools_and_calls_them(
    app_host: AppHost, setup: EventSetup, mcp_sse: McpServer, storage: Storage
) -> None:
    async def run() -> tuple[list[str], Any, list[float], Any, list[str]]:
        progress: list[float] = []
        logged: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        async with keyed(setup.key) as http, client(app_host, "tools", setup.key, http) as mcp:
            tools = [t.name for t in (await mcp.list_tools()).tools]
            added = await mcp.call_tool("add", {"a": 2, "b": 40})
            slow = await mcp.call_tool("slow", {"steps": 4}, progress_callback=on_progress)
            return tools, added, progress, slow, logged

    tools, added, progress, slow, _ = asyncio.run(run())
    assert sorted(tools) == sorted(ALLOWED)  # 'secret' is the server's, not the event's
    assert added.content[0].text == "42" and not added.is_error
    assert progress == [1, 2, 3, 4]  # every progress notification came through
    assert slow.content[0].text == "done in 4 steps"
    assert mcp_sse.stats()["attendee_keys"] == 0  # the attendee's key never went upstream
    rows = storage.usage(setup.id, expect=2)
    calls = [r for r in rows if r["model_class"] == "mcp"]
    assert [(r["deployment"], r["tool"], r["outcome"]) for r in calls] == [
        ("tools", "add", "ok"),
        ("tools", "slow", "ok"),
    ]
    assert all(r["attendee_id"] == setup.attendee["id"] and r["streamed"] for r in calls)
    assert calls[1]["latency_ms"] >= calls[0]["latency_ms"]


def test_events_are_relayed_as_they_arrive(app_host: AppHost, setup: EventSetup,
                                          mcp_sse: McpServer) -> None:  # fmt: skip
    """The tool waits until the client saw its progress: a relay that held the events back until
    the answer's end would leave it waiting until it gives up ("timed out")."""

    async def run() -> Any:
        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            async with httpx.AsyncClient() as plain:
                await plain.post(f"http://127.0.0.1:{mcp_sse.port}/_release")

        async with keyed(setup.key) as http, client(app_host, "tools", setup.key, http) as mcp:
            return await mcp.call_tool("hold", {}, progress_callback=on_progress)

    assert asyncio.run(run()).content[0].text == "released"


def test_a_server_that_goes_silent_ends_the_tool_call_with_a_reason(
    app_host: AppHost, setup: EventSetup, storage: Storage
) -> None:
    """The proxy cuts a stream the server leaves silent past the idle limit (3 s here): the
    client's call ends with a JSON-RPC error saying so, not with a stream that just stops."""

    async def run() -> Any:
        async with keyed(setup.key) as http, client(app_host, "tools", setup.key, http) as mcp:
            return await mcp.call_tool("hold", {})  # never released: silent after its progress

    with pytest.raises(Exception) as raised:
        asyncio.run(run())
    # The SDK's task group wraps what the call raised.
    found = [raised.value]
    while isinstance(found[-1], BaseExceptionGroup):
        found.append(found[-1].exceptions[0])
    assert "MCP server stopped answering" in str(found[-1]), found

    def cut() -> list[dict[str, Any]]:
        rows = storage.rows("usage", f"event_id eq '{setup.id}'")
        return [r for r in rows if r.get("tool") == "hold" and r["outcome"] == "cut"]

    assert wait_until(cut)


def test_a_tool_that_streams_log_messages_and_a_tool_error(
    app_host: AppHost, setup: EventSetup, storage: Storage
) -> None:
    async def run() -> tuple[list[str], Any, Any]:
        logged: list[str] = []

        async def on_log(params: Any) -> None:
            logged.append(params.data)

        async with keyed(setup.key) as http:
            transport = streamable_http_client(f"{app_host.base}/mcp/tools", http_client=http)
            async with Client(transport, mode="legacy", logging_callback=on_log) as mcp:
                spelled = await mcp.call_tool("spell", {"word": "mcp"})
                failed = await mcp.call_tool("fail", {})
                return logged, spelled, failed

    logged, spelled, failed = asyncio.run(run())
    assert logged == ["m", "c", "p"] and spelled.content[0].text == "MCP"
    assert failed.is_error

    def outcomes() -> set[tuple[str, str]]:
        rows = storage.rows("usage", f"event_id eq '{setup.id}'")
        return {(r["tool"], r["outcome"]) for r in rows if r["model_class"] == "mcp"}

    wait_until(lambda: {("spell", "ok"), ("fail", "tool_error")} <= outcomes())
    assert ("fail", "ok") not in outcomes()
    # The organiser's report: tool calls by attendee, server and tool.
    report = app_host.manage.get(f"/events/{setup.id}/toolcalls")
    assert report.status_code == 200, report.text
    rows = {(r["user"], r["deployment"], r["tool"]): r for r in report.json()}
    failing = rows[("attendee@example.com", "tools", "fail")]
    assert (failing["calls"], failing["ok"], failing["failed"]) == (1, 0, 1)
    assert rows[("attendee@example.com", "tools", "spell")]["ok"] >= 1
    assert all(r["average_ms"] > 0 and r["last"] for r in rows.values())


def test_the_servers_own_requests_reach_the_client_and_its_answers_the_server(
    app_host: AppHost, setup: EventSetup
) -> None:
    async def run() -> tuple[list[str], Any]:
        asked: list[str] = []

        async def on_elicit(context: Any, params: Any) -> Any:
            asked.append(params.message)
            return ElicitResult(action="accept", content={"name": "Ada"})

        async with keyed(setup.key) as http:
            transport = streamable_http_client(f"{app_host.base}/mcp/tools", http_client=http)
            async with Client(transport, mode="legacy", elicitation_callback=on_elicit) as mcp:
                return asked, await mcp.call_tool("ask", {"question": "Your name?"})

    asked, answer = asyncio.run(run())
    assert asked == ["Your name?"]
    assert answer.content[0].text == "hello Ada"


def test_the_get_stream_is_the_servers_own(app_host: AppHost, setup: EventSetup) -> None:
    session = open_session(app_host, "tools", setup.key)
    headers = {"authorization": f"Bearer {setup.key}", "mcp-session-id": session,
               "accept": "text/event-stream", "mcp-protocol-version": PROTOCOL}  # fmt: skip
    with app_host.http.stream("GET", "/mcp/tools", headers=headers) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
    no_session = {**headers}
    no_session.pop("mcp-session-id")
    answer = app_host.http.delete("/mcp/tools", headers=no_session)
    assert answer.status_code == 400
    assert answer.json()["error"]["data"]["code"] == "invalid_request"


def test_json_answers_are_filtered_and_recorded_too(
    app_host: AppHost, sim: Simulator, mcp_sse: McpServer, mcp_json: McpServer, storage: Storage
) -> None:
    setup = EventSetup(app_host, sim)
    setup.add_resource(mcp_json.url, "plain", "mcp", auth="bearer", api_key=TOKEN,
                       allowed_tools=["add"])  # fmt: skip

    async def run() -> tuple[list[str], Any]:
        async with keyed(setup.key) as http, client(app_host, "plain", setup.key, http) as mcp:
            tools = [t.name for t in (await mcp.list_tools()).tools]
            return tools, await mcp.call_tool("add", {"a": 1, "b": 1})

    tools, added = asyncio.run(run())
    assert tools == ["add"] and added.content[0].text == "2"
    rows = [r for r in storage.usage(setup.id, expect=1) if r["model_class"] == "mcp"]
    assert [(r["tool"], r["outcome"], r["streamed"]) for r in rows] == [("add", "ok", False)]


def test_a_tool_not_allowed_is_a_json_rpc_error_naming_it_and_never_sent(
    app_host: AppHost, setup: EventSetup, mcp_sse: McpServer
) -> None:
    session = open_session(app_host, "tools", setup.key)
    before = mcp_sse.stats()["requests"]
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}", "mcp-session-id": session}
    answer = app_host.http.post(
        "/mcp/tools", json=rpc("tools/call", {"name": "secret", "arguments": {}}, 7),
        headers=headers,
    )  # fmt: skip
    assert answer.status_code == 403
    error = answer.json()
    assert error["id"] == 7 and error["error"]["code"] == -32602
    assert error["error"]["data"]["code"] == "tool_not_allowed"
    assert "'secret'" in error["error"]["message"] and "add" in error["error"]["message"]
    assert mcp_sse.stats()["requests"] == before

    async def via_sdk() -> str:
        async with keyed(setup.key) as http, client(app_host, "tools", setup.key, http) as mcp:
            try:
                await mcp.call_tool("secret", {})
            except Exception as error:  # the SDK raises the JSON-RPC error
                return str(error)
            return ""

    assert "Tool 'secret' is not offered at this event" in asyncio.run(via_sdk())


# --- sessions -------------------------------------------------------------------------------


def test_a_session_continues_on_another_instance(
    app_host: AppHost, second_host: AppHost, setup: EventSetup
) -> None:
    session = open_session(app_host, "tools", setup.key)
    assert session.startswith("aipmcp1.")
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}", "mcp-session-id": session}
    answer = second_host.http.post(
        "/mcp/tools", json=rpc("tools/call", {"name": "add", "arguments": {"a": 5, "b": 6}}, 3),
        headers=headers,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    (result,) = [m for m in sse_messages(answer.text) if m.get("id") == 3]
    assert result["result"]["content"][0]["text"] == "11"
    seed = second_host.http.post(  # the seed layout's /api/v1 serves it too
        "/v1/mcp/tools", json=rpc("tools/call", {"name": "add", "arguments": {"a": 1, "b": 1}}, 4),
        headers=headers,
    )  # fmt: skip
    assert seed.status_code == 200 and '"2"' in seed.text
    ended = second_host.http.delete("/mcp/tools", headers=headers)
    assert ended.status_code == 200, ended.text
    again = app_host.http.post("/mcp/tools", json=rpc("tools/list", {}, 4), headers=headers)
    assert again.status_code == 404  # the server ended it


def test_another_attendees_session_id_is_refused(
    app_host: AppHost, setup: EventSetup, mcp_sse: McpServer
) -> None:
    session = open_session(app_host, "tools", setup.key)
    other = setup.add_attendee("other@example.com")["api_key"]
    before = mcp_sse.stats()["requests"]
    for sealed in (session, session[:-4] + "AAAA", "plain-upstream-id"):
        headers = {**HEADERS, "authorization": f"Bearer {other}", "mcp-session-id": sealed}
        answer = app_host.http.post("/mcp/tools", json=rpc("tools/list", {}, 9), headers=headers)
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["data"]["code"] == "session_not_found"
        assert answer.json()["id"] == 9
    assert mcp_sse.stats()["requests"] == before


# --- limits and the window ------------------------------------------------------------------


def test_tool_calls_count_against_the_daily_cap(
    app_host: AppHost, sim: Simulator, mcp_sse: McpServer, mcp_json: McpServer
) -> None:
    setup = mcp_event(app_host, sim, mcp_sse, mcp_json, daily_request_cap=2)

    async def run() -> tuple[list[str], str]:
        async with keyed(setup.key) as http, client(app_host, "tools", setup.key, http) as mcp:
            await mcp.list_tools()  # not a tool call: not counted
            answers = [(await mcp.call_tool("add", {"a": i, "b": 0})).content[0].text
                       for i in range(2)]  # fmt: skip
            try:
                await mcp.call_tool("add", {"a": 9, "b": 9})
            except Exception as error:  # the SDK raises the JSON-RPC error
                return answers, str(error)
            return answers, ""

    answers, refused = asyncio.run(run())
    assert answers == ["0", "1"]
    assert "today's 2 requests" in refused
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}"}
    session = open_session(app_host, "tools", setup.key)
    answer = app_host.http.post(
        "/mcp/tools", json=rpc("tools/call", {"name": "add", "arguments": {"a": 1, "b": 1}}),
        headers={**headers, "mcp-session-id": session},
    )  # fmt: skip
    assert answer.status_code == 429
    assert answer.json()["error"]["data"]["code"] == "daily_request_cap_exceeded"


def test_tool_calls_count_against_the_per_minute_limit(
    app_host: AppHost, sim: Simulator, mcp_sse: McpServer, mcp_json: McpServer
) -> None:
    setup = mcp_event(app_host, sim, mcp_sse, mcp_json, requests_per_minute=2)
    session = open_session(app_host, "jsontools", setup.key)
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}", "mcp-session-id": session}
    listed = [app_host.http.post("/mcp/jsontools", json=rpc("tools/list", {}, i), headers=headers)
              for i in range(3)]  # fmt: skip
    assert [a.status_code for a in listed] == [200, 200, 200]  # listing is free
    call = rpc("tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}}, 5)
    answers = [app_host.http.post("/mcp/jsontools", json=call, headers=headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    refused = answers[2]
    assert refused.json()["error"]["data"]["code"] == "rate_limit_exceeded"
    assert refused.json()["id"] == 5 and int(refused.headers["retry-after"]) >= 1


def test_the_event_window_applies(
    app_host: AppHost, sim: Simulator, mcp_sse: McpServer, mcp_json: McpServer
) -> None:
    setup = mcp_event(app_host, sim, mcp_sse, mcp_json, **window(hours_before=1, hours_after=1))
    over = app_host.manage.patch(f"/events/{setup.id}", json=window(48, -24))
    assert over.status_code == 200, over.text
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}"}

    def refused() -> bool:
        answer = app_host.http.post("/mcp/tools", json=rpc("initialize", INIT), headers=headers)
        return answer.status_code == 403 and answer.json()["error"]["data"]["code"] == "event_ended"

    wait_until(refused)


# --- hostile input ----------------------------------------------------------------------------


def test_a_code_key_as_api_key_and_a_session_sealed_to_its_attendee(
    app_host: AppHost, sim: Simulator, mcp_sse: McpServer, mcp_json: McpServer
) -> None:
    setup = mcp_event(app_host, sim, mcp_sse, mcp_json, shared_code="mcp-workshop-code")
    code_key = f"{setup.id}@mcp-workshop-code/ada@example.com"
    headers = {**HEADERS, "api-key": code_key}
    init = app_host.http.post("/mcp/tools", json=rpc("initialize", INIT), headers=headers)
    assert init.status_code == 200, init.text
    session = init.headers["mcp-session-id"]
    call = rpc("tools/call", {"name": "add", "arguments": {"a": 3, "b": 4}}, 2)
    answer = app_host.http.post("/mcp/tools", json=call,
                                headers={**headers, "mcp-session-id": session})  # fmt: skip
    assert answer.status_code == 200 and '"7"' in answer.text
    # The event key's attendee is another attendee: the code key's session is not its own.
    other = {**HEADERS, "api-key": setup.key, "mcp-session-id": session}
    refused = app_host.http.post("/mcp/tools", json=call, headers=other)
    assert refused.status_code == 404


def test_wrong_keys_and_unknown_servers(app_host: AppHost, setup: EventSetup) -> None:
    answer = app_host.http.post(
        "/mcp/tools", json=rpc("initialize", INIT), headers={**HEADERS, "authorization": "Bearer x"}
    )
    assert answer.status_code == 401
    assert answer.json()["error"]["data"]["code"] == "invalid_api_key"
    headers = {**HEADERS, "api-key": setup.key}
    answer = app_host.http.post("/mcp/nope", json=rpc("initialize", INIT), headers=headers)
    assert answer.status_code == 404 and "tools" in answer.json()["error"]["message"]
    chat = app_host.http.post("/mcp/gpt-4o-mini", json=rpc("initialize", INIT), headers=headers)
    assert chat.status_code == 404  # a model is no MCP server


@pytest.mark.parametrize(
    ("body", "status", "rpc_code"),
    [
        (b"{not json", 400, -32700),
        (b'[{"jsonrpc": "2.0", "method": "tools/list", "id": 1}]', 400, -32600),
        (b'{"jsonrpc": "1.0", "method": "tools/list", "id": 1}', 400, -32600),
        (b'{"jsonrpc": "2.0", "method": 5, "id": 1}', 400, -32600),
        (b'{"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": []}', 400, -32600),
        (b'{"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": {}}', 400, -32600),
        (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "x"}', 400, -32600),
        (b"x" * (4 * 1024 * 1024 + 1), 413, -32600),
    ],
)
def test_malformed_messages_are_json_rpc_errors(
    app_host: AppHost, setup: EventSetup, body: bytes, status: int, rpc_code: int
) -> None:
    session = open_session(app_host, "tools", setup.key)
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}", "mcp-session-id": session,
               "content-type": "application/json"}  # fmt: skip
    answer = app_host.http.post("/mcp/tools", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == rpc_code
    assert answer.json()["jsonrpc"] == "2.0"


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://10.0.0.5/mcp",
        "https://169.254.169.254/mcp",
        "https://intranet/mcp",
        "https://tools.internal/mcp",
        "https://mcp.example.local/mcp",
        "https://mcp.contoso.com:8443/mcp",
        "http://mcp.contoso.com/mcp",
        "https://[fe80::1]/mcp",
        "https://user@mcp.contoso.com/mcp",
    ],
)
def test_private_or_odd_endpoints_are_refused(app_host: AppHost, endpoint: str) -> None:
    body = {"name": "t", "deployment": "t", "model_class": "mcp", "endpoint": endpoint,
            "auth": "none"}  # fmt: skip
    answer = app_host.manage.post("/resources", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "endpoint"


def test_names_are_resolved_to_public_addresses_only() -> None:
    from shared.upstreams.client import PublicResolver

    async def resolve(allow_loopback: bool) -> Any:
        resolver = PublicResolver(allow_loopback)
        try:
            return await resolver.resolve("localhost", 443)
        finally:
            await resolver.close()

    with pytest.raises(OSError, match="no public address"):
        asyncio.run(resolve(False))
    assert asyncio.run(resolve(True))  # loopback only where the operator allows it


def test_a_key_goes_as_api_key_and_a_refused_credential_is_the_organisers(
    app_host: AppHost, sim: Simulator, mcp_sse: McpServer
) -> None:
    setup = EventSetup(app_host, sim)
    setup.add_resource(mcp_sse.url, "keyed", "mcp", auth="key", api_key=TOKEN)
    setup.add_resource(mcp_sse.url, "wrong", "mcp", auth="bearer", api_key="not-the-token")
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}"}
    before = mcp_sse.stats()["api-key"]
    answer = app_host.http.post("/mcp/keyed", json=rpc("initialize", INIT), headers=headers)
    assert answer.status_code == 200, answer.text
    assert mcp_sse.stats()["api-key"] == before + 1
    # A server that refuses the proxy's credential: the organiser's to fix, and never a 401
    # that would send the attendee's client to sign in.
    answer = app_host.http.post("/mcp/wrong", json=rpc("initialize", INIT), headers=headers)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["data"]["code"] == "upstream_error"
    assert "organiser" in answer.json()["error"]["message"]


def test_a_stored_entry_the_policy_no_longer_allows_is_never_called(
    app_hosts: Any, setup: EventSetup, mcp_sse: McpServer
) -> None:
    # The same storage, an instance that allows no loopback: the entry on 127.0.0.1 is now a
    # private endpoint, refused before anything is sent.
    strict = app_hosts("strict", AIPROXY_ALLOW_LOOPBACK_UPSTREAMS="false")
    before = mcp_sse.stats()["requests"]
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}"}
    answer = strict.http.post("/mcp/tools", json=rpc("initialize", INIT, 5), headers=headers)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["data"]["code"] == "upstream_error"
    assert answer.json()["id"] == 5
    assert "127.0.0.1" not in answer.text  # the attendee is not told where it points
    assert mcp_sse.stats()["requests"] == before


def test_the_cli_adds_an_mcp_server(app_host: AppHost, mcp_sse: McpServer) -> None:
    from tests.test_cli import cli, ok

    args = ("resources", "add", "--name", "Workshop tools", "--deployment", "cli-tools",
            "--model-class", "mcp", "--url", mcp_sse.url, "--auth", "bearer", "--api-key", "-",
            "--allowed-tools", "add, slow")  # fmt: skip
    resource_id = ok(cli(app_host, *args, stdin=TOKEN + "\n")).strip()
    created = app_host.manage.get(f"/resources/{resource_id}").json()
    assert (created["model_class"], created["auth"], created["allowed_tools"]) == (
        "mcp", "bearer", ["add", "slow"],
    )  # fmt: skip
    assert created["has_api_key"] and "api_key" not in created


def test_mcp_fields_are_checked(app_host: AppHost) -> None:
    base = {"name": "t", "deployment": "t", "model_class": "mcp",
            "endpoint": "https://mcp.contoso.com/mcp"}  # fmt: skip
    public = app_host.manage.post("/resources", json={**base, "auth": "none"})
    assert public.status_code == 201, public.text
    assert public.json()["allowed_tools"] is None
    bearer = app_host.manage.post("/resources", json={**base, "auth": "bearer"})
    assert bearer.status_code == 400 and bearer.json()["error"]["param"] == "api_key"
    bad_tool = {**base, "auth": "none", "allowed_tools": ["ok", "no spaces"]}
    assert app_host.manage.post("/resources", json=bad_tool).status_code == 400
    chat = {**base, "model_class": "openai-chat", "endpoint": "https://x.openai.azure.com",
            "auth": "bearer", "api_key": "k"}  # fmt: skip
    answer = app_host.manage.post("/resources", json=chat)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "auth"
    tools = {**chat, "auth": "key", "allowed_tools": ["a"]}
    answer = app_host.manage.post("/resources", json=tools)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "allowed_tools"


# --- the Responses API's mcp tool, with the proxy's MCP URL --------------------------------


def test_a_responses_call_with_an_mcp_tool_pointed_at_the_proxy(
    app_host: AppHost, setup: EventSetup, storage: Storage
) -> None:
    from openai import OpenAI

    openai = OpenAI(base_url=f"{app_host.base}/openai/v1", api_key=setup.key)
    tool = {
        "type": "mcp", "server_label": "tools", "server_url": f"{app_host.base}/mcp/tools",
        "headers": {"Authorization": f"Bearer {setup.key}"}, "require_approval": "never",
    }  # fmt: skip
    asked = 'What is 2 + 40? [mcp:add {"a": 2, "b": 40}] [mcp:secret {}]'
    response = openai.responses.create(model="gpt-4o-mini", input=asked, tools=[tool])
    kinds = [item.type for item in response.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"]  # 'secret' is not listed
    listing, call = response.output[0], response.output[1]
    assert sorted(t.name for t in listing.tools) == sorted(ALLOWED) and listing.error is None
    assert (call.name, call.arguments, call.output, call.error) == (
        "add", '{"a": 2, "b": 40}', "42", None,
    )  # fmt: skip

    streamed = openai.responses.create(
        model="gpt-4o-mini", input='[mcp:spell {"word": "ok"}]', tools=[tool], stream=True
    )
    done = [e.item for e in streamed if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["mcp_list_tools", "mcp_call", "message"]
    assert done[1].output == "OK"

    wrong = {**tool, "headers": {"Authorization": "Bearer aip-wrong"}}
    refused = openai.responses.create(model="gpt-4o-mini", input="hi", tools=[wrong])
    assert refused.output[0].type == "mcp_list_tools" and refused.output[0].error

    def recorded() -> set[tuple[str, str]]:
        rows = storage.rows("usage", f"event_id eq '{setup.id}'")
        return {(r["tool"], r["outcome"]) for r in rows if r["model_class"] == "mcp"}

    wait_until(lambda: {("add", "ok"), ("spell", "ok")} <= recorded())


def test_every_tools_list_on_a_stream_is_filtered() -> None:
    """A resumed stream (GET with Last-Event-ID) may carry an earlier tools/list answer, and a
    server may end without the last blank line: neither passes the allowed tools unfiltered."""
    import json

    from shared.pipeline.mcp import McpMeter, ToolFilter

    listing = {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {"tools": [{"name": "add"}, {"name": "secret"}]},
    }
    event = b"id: 1\r\nevent: message\r\ndata: " + json.dumps(listing).encode()
    meter = McpMeter(None, ToolFilter(["add"]), lambda message: None)
    out = meter.feed(b": ping\r\n\r\n" + event[:20]) + meter.feed(event[20:] + b"\r\n\r\n")
    assert b"secret" not in out and b'"add"' in out and b"id: 1" in out and b": ping" in out
    meter = McpMeter(7, ToolFilter(["add"]), lambda message: None)
    out = meter.feed(event) + meter.rest()  # no blank line at the end
    assert b"secret" not in out and meter.done
    everything = McpMeter(None, ToolFilter(None), lambda message: None)
    assert everything.feed(event + b"\n\n") == event + b"\n\n"  # untouched without a list


def test_the_operator_narrows_mcp_hosts() -> None:
    from shared.directory.endpoints import EndpointPolicy, mcp_endpoint_problem, parse_hosts

    anywhere = EndpointPolicy()
    assert mcp_endpoint_problem("https://mcp.contoso.com/mcp", anywhere) is None
    assert mcp_endpoint_problem("https://mcp.contoso.com:8443/mcp", anywhere)
    assert mcp_endpoint_problem("https://127.0.0.1:8443/mcp", anywhere)  # loopback not allowed
    listed = EndpointPolicy(mcp_hosts=parse_hosts((".tools.example.org", "mcp.contoso.com:8443")))
    assert mcp_endpoint_problem("https://a.tools.example.org/mcp", listed) is None
    assert mcp_endpoint_problem("https://mcp.contoso.com:8443/mcp", listed) is None
    assert "operator allows" in (mcp_endpoint_problem("https://other.com/mcp", listed) or "")
    assert mcp_endpoint_problem("https://mcp.contoso.com/mcp", listed)  # only its listed port


def test_the_sdks_default_mode_works_through_the_proxy(
    app_host: AppHost, sim: Simulator, mcp_sse: McpServer, mcp_json: McpServer, storage: Storage
) -> None:
    """The SDK's default: it probes server/discover (the 2026-07-28 revision's stateless
    envelope) and falls back to the initialize handshake; either way through the proxy."""
    setup = mcp_event(app_host, sim, mcp_sse, mcp_json)

    async def run() -> tuple[list[str], Any]:
        async with keyed(setup.key) as http:
            transport = streamable_http_client(f"{app_host.base}/mcp/tools", http_client=http)
            async with Client(transport) as mcp:
                tools = [t.name for t in (await mcp.list_tools()).tools]
                return tools, await mcp.call_tool("add", {"a": 20, "b": 22})

    def adds() -> int:
        rows = storage.rows("usage", f"event_id eq '{setup.id}'")
        return sum(1 for r in rows if r["model_class"] == "mcp" and r["tool"] == "add")

    tools, added = asyncio.run(run())
    assert sorted(tools) == sorted(ALLOWED)
    assert added.content[0].text == "42"
    wait_until(lambda: adds() == 1)  # governed and recorded in either mode


# --- the pages (last: the browser leaves an event loop running in this thread) --------------------------------------------------------------------------------


@pytest.mark.browser
def test_the_playground_lists_the_events_tools_and_the_console_its_servers_and_calls(
    app_host: AppHost, sim: Simulator, mcp_sse: McpServer, mcp_json: McpServer, browser: Any
) -> None:
    from tests.browser import tab
    from tests.harness import OPERATOR_KEY

    setup = mcp_event(app_host, sim, mcp_sse, mcp_json, name="Agents lab")
    session = open_session(app_host, "tools", setup.key)
    headers = {**HEADERS, "authorization": f"Bearer {setup.key}", "mcp-session-id": session}
    call = rpc("tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}}, 2)
    assert app_host.http.post("/mcp/tools", json=call, headers=headers).status_code == 200

    with tab(browser) as opened:
        page = opened.page
        opened.connect(app_host.base, setup.key)
        tools = page.locator('#mcp-servers [data-server="tools"] li[data-tool]')
        wait_until(lambda: sorted(tools.evaluate_all("items => items.map((li) => li.dataset.tool)"))
                   == sorted(ALLOWED))  # fmt: skip
        json_tools = page.locator('#mcp-servers [data-server="jsontools"] li[data-tool]')
        names = "items => items.map((li) => li.dataset.tool)"
        wait_until(lambda: "secret" in json_tools.evaluate_all(names))  # every tool: no list
        assert f"{app_host.base}/mcp/tools" in opened.text("#tools-card")
        opened.screenshot("playground-mcp")
        opened.assert_clean()

    with tab(browser) as opened:
        page = opened.page
        opened.sign_in(app_host.base, OPERATOR_KEY)
        page.click(f"#event-list button[data-event-id='{setup.id}']")
        page.wait_for_selector("#event-view:not([hidden])")
        details = page.locator('#catalog-rows [data-tools="tools"]')
        details.wait_for()
        assert "Tools: add, slow, spell, ask, fail, hold" in details.inner_text()
        assert f"{app_host.base}/mcp/tools" in details.inner_text()
        assert "every tool" in page.locator('#catalog-rows [data-tools="jsontools"]').inner_text()
        page.click("#tab-usage")
        row = page.locator("#toolcall-rows tr[data-tool='add']")
        row.wait_for()
        cells = row.locator("td").all_inner_texts()
        assert cells[:5] == ["attendee@example.com", "tools", "add", "1", "1"]
        opened.screenshot("console-mcp")
        opened.assert_clean()


def test_an_event_larger_than_the_proxy_relays_ends_the_request_with_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared.pipeline import mcp as proxy_mcp

    monkeypatch.setattr(proxy_mcp, "MAX_EVENT_BYTES", 100)
    answered: dict[str, Any] = {}
    meter = proxy_mcp.McpMeter(7, proxy_mcp.ToolFilter(None), answered.update)
    out = meter.feed(b"event: message\ndata: " + b"x" * 200)  # no end of event in sight
    assert meter.done and answered["id"] == 7
    assert answered["error"]["data"] == {"code": "upstream_error", "status": 502}
    sent = json.loads(out.split(b"data: ", 1)[1])
    assert sent == answered and "larger than the proxy relays" in sent["error"]["message"]
    assert meter.cut("late") == b""  # answered once: a cut after it adds nothing
