"""Budget alerts: each threshold fires once across two instances racing to it, POSTed to the
organiser's webhook with an HMAC-SHA256 signature that verifies, and listed for the console."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest

from local.azurite import Azurite
from tests.harness import CHAT, AppHost, EventSetup, Simulator, chat, host_env, wait_until

pytestmark = pytest.mark.e2e

SMALL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}


class Receiver:
    """A webhook receiver on loopback that keeps what it was sent."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/budget"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.close()


def test_each_threshold_fires_once_across_two_instances_and_is_signed(
    host: AppHost, second_host: AppHost, sim: Simulator, receiver: Receiver
) -> None:
    probe = EventSetup(host, sim)
    usage = chat(host, probe.key, SMALL).json()["usage"]
    one = usage["prompt_tokens"] * 150 + usage["completion_tokens"] * 600  # gpt-4o-mini
    budget = 8 * one
    setup = EventSetup(
        host, sim, budget=str(Decimal(budget) / 10**9), budget_alerts="25,50,100",
        alert_webhook_url=receiver.url,
    )  # fmt: skip
    secret = host.manage.post(f"/events/{setup.id}/alerts/secret").json()["secret"]
    assert secret.startswith("whsec_")
    keys = [setup.key] + [setup.add_attendee(f"p{n}@example.com")["api_key"] for n in range(3)]
    clients = [httpx.Client(base_url=h.base, timeout=30) for h in (host, second_host)]
    try:
        refused = 0
        for n in range(40):  # both instances in turn, until the budget refuses
            answer = clients[n % 2].post(CHAT, json=SMALL, headers={"api-key": keys[n % 4]})
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "event_budget_exhausted"
                refused += 1
                if refused >= 4:
                    break
            else:
                assert answer.status_code == 200, answer.text
    finally:
        for client in clients:
            client.close()
    assert refused >= 4

    def fired() -> list[dict[str, Any]]:
        return host.manage.get(f"/events/{setup.id}/alerts").json()

    wait_until(lambda: len(fired()) == 3 and all(a["delivered"] for a in fired()), timeout=20)
    alerts = fired()
    assert [a["threshold_percent"] for a in alerts] == [25, 50, 100]
    assert all(a["currency"] == "USD" and Decimal(a["budget"]) == Decimal(budget) / 10**9
               for a in alerts)  # fmt: skip
    # Once each, whichever instance saw it first: the receiver got exactly three.
    wait_until(lambda: len(receiver.received) == 3, timeout=10)
    thresholds = []
    for headers, body in receiver.received:
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-aiproxy-signature"], expected)
        sent = json.loads(body)
        assert sent["event_id"] == setup.id and sent["type"] == "budget_threshold"
        thresholds.append(sent["threshold_percent"])
    assert sorted(thresholds) == [25, 50, 100]


def test_webhook_urls_must_be_https_on_a_public_host(host: AppHost, sim: Simulator) -> None:
    setup = EventSetup(host, sim)
    for bad in (
        "http://hooks.example.com/x", "https://10.0.0.5/x", "https://user@hooks.example.com/x",
        "https://2130706433/x", "https://metadata.internal/x", "ftp://hooks.example.com",
    ):  # fmt: skip
        answer = host.manage.patch(f"/events/{setup.id}", json={"alert_webhook_url": bad})
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json()["error"]["details"][0]["field"] == "alert_webhook_url"
    good = host.manage.patch(
        f"/events/{setup.id}", json={"alert_webhook_url": "https://hooks.example.com/aiproxy"}
    )
    assert good.status_code == 200, good.text
    for bad in ("50,abc", "0", "5000"):
        answer = host.manage.patch(f"/events/{setup.id}", json={"budget_alerts": bad})
        assert answer.status_code == 400, (bad, answer.text)
    # Alerts and their secret belong to the event's organiser: unknown events are 404.
    assert host.manage.get("/events/0123456789abcdef/alerts").status_code == 404
    assert host.manage.post("/events/0123456789abcdef/alerts/secret").status_code == 404


def test_a_webhook_whose_name_resolves_inside_is_not_called(
    receiver: Receiver, azurite: Azurite, prefix: str
) -> None:
    """The URL rule is checked when the webhook is set and when it fires; what the name resolves
    to is checked on the address the POST connects to, so a name pointed inside between the
    check and the connection (DNS rebinding) reaches nothing."""
    import asyncio

    from shared.platform import settings
    from shared.runtime import Runtime
    from shared.upstreams.client import UpstreamUnreachable

    url = receiver.url.replace("127.0.0.1", "localhost")  # a name, resolving to loopback

    async def post(allow_loopback: bool) -> int:
        env = host_env(azurite.connection_string, prefix)
        env["AIPROXY_ALLOW_LOOPBACK_UPSTREAMS"] = str(allow_loopback).lower()
        runtime = Runtime(settings.load(env))
        try:
            return await runtime._post(url, {"content-type": "application/json"}, b"{}")
        finally:
            await runtime.close()

    with pytest.raises(UpstreamUnreachable, match="no public address"):
        asyncio.run(post(False))
    assert receiver.received == []
    assert asyncio.run(post(True)) == 204  # where the operator allows loopback (local runs)
    assert len(receiver.received) == 1
