"""Every HTTP function the worker indexes is reached through the host stand-in and the worker.

The fast tier calls the app's functions in the test process; this keeps the end-to-end tier
honest: each route the worker reports (the host's status API) is called once over HTTP through
the host and the worker, and the answer is the app's (a body, or the app's request id), never the
host's own bodiless 404/401. The official SDK makes the calls it has; httpx the rest.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import openai
import pytest

from tests.harness import AppHost, EventSetup

pytestmark = pytest.mark.e2e

RESPONSES_API_VERSION = "2025-03-01-preview"  # the first with the Responses API
CLIENT = "127.0.0.8"
# What each route parameter stands for in a call (the rest: a name nobody has).
VALUES = {"deployment": "gpt-4o-mini", "model": "gpt-4o-mini", "file": "app.css"}


def concrete(route: str, event: EventSetup) -> str:
    """A path for a route template, its parameters filled with the event's own ids."""
    known = {
        **VALUES,
        "event_id": event.id,
        "resource_id": next(iter(event.resources)),
        "attendee_id": event.attendee["id"],
    }

    def fill(match: re.Match[str]) -> str:
        return known.get(match.group(1), f"no-such-{match.group(1)}")

    return re.sub(r"\{\*?([A-Za-z_]\w*)(?::[^}?]*)?\??\}", fill, route)


def by_sdk(host: AppHost, event: EventSetup, seen: list[httpx.Request]) -> None:
    """The calls the official SDK makes, on the Azure and the v1 paths and the predecessor's."""
    hooks = {"request": [seen.append]}
    for base in (host.base, f"{host.base}/v1"):
        azure = openai.AzureOpenAI(
            azure_endpoint=base,
            api_key=event.key,
            api_version=RESPONSES_API_VERSION,
            http_client=httpx.Client(event_hooks=hooks),
        )
        v1 = openai.OpenAI(
            base_url=f"{base}/openai/v1",
            api_key=event.key,
            http_client=httpx.Client(event_hooks=hooks),
        )
        for client in (azure, v1):
            chat = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert chat.choices[0].message.content
            assert client.completions.create(
                model="gpt-35-turbo-instruct", prompt="x", max_tokens=2
            )
            assert client.embeddings.create(model="text-embedding-3-small", input="x").data
            assert [m.id for m in client.models.list()]
            assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
            created = client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=16)
            assert client.responses.retrieve(created.id).id == created.id
            assert client.responses.input_items.list(created.id).data
            client.responses.delete(created.id)


def test_every_indexed_route_answers_through_the_host_and_the_worker(
    host: AppHost, event: EventSetup
) -> None:
    seen: list[httpx.Request] = []
    by_sdk(host, event, seen)
    functions = [f for f in host.status()["functions"] if f["trigger"] == "httpTrigger"]
    reached = {
        f["name"]
        for f in functions
        for request in seen
        if request.method in f["methods"] and _matches(host, f["route"], request.url.path)
    }
    assert reached, "the SDK's calls reached no indexed route"
    # Calls with made-up ids count against their address in the app's failed-key guards: they
    # come from an address of their own, not 127.0.0.1 that the other tests share.
    transport = httpx.HTTPTransport(local_address=CLIENT)
    with httpx.Client(base_url=host.base, timeout=30, transport=transport) as http:
        for function in functions:
            if function["name"] in reached:
                continue  # the SDK called it
            method = next(
                m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if m in function["methods"]
            )
            path = concrete(function["route"], event)
            headers = {"api-key": event.key, **host.manage.headers}
            body: Any = {} if method in ("POST", "PUT", "PATCH") else None
            answer = http.request(method, f"/{path}", json=body, headers=headers)
            assert answer.content or "x-aiproxy-request-id" in answer.headers, (
                function["name"],
                answer.status_code,
            )
            assert answer.status_code < 500, (function["name"], answer.text)


def _matches(host: AppHost, route: str, path: str) -> bool:
    from local.host import compile_route

    prefix = host.base.rsplit("/", 1)[-1]
    return compile_route(prefix, route).match(path) is not None
