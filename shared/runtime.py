"""The long-lived objects of one process: built from the packages below it, and closed.

Created on first use inside the running event loop (the Functions worker's or the dev
host's), closed by `shutdown()`. The edge (an HTTP or timer function) fetches it once with
`get_runtime()` and hands each module what it needs.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
from pathlib import Path

from shared.access import Access as Access  # the gate's answer, for the request path's hints
from shared.access import Callers, CodeGuard, EntraVerifier, FailedKeyGuard, Gate
from shared.directory import (
    AttendeeStore,
    CachedDirectory,
    CatalogStore,
    EventStore,
)
from shared.governance import (
    Alerts,
    Budgets,
    CallJournal,
    Caps,
    FairShare,
    RateLimits,
    UsageWriter,
)
from shared.platform import hosting
from shared.platform import settings as settings_module
from shared.platform.queues import Queues
from shared.platform.settings import Settings
from shared.platform.tables import Tables
from shared.platform.vault import Sealer, SecretStore, secret_store
from shared.plugins import Plugins
from shared.plugins import load as load_plugins
from shared.upstreams import AffinitySeal, Balancer, UpstreamClient


class Runtime:
    """Stores, caches, guards and clients shared by every request of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.plugins: Plugins = load_plugins(settings)  # first: one that fails leaves nothing open
        self.pruning: asyncio.Task[None] | None = None  # the worker runtime's leak (hosting)
        self.tables = Tables(settings)
        self.queues = Queues(settings)  # realtime calls to meter
        self.sealer = Sealer(settings.encryption_key)
        self.affinity = AffinitySeal(settings.encryption_key)
        self.secrets: SecretStore = secret_store(settings, self.tables, self.sealer)
        self.events = EventStore(self.tables)
        self.catalog = CatalogStore(self.tables)
        self.attendees = AttendeeStore(self.tables, self.sealer)
        self.directory = CachedDirectory(
            self.events, self.catalog, self.secrets, settings.cache_ttl_seconds
        )
        self.upstream = UpstreamClient(settings)
        self.balancer = Balancer(self.tables, settings.sync_seconds)
        self.caps = Caps(self.tables, settings.sync_seconds)
        self.alerts = Alerts(self.tables, self.sealer, self._post)
        self.budgets = Budgets(self.tables, settings.sync_seconds, alerts=self.alerts)
        self.limits = RateLimits(self.caps, FairShare(self.tables, settings.sync_seconds))
        spill_dir = Path(
            settings.usage_spill_dir
            or Path(tempfile.gettempdir()) / f"aiproxy-usage-{settings.table_prefix}"
        )
        self.usage = UsageWriter(
            self.tables, settings.usage_flush_seconds, spill_dir, observer=self.plugins.observer
        )
        # Admitted calls until they have a usage record (shared/governance/journal.py).
        self.journal = CallJournal(self.tables, settings.call_expiry_seconds)
        # Wrong keys (attendees' and the operator's) and unknown event ids per client address
        # (shared/access/guard.py).
        self.guard = FailedKeyGuard()
        self.codes = CodeGuard(self.tables, settings)
        self.entra = EntraVerifier(settings)
        self.gate = Gate(  # who calls the proxy: keys, code keys, Entra tokens
            self.attendees,
            self.directory,
            self.codes,
            self.entra,
            key_guard=self.guard,
            event_guard=FailedKeyGuard(wrong="event ids"),
            ttl=settings.cache_ttl_seconds,
        )
        self.callers = Callers(settings, self.entra, self.guard)  # who manages: manage/*

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> int:
        """POST to an organiser's webhook (alerts), answering the status. Connected to public
        addresses only, checked on the address the connection uses (a name that resolves to a
        private address when the alert fires is not called, whatever it resolved to when set)."""
        answer = await self.upstream.send("POST", url, headers, body, public_only=True)
        try:
            return answer.status
        finally:
            answer.close()

    async def close(self) -> None:
        if self.pruning is not None:
            self.pruning.cancel()
        # In this order: what writes to storage flushes before storage itself is closed.
        parts = (
            self.balancer, self.limits, self.caps, self.journal, self.budgets, self.alerts,
            self.usage, self.plugins, self.upstream, self.entra, self.queues, self.tables,
        )  # fmt: skip
        for part in parts:
            await part.close()


_runtime: Runtime | None = None
_loop: asyncio.AbstractEventLoop | None = None


def get_runtime() -> Runtime:
    """This process's runtime, created in the current event loop on first use."""
    global _runtime, _loop
    loop = asyncio.get_running_loop()
    if _runtime is None or _loop is not loop:
        from shared.platform import telemetry

        telemetry.configure(settings_module.get())
        _runtime = Runtime(settings_module.get())
        _runtime.usage.start()  # records a killed worker left on this disk are written now
        _runtime.pruning = loop.create_task(hosting.keep_pruning())
        # Modules, settings and clients live as long as the process: keep them out of the
        # collector's full passes, which otherwise stall requests for milliseconds.
        gc.freeze()
        _loop = loop
    return _runtime


async def shutdown() -> None:
    """Flush usage and close clients. Tests call it between runs; the Functions runtime offers
    no shutdown hook (a worker is killed), so nothing depends on it: see UsageWriter and Journal."""
    global _runtime
    if _runtime is not None:
        await _runtime.close()
        _runtime = None
