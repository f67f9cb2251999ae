"""Storage queues: messages for queue-triggered functions (the realtime calls to meter).

Messages are base64 text, as the Functions host's Queues extension reads them by default. The
queue is on the app's storage account: from the connection string locally, or the table
endpoint's account (its `.queue.` host) with the app's identity in Azure.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from shared.platform.settings import Settings


def queue_endpoint(table_endpoint: str) -> str:
    """The queue service of the storage account whose table endpoint this is."""
    return table_endpoint.replace(".table.", ".queue.", 1)


class Queues:
    """One process's clients of the app's storage queues, made when first used."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clients: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def client(self, name: str) -> Any:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.queue import TextBase64EncodePolicy
        from azure.storage.queue.aio import QueueClient

        if name in self._clients:
            return self._clients[name]
        async with self._lock:
            if name not in self._clients:
                settings = self._settings
                policy = {"message_encode_policy": TextBase64EncodePolicy()}
                if settings.storage_table_endpoint:
                    from shared.platform.identity import storage_credential

                    client = QueueClient(
                        queue_endpoint(settings.storage_table_endpoint),
                        name,
                        credential=storage_credential(settings),
                        **policy,
                    )
                else:
                    client = QueueClient.from_connection_string(
                        settings.storage_connection_string, name, **policy
                    )
                try:
                    await client.create_queue()
                except ResourceExistsError:
                    pass
                self._clients[name] = client
        return self._clients[name]

    async def send(self, name: str, message: dict[str, Any], delay: float = 0) -> None:
        """A JSON message, visible after `delay` seconds."""
        client = await self.client(name)
        await client.send_message(
            orjson.dumps(message).decode(), visibility_timeout=int(delay) or None
        )

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
