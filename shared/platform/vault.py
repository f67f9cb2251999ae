"""Where secrets rest: attendee keys sealed for display, upstream keys sealed or in Key Vault."""

from __future__ import annotations

from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken

from shared.platform.settings import Settings
from shared.platform.tables import Tables

SECRETS_TABLE = "secrets"


class ConfigurationError(Exception):
    """A setting the app needs is missing or wrong."""


class Sealer:
    """Symmetric encryption of small secrets with the app's encryption key."""

    def __init__(self, key: str) -> None:
        if not key:
            raise ConfigurationError(
                "AIPROXY_ENCRYPTION_KEY is not set: generate one with "
                "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key()"
                ".decode())'` and add it to the app settings."
            )
        try:
            self._fernet = Fernet(key.encode())
        except ValueError as exc:
            raise ConfigurationError(
                "AIPROXY_ENCRYPTION_KEY must be 32 url-safe base64-encoded bytes"
            ) from exc

    def seal(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def unseal(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken as exc:
            raise ConfigurationError(
                "a sealed secret cannot be opened: AIPROXY_ENCRYPTION_KEY changed"
            ) from exc


class SecretStore(Protocol):
    """Named upstream secrets; write-only to the outside world."""

    async def put(self, name: str, value: str) -> None: ...

    async def get(self, name: str) -> str | None: ...

    async def delete(self, name: str) -> None: ...


class TableSecretStore:
    """Secrets sealed with the app's key in a table of their own (local and small setups)."""

    def __init__(self, tables: Tables, sealer: Sealer) -> None:
        self._tables = tables
        self._sealer = sealer

    async def put(self, name: str, value: str) -> None:
        entity = {"PartitionKey": "secret", "RowKey": name, "value": self._sealer.seal(value)}
        await self._tables.upsert(SECRETS_TABLE, entity, replace=True)

    async def get(self, name: str) -> str | None:
        entity = await self._tables.get(SECRETS_TABLE, "secret", name)
        return None if entity is None else self._sealer.unseal(entity["value"])

    async def delete(self, name: str) -> None:
        await self._tables.delete(SECRETS_TABLE, "secret", name)


def secret_store(settings: Settings, tables: Tables, sealer: Sealer) -> SecretStore:
    """Key Vault when the app has one, sealed table rows otherwise."""
    if settings.key_vault_url:
        from shared.platform.identity import key_vault_store

        return key_vault_store(settings)
    return TableSecretStore(tables, sealer)
