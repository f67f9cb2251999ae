"""Upstream endpoints cannot aim the proxy inside: only https hosts of Azure AI services (and the
operator's own) are taken, on create, on change and before each call, and an upstream's
redirect is never followed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from shared.directory.endpoints import (
    ENDPOINT_FIX,
    EndpointPolicy,
    endpoint_problem,
    mcp_endpoint_problem,
    parse_hosts,
    webhook_problem,
)
from tests.harness import (
    CHAT,
    AppHost,
    EventSetup,
    Simulator,
    wait_until,
)

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
ON_AZURE = EndpointPolicy()  # as deployed: no extra hosts, no loopback

pytestmark = pytest.mark.e2e  # made and called through the host stand-in and the worker

REFUSED = [
    "http://contoso.openai.azure.com",  # not https
    "https://contoso.example.com",  # not an Azure AI service
    "https://openai.azure.com",  # the suffix itself, no resource
    "https://contoso.openai.azure.com.evil.example",
    "https://user@contoso.openai.azure.com",  # user-info
    "https://user:pw@contoso.openai.azure.com",
    "https://evil.example\\@contoso.openai.azure.com",
    "https://contoso.openai.azure.com:8443",  # a port of its own
    "https://contoso.openai.azure.com/openai?x=1",  # query
    "https://contoso.openai.azure.com/a/../b",  # a path that climbs
    "https://contoso.openai.azure.com/%2e%2e",
    "https://169.254.169.254",  # the platform's metadata service
    "https://10.0.0.4",
    "https://192.168.1.1",
    "https://127.0.0.1",
    "http://127.0.0.1:7080",  # loopback, not allowed here
    "https://localhost",
    "https://[::1]",
    "https://[::ffff:169.254.169.254]",  # IPv4-mapped IPv6
    "https://[fe80::1]",
    "https://2130706433",  # 127.0.0.1 as one decimal number
    "https://0x7f000001",  # ... as hex
    "https://0177.0.0.1",  # ... in octal
    "https://127.1",  # ... shortened
    "ftp://contoso.openai.azure.com",
]
TAKEN = [
    "https://contoso.openai.azure.com",
    "https://contoso.openai.azure.com:443",
    "https://contoso.cognitiveservices.azure.com/openai",
    "https://contoso.services.ai.azure.com/api/projects/p1",
    "https://contoso-search.search.windows.net",
]


@pytest.mark.parametrize("endpoint", REFUSED)
def test_an_endpoint_off_the_azure_ai_hosts_is_refused_in_every_spelling(endpoint: str) -> None:
    assert endpoint_problem(endpoint, ON_AZURE) is not None


@pytest.mark.parametrize("endpoint", TAKEN)
def test_the_azure_ai_service_hosts_are_taken(endpoint: str) -> None:
    assert endpoint_problem(endpoint, ON_AZURE) is None


def test_the_operator_adds_hosts_and_suffixes_with_their_ports_and_loopback() -> None:
    policy = EndpointPolicy(parse_hosts(("gw.contoso.com", ".apim.contoso.com:8443", "10.0.0.4")))
    assert endpoint_problem("https://gw.contoso.com/openai", policy) is None
    assert endpoint_problem("https://eu.apim.contoso.com:8443", policy) is None
    assert endpoint_problem("https://eu.apim.contoso.com", policy) is not None  # 443: not listed
    assert endpoint_problem("https://x.gw.contoso.com", policy) is not None  # exact host only
    assert endpoint_problem("https://10.0.0.4", policy) is not None  # IP literals stay refused
    loopback = EndpointPolicy(allow_loopback=True)
    for endpoint in ("http://127.0.0.1:7080", "http://localhost:7080", "http://[::1]:7080"):
        assert endpoint_problem(endpoint, loopback) is None
    for endpoint in ("http://10.0.0.4", "http://127.0.0.2:7080", "http://user@127.0.0.1:7080"):
        assert endpoint_problem(endpoint, loopback) is not None


def test_webhooks_and_mcp_servers_follow_one_public_host_rule() -> None:
    policy = EndpointPolicy()
    for url in (
        "https://hooks.corp.lan/x", "https://printer.local/x", "https://intranet/x",
        "https://[::1]/x", "https://0x7f.1/x", "https://meta.internal/x",
        "http://hooks.example.com/x", "https://user@hooks.example.com/x", "https://hooks.example.com/x#frag",
    ):  # fmt: skip
        assert webhook_problem(url, policy) is not None, url
        assert mcp_endpoint_problem(url, policy) is not None, url
    # Where they differ: a webhook may name any port and carry a query (its receiver's token).
    assert webhook_problem("https://hooks.example.com:8443/x/../y?token=1", policy) is None
    assert "port 443" in (mcp_endpoint_problem("https://mcp.example.com:8443/mcp", policy) or "")
    assert "query" in (mcp_endpoint_problem("https://mcp.example.com/mcp?token=1", policy) or "")
    loopback = EndpointPolicy(allow_loopback=True)
    assert webhook_problem("http://127.0.0.1:9000/hook", loopback) is None
    assert mcp_endpoint_problem("http://127.0.0.1:9000/mcp", loopback) is None


# --- through the worker -----------------------------------------------------------------------


def resource_body(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "probe",
        "deployment": "gpt-4o-mini",
        "model_class": "openai-chat",
        "endpoint": endpoint,
        "auth": "managed_identity",
        **extra,
    }


def refused_endpoint(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "endpoint"
    [detail] = error["details"]
    assert detail["field"] == "endpoint" and detail["fix"] == ENDPOINT_FIX
    return detail


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://169.254.169.254/metadata",
        "http://10.0.0.4:8080",
        "https://user@contoso.openai.azure.com",
        "https://contoso.example.com",
        "https://0x7f000001",
    ],
)
def test_a_resource_aimed_inside_is_refused_on_create(host: AppHost, endpoint: str) -> None:
    detail = refused_endpoint(host.manage.post("/resources", json=resource_body(endpoint)))
    assert ".openai.azure.com" in detail["fix"] and "AIPROXY_UPSTREAM_HOSTS" in detail["fix"]
    assert all(r["endpoint"] != endpoint for r in host.manage.get("/resources").json())


def test_a_resource_cannot_be_changed_to_aim_inside(host: AppHost, sim: Simulator) -> None:
    made = host.manage.post("/resources", json=resource_body(sim.url, auth="key", api_key="k"))
    assert made.status_code == 201, made.text
    path = f"/resources/{made.json()['id']}"
    refused_endpoint(host.manage.patch(path, json={"endpoint": "https://[::ffff:a9fe:a9fe]"}))
    assert host.manage.get(path).json()["endpoint"] == sim.url


def test_a_stored_resource_no_longer_allowed_is_not_called(
    app_host: AppHost, app_hosts: Any, sim: Simulator
) -> None:
    """Stored while loopback was allowed, then the app runs without it (another instance on
    the same storage): nothing is sent."""
    setup = EventSetup(app_host, sim)
    after = app_hosts("narrowed", AIPROXY_ALLOW_LOOPBACK_UPSTREAMS="false")
    sent = sim.stats()["total_requests"]
    answer = after.http.post(CHAT, json=BODY, headers={"api-key": setup.key})
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert error["code"] == "upstream_error"
    assert "not one this proxy may call" in error["message"]
    assert "127.0.0.1" not in answer.text and str(sim.port) not in answer.text
    assert sim.stats()["total_requests"] == sent
    [resource_id] = [r for r, v in setup.resources.items() if v["deployment"] == "gpt-4o-mini"]
    wait_until(lambda: f"resource {resource_id}: endpoint {sim.url}" in after.log(), 10)


# --- redirects ----------------------------------------------------------------------------------


class Recorder:
    """A loopback server that records every request it gets (path and headers) and answers
    like a chat deployment; or, with `redirect_to`, answers 302 to that URL."""

    def __init__(self, redirect_to: str = "") -> None:
        self.calls: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                recorder.calls.append({"path": self.path, "headers": dict(self.headers)})
                if redirect_to:
                    self.send_response(302)
                    self.send_header("location", redirect_to + self.path)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"choices": [], "usage": {"total_tokens": 0}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def redirect() -> Iterator[tuple[Recorder, Recorder]]:
    target = Recorder()
    redirector = Recorder(redirect_to=target.url)
    yield redirector, target
    redirector.stop()
    target.stop()


def test_an_upstream_redirect_is_not_followed_nor_passed_on(
    host: AppHost, sim: Simulator, redirect: tuple[Recorder, Recorder]
) -> None:
    redirector, target = redirect
    setup = EventSetup(host, sim)
    for resource_id, resource in setup.resources.items():
        if resource["deployment"] == "gpt-4o-mini":  # before any call: nothing cached yet
            detached = host.manage.delete(f"/events/{setup.id}/resources/{resource_id}")
            assert detached.status_code in (200, 204), detached.text
    setup.add_resource(redirector.url, "gpt-4o-mini", "openai-chat", api_key="upstream-secret")

    answer = host.http.post(CHAT, json=BODY, headers={"api-key": setup.key})
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "upstream_error"
    assert "location" not in answer.headers and target.url not in answer.text
    [call] = redirector.calls
    assert call["headers"]["api-key"] == "upstream-secret"
    assert target.calls == []  # the upstream's key went nowhere else


def test_an_upstream_redirect_fails_over_like_a_server_error(
    host: AppHost, sim: Simulator, redirect: tuple[Recorder, Recorder]
) -> None:
    redirector, target = redirect
    setup = EventSetup(host, sim)  # its gpt-4o-mini on the simulator, priority 1
    setup.add_resource(redirector.url, "gpt-4o-mini", "openai-chat", priority=0)
    sent = sim.stats()["total_requests"]
    answer = host.http.post(CHAT, json=BODY, headers={"api-key": setup.key})
    assert answer.status_code == 200, answer.text
    assert len(redirector.calls) == 1 and target.calls == []
    assert sim.stats()["total_requests"] == sent + 1
