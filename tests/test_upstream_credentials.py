"""Upstream credentials through their one seam: Key Vault for keys, Entra for tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ResourceNotFoundError

from local.azurite import Azurite
from shared import identity, runtime
from shared.identity import COGNITIVE_SCOPE, SEARCH_SCOPE, TokenSource
from tests.harness import (
    FUNCTION_KEY,
    SIM_KEY,
    Simulator,
    Storage,
    unique_prefix,
    window,
)
from tests.inprocess import inprocess_app


class StandInKeyVault:
    """The async SecretClient methods the app uses, kept in memory."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}

    async def set_secret(self, name: str, value: str) -> Any:
        self.secrets[name] = value

    async def get_secret(self, name: str) -> Any:
        if name not in self.secrets:
            raise ResourceNotFoundError(f"{name} not found")
        return type("Secret", (), {"value": self.secrets[name]})()

    async def delete_secret(self, name: str) -> None:
        self.secrets.pop(name, None)


class StandInCredential:
    """An Entra credential whose tokens the simulator accepts (sim-token-...)."""

    def __init__(self, lifetime: float = 3600) -> None:
        self.lifetime = lifetime
        self.scopes: list[str] = []

    async def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.extend(scopes)
        await asyncio.sleep(0.01)
        return AccessToken(f"sim-token-{len(self.scopes)}", int(time.time() + self.lifetime))


@pytest.fixture(scope="module")
def asgi_app(azurite: Azurite) -> Iterator[tuple[Any, str]]:
    """The dev host's app in this process, configured with a Key Vault."""
    prefix = unique_prefix("cred")
    vault = {"AIPROXY_KEY_VAULT_URL": "https://vault.test/"}
    with inprocess_app(azurite.connection_string, prefix, **vault) as host:
        yield host, prefix


@pytest.fixture
async def app(
    asgi_app: tuple[Any, str],
) -> AsyncIterator[tuple[httpx.AsyncClient, StandInKeyVault, StandInCredential, str]]:
    """A fresh runtime with Key Vault and Entra stood in through their seam."""
    host, prefix = asgi_app
    vault, credential = StandInKeyVault(), StandInCredential()
    identity.set_key_vault_client(vault)
    identity.set_credential(credential)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=host), base_url="http://app/api", timeout=30
    )
    try:
        yield client, vault, credential, prefix
    finally:
        await client.aclose()
        await runtime.shutdown()
        identity.set_key_vault_client(None)
        identity.set_credential(None)


async def setup_event(client: httpx.AsyncClient, resources: list[dict[str, Any]]) -> str:
    manage = {"x-functions-key": FUNCTION_KEY}
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
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_upstream_key_lives_in_key_vault_not_in_tables(
    app: Any, sim: Simulator, azurite: Azurite
) -> None:
    client, vault, _, prefix = app
    key = await setup_event(
        client,
        [{"name": "kv", "deployment": "kv", "model_class": "openai-chat", "endpoint": sim.url,
          "auth": "key", "api_key": SIM_KEY}],
    )  # fmt: skip
    assert list(vault.secrets.values()) == [SIM_KEY]
    assert Storage(azurite.connection_string, prefix).rows("secrets") == []
    response = await client.post(CHAT.format("kv"), json=HELLO, headers={"api-key": key})
    assert response.status_code == 200, response.text
    assert sim.stats()["last_requests"][-1]["headers"]["api-key"]["valid"] is True


async def test_managed_identity_sends_an_entra_token_per_scope(app: Any, sim: Simulator) -> None:
    client, _, credential, _ = app
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
    assert credential.scopes == [COGNITIVE_SCOPE, SEARCH_SCOPE]  # cached: one token per scope


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
