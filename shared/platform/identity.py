"""The seam to Entra ID: credentials for storage, Key Vault and upstream tokens.

Everything that needs Entra goes through here, so tests can stand in one object.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shared.platform.settings import Settings


def storage_credential(settings: Settings) -> Any:
    """An async token credential for the app's managed identity (or the developer's login)."""
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential(
        managed_identity_client_id=settings.managed_identity_client_id or None
    )


COGNITIVE_SCOPE = "https://cognitiveservices.azure.com/.default"
SEARCH_SCOPE = "https://search.azure.com/.default"
_REFRESH_MARGIN_SECONDS = 300


class TokenSource:
    """Entra tokens for upstream calls, cached and refreshed before they expire."""

    def __init__(self, credential: Any, scope: str = COGNITIVE_SCOPE) -> None:
        self._credential = credential
        self._scope = scope
        self._token = ""
        self._expires_on = 0.0
        self._lock: Any = None

    async def token(self) -> str:
        if self._token and self._expires_on - time.time() > _REFRESH_MARGIN_SECONDS:
            return self._token
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self._token or self._expires_on - time.time() <= _REFRESH_MARGIN_SECONDS:
                access = await self._credential.get_token(self._scope)
                self._token, self._expires_on = access.token, float(access.expires_on)
        return self._token


def scope_for(model_class: str) -> str:
    """Azure AI Search takes tokens for its own audience; every OpenAI class for Cognitive Services."""
    return SEARCH_SCOPE if model_class == "azure-ai-search" else COGNITIVE_SCOPE


_credential: Any = None
_token_sources: dict[str, TokenSource] = {}


def set_credential(credential: Any) -> None:
    """Stand in the Entra credential (tests): anything with an async get_token(scope)."""
    global _credential
    _credential = credential
    _token_sources.clear()


async def upstream_token(settings: Settings, scope: str = COGNITIVE_SCOPE) -> str:
    """A bearer token for an upstream with the app's managed identity, cached per scope."""
    global _credential
    if _credential is None:
        _credential = storage_credential(settings)
    source = _token_sources.get(scope)
    if source is None:
        source = _token_sources[scope] = TokenSource(_credential, scope)
    return await source.token()


class KeyVaultSecretStore:
    """Upstream keys as Key Vault secrets, read with the app's identity."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def put(self, name: str, value: str) -> None:
        await self._client.set_secret(name, value)

    async def get(self, name: str) -> str | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return (await self._client.get_secret(name)).value
        except ResourceNotFoundError:
            return None

    async def delete(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            await self._client.delete_secret(name)
        except ResourceNotFoundError:
            pass


_key_vault_client: Any = None


def set_key_vault_client(client: Any) -> None:
    """Stand in a Key Vault client (tests): anything with the SecretClient's async methods."""
    global _key_vault_client
    _key_vault_client = client


def key_vault_store(settings: Settings) -> KeyVaultSecretStore:
    global _key_vault_client
    if _key_vault_client is None:
        from azure.keyvault.secrets.aio import SecretClient

        _key_vault_client = SecretClient(settings.key_vault_url, storage_credential(settings))
    return KeyVaultSecretStore(_key_vault_client)
