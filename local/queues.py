"""Queue triggers for the host stand-in, as the Functions host's Storage Queues extension runs
them: each queue polled (backing off to `maxPollingInterval` while it is empty), a batch of
messages taken out of sight for a lease that is renewed while the function runs, the function
invoked with the message and its metadata (id, dequeue count, times, pop receipt), the message
deleted when it succeeds, made visible again after `visibilityTimeout` when it fails, and moved
to `<queue>-poison` once it failed `maxDequeueCount` times. A message whose instance died stays
out of sight until its lease ends, then comes again with its dequeue count one higher.

The options come from host.json's `extensions.queues`, with the extension's defaults.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("host.queues")
# The Storage SDK logs every request at INFO: the host's log keeps its own lines only.
logging.getLogger("azure").setLevel(logging.WARNING)

# The extension takes messages out of sight for 10 minutes and renews that while the function
# runs (at half the time); the stand-in takes the lease as an argument so tests can shorten it.
LEASE_SECONDS = 600.0
MIN_POLLING_SECONDS = 0.1
DEVELOPMENT_STORAGE = "UseDevelopmentStorage=true"
DEVELOPMENT_CONNECTION = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
    "KBHBeksoGMGw==;QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
)


def timespan(value: Any, default: float) -> float:
    """host.json's hh:mm:ss (or d.hh:mm:ss, fractions allowed) as seconds."""
    if value is None:
        return default
    match = re.fullmatch(r"(?:(\d+)\.)?(\d+):(\d+):(\d+(?:\.\d+)?)", str(value).strip())
    if not match:
        raise ValueError(f"not a time span (hh:mm:ss): {value!r}")
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@dataclass(frozen=True)
class QueueOptions:
    """host.json `extensions.queues` (the Storage Queues extension's defaults otherwise)."""

    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    message_encoding: str = "base64"

    @classmethod
    def of(cls, host_json: dict[str, Any]) -> QueueOptions:
        queues = host_json.get("extensions", {}).get("queues", {})
        batch = int(queues.get("batchSize", 16))
        return cls(
            max_polling_interval=timespan(queues.get("maxPollingInterval"), 60.0),
            visibility_timeout=timespan(queues.get("visibilityTimeout"), 0.0),
            batch_size=batch,
            new_batch_threshold=int(queues.get("newBatchThreshold", batch // 2)),
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
            message_encoding=str(queues.get("messageEncoding", "base64")).lower(),
        )

    @classmethod
    def read(cls, root: Path) -> QueueOptions:
        return cls.of(json.loads((root / "host.json").read_text()))


def connection_string(value: str) -> str:
    """The storage a trigger's `connection` setting names (the emulator's well-known account
    for UseDevelopmentStorage=true)."""
    return DEVELOPMENT_CONNECTION if value.strip() in ("", DEVELOPMENT_STORAGE) else value


def _iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat().replace("+00:00", "Z")


@dataclass
class Delivery:
    """One message as the function gets it: its text and the trigger metadata."""

    body: str
    metadata: dict[str, Any]  # name -> (kind, value): "string" or "json"


# Runs the function on a message: True when it succeeded.
Invoke = Callable[[Delivery], Awaitable[bool]]


@dataclass(eq=False)
class QueueListener:
    """One queue trigger (the function `name` on `queue_name`, in the storage account the
    `connection` setting names): polls its queue and runs the function on each message."""

    name: str
    queue_name: str
    connection: str
    options: QueueOptions
    invoke: Invoke
    lease: float = LEASE_SECONDS  # seconds a message stays hidden while it runs, renewed
    running: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: bool = False
    processed: int = 0
    poisoned: int = 0

    def __post_init__(self) -> None:
        from azure.storage.queue.aio import QueueClient

        account = connection_string(self.connection)
        self.queue, self.poison = (
            QueueClient.from_connection_string(account, queue)
            for queue in (self.queue_name, f"{self.queue_name}-poison")
        )

    async def run(self) -> None:
        """Poll until stopped: a batch of `batchSize` whenever at most `newBatchThreshold`
        run (so up to both together run at once)."""
        from azure.core.exceptions import ResourceExistsError

        try:
            await self.queue.create_queue()
        except ResourceExistsError:
            pass
        wait = MIN_POLLING_SECONDS
        while not self.stopping:
            got = 0
            if len(self.running) <= self.options.new_batch_threshold:
                try:
                    got = await self.poll(self.options.batch_size)
                except Exception as error:  # storage away: try again later
                    log.warning("queue %s: %s", self.queue_name, error)
            if got:
                wait = MIN_POLLING_SECONDS
                continue
            await asyncio.sleep(wait)
            wait = min(wait * 2, max(self.options.max_polling_interval, MIN_POLLING_SECONDS))

    async def poll(self, room: int) -> int:
        messages = self.queue.receive_messages(
            messages_per_page=min(room, 32), visibility_timeout=max(1, int(self.lease))
        )
        got = 0
        async for message in messages:
            got += 1
            task = asyncio.create_task(self.process(message))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
            if got >= room:
                break
        return got

    async def process(self, message: Any) -> None:
        """One message: poisoned if it failed too often, else run with its lease renewed;
        deleted on success, released (or poisoned) on failure."""
        if message.dequeue_count > self.options.max_dequeue_count:
            await self.to_poison(message)
            return
        lease = _Lease(self, message)
        renewal = asyncio.create_task(lease.keep())
        try:
            succeeded = await self.invoke(self.delivery(message))
        except Exception as error:
            log.error("queue %s: %s", self.queue_name, error)
            succeeded = False
        finally:
            renewal.cancel()
        message = lease.message
        try:
            if succeeded:
                await self.queue.delete_message(message.id, message.pop_receipt)
                self.processed += 1
            elif message.dequeue_count >= self.options.max_dequeue_count:
                await self.to_poison(message)
            else:
                await self.queue.update_message(
                    message.id,
                    message.pop_receipt,
                    visibility_timeout=int(self.options.visibility_timeout),
                )
        except Exception as error:  # the lease was lost: another delivery has it
            log.warning("queue %s: message %s: %s", self.queue_name, message.id, error)

    async def to_poison(self, message: Any) -> None:
        from azure.core.exceptions import ResourceExistsError

        try:
            await self.poison.create_queue()
        except ResourceExistsError:
            pass
        await self.poison.send_message(message.content)
        await self.queue.delete_message(message.id, message.pop_receipt)
        self.poisoned += 1
        log.warning(
            "queue %s: message %s failed %d times; moved to %s-poison",
            self.queue_name,
            message.id,
            message.dequeue_count,
            self.queue_name,
        )

    def delivery(self, message: Any) -> Delivery:
        content = message.content or ""
        if self.options.message_encoding == "base64":
            try:
                content = base64.b64decode(content, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                pass  # as the extension: a message that is not base64 is taken as it is
        return Delivery(
            body=content,
            metadata={
                "Id": ("string", message.id),
                "DequeueCount": ("json", json.dumps(message.dequeue_count)),
                "ExpirationTime": ("json", json.dumps(_iso(message.expires_on))),
                "InsertionTime": ("json", json.dumps(_iso(message.inserted_on))),
                "NextVisibleTime": ("json", json.dumps(_iso(message.next_visible_on))),
                "PopReceipt": ("string", message.pop_receipt),
            },
        )

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
        await self.queue.close()
        await self.poison.close()


class _Lease:
    """Keeps a message out of sight while its function runs (renewed at half the lease)."""

    def __init__(self, listener: QueueListener, message: Any) -> None:
        self.listener = listener
        self.message = message

    async def keep(self) -> None:
        listener = self.listener
        while True:
            await asyncio.sleep(listener.lease / 2)
            try:
                receipt = await listener.queue.update_message(
                    self.message.id,
                    self.message.pop_receipt,
                    visibility_timeout=max(1, int(listener.lease)),
                )
            except Exception as error:
                log.warning("queue %s: lease not renewed: %s", listener.queue_name, error)
                continue
            self.message.pop_receipt = receipt.pop_receipt
            self.message.next_visible_on = receipt.next_visible_on
