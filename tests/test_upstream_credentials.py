"""Upstream credentials through their one seam: Key Vault for keys, Entra for tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from local.azurite import Azurite
from shared.platform.identity import COGNITIVE_SCOPE, SEARCH_SCOPE, TokenSource
from tests.harness import (
    HELLO,
    OPERATOR,
    SIM_KEY,
    App,
    Simulator,
    StandIns,
    Storage,
    unique_prefix,
    window,
)
from tests.inprocess import Configured
from tests.standins import StandInCredential


@pytest.fixture(scope="module")
def vaulted(configured: Configured) -> tuple[App, StandIns, str]:
    """The app with a Key Vault and an Entra credential stood in through their seam."""
    prefix = unique_prefix("cred")
    vault = {"AIPROXY_KEY_VAULT_URL": "https://vault.test/"}
    host, control = configured.with_standins("credentials", prefix=prefix, **vault)
    return host, control, prefix


@pytest.fixture
async def app(
    vaulted: tuple[App, StandIns, str],
) -> AsyncIterator[tuple[httpx.AsyncClient, StandIns, str]]:
    """A fresh runtime and fresh stand-ins for each test."""
    host, control, prefix = vaulted
    client = httpx.AsyncClient(base_url=host.base, timeout=30)
    try:
        yield client, control, prefix
    finally:
        await client.aclose()
        control.reset()


async def setup_event(client: httpx.AsyncClient, resources: list[dict[str, Any]]) -> str:
    manage = OPERATOR
    event = await client.post(
        "/manage/events",
        headers=manage,
        json={"name": "cred", **window(), "max_token_cap": 100, "daily_request_cap": 100},
    )
    for body in resources:
        created = await client.post("/manage/resources", headers=manage, json=body)
        assert created.status_code == 201, created.text
        await client.put(
            f"/manage/events/{event.json()['id']}/resources/{created.json()['id']}", headers=manage
        )
    attendee = await client.post(
        f"/manage/events/{event.json()['id']}/attendees", headers=manage, json={"user": "a"}
    )
    return attendee.json()["api_key"]


CHAT = "/openai/deployments/{}/chat/completions?api-version=2024-10-21"


async def test_upstream_key_lives_in_key_vault_not_in_tables(
    app: Any, sim: Simulator, azurite: Azurite
) -> None:
    client, standins, prefix = app
    key = await setup_event(
        client,
        [{"name": "kv", "deployment": "kv", "model_class": "openai-chat", "endpoint": sim.url,
          "auth": "key", "api_key": SIM_KEY}],
    )  # fmt: skip
    assert list(standins.vault_secrets().values()) == [SIM_KEY]
    assert Storage(azurite.connection_string, prefix).rows("secrets") == []
    response = await client.post(CHAT.format("kv"), json=HELLO, headers={"api-key": key})
    assert response.status_code == 200, response.text
    assert sim.stats()["last_requests"][-1]["headers"]["api-key"]["valid"] is True


async def test_managed_identity_sends_an_entra_token_per_scope(app: Any, sim: Simulator) -> None:
    client, standins, _ = app
    key = await setup_event(
        client,
        [{"name": "mi", "deployment": "mi", "model_class": "openai-chat", "endpoint": sim.url,
          "auth": "managed_identity"},
         {"name": "mi-search", "deployment": "docs", "model_class": "azure-ai-search",
          "endpoint": sim.url, "auth": "managed_identity"}],
    )  # fmt: skip
    for _ in range(3):
        response = await client.post(CHAT.format("mi"), json=HELLO, headers={"api-key": key})
        assert response.status_code == 200, response.text
    seen = sim.stats()["last_requests"][-1]["headers"]
    assert seen["authorization"] == {"present": True, "valid": True}
    assert seen["api-key"]["present"] is False
    searched = await client.post(
        "/indexes/docs/docs/search", json={"search": "x"}, headers={"api-key": key}
    )
    assert searched.status_code == 200
    assert standins.credential_scopes() == [
        COGNITIVE_SCOPE,
        SEARCH_SCOPE,
    ]  # cached: one token per scope


async def test_token_is_refreshed_before_it_expires_and_fetched_once_under_load() -> None:
    short = StandInCredential(lifetime=120)  # inside the 5-minute refresh margin
    source = TokenSource(short)
    await source.token()
    await source.token()
    assert len(short.scopes) == 2
    fresh = StandInCredential()
    source = TokenSource(fresh)
    tokens = await asyncio.gather(*(source.token() for _ in range(20)))
    assert len(set(tokens)) == 1 and len(fresh.scopes) == 1
