"""Stand-ins loaded into the Python worker for tests that cannot use the real thing here.

The host stand-in's worker imports this module before it indexes the app when the setting
`AIPROXY_WORKER_PRELOAD` names it (local/worker.py; never on Azure). It puts a Key Vault and an
Entra credential behind the app's one seam for them (shared/platform/identity.py), keeps OpenTelemetry's
spans and metrics in memory, and serves a control API on 127.0.0.1 so the test process can move
the worker's clock and read what the stand-ins saw. The worker binds that port itself (one the
system picks, or the one an earlier worker of the same host had) and writes it to the file
`AIPROXY_STANDINS_PORT_FILE` names: a port chosen by the test beforehand could be taken by
another process before the worker got to it.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from azure.core.credentials import AccessToken
from azure.core.exceptions import ResourceNotFoundError


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


class StandIns:
    """What the worker holds for the tests, and the control API that reads and moves it."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        trace.set_tracer_provider(provider)
        self.metrics = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.metrics]))
        self.reset()

    def reset(self) -> None:
        from shared.platform import identity

        self.vault, self.credential = StandInKeyVault(), StandInCredential()
        identity.set_key_vault_client(self.vault)
        identity.set_credential(self.credential)

    async def serve(self, port: int = 0) -> int:
        """Serve the control API on `port` (0: one the system picks); the port it took."""
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/clock", self._clock)
        app.router.add_post("/shutdown", self._shutdown)
        app.router.add_get("/vault", self._vault)
        app.router.add_get("/credential", self._credential)
        app.router.add_get("/telemetry", self._telemetry)
        app.router.add_get("/invocations", self._invocations)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner.addresses[0][1]

    async def _vault(self, _: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.vault.secrets)

    async def _credential(self, _: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.credential.scopes)

    async def _clock(self, request: Any) -> Any:
        """{"shift": seconds} sets the clock that far from the real time; {} resets it."""
        from aiohttp import web

        from shared.platform import clock

        body = await request.json()
        clock.reset()
        clock.shift(timedelta(seconds=float(body.get("shift", 0))))
        return web.json_response({"now": clock.now().isoformat()})

    async def _shutdown(self, _: Any) -> Any:
        """The runtime flushed and closed, and fresh stand-ins, as between two tests."""
        from aiohttp import web

        from shared import runtime

        await runtime.shutdown()
        self.reset()
        return web.json_response({})

    async def _invocations(self, _: Any) -> Any:
        """How many invocations the worker runtime's HTTP coordinator holds."""
        from aiohttp import web

        from shared.platform import hosting

        return web.json_response({"held": hosting.open_invocations()})

    async def _telemetry(self, _: Any) -> Any:
        from aiohttp import web

        spans = [
            {"name": span.name, "attributes": dict(span.attributes or {})}
            for span in self.spans.get_finished_spans()
        ]
        points: dict[str, list[dict[str, Any]]] = {}
        data = self.metrics.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else []:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(
                        {
                            "attributes": dict(p.attributes or {}),
                            "value": getattr(p, "value", getattr(p, "sum", None)),
                        }
                        for p in metric.data.data_points
                    )
        return web.json_response({"spans": spans, "metrics": points})


async def _serve_and_tell(told: Path) -> None:
    """Serve the control API on the port this host's earlier worker had (a worker started
    again), else on one the system picks; write it to `told` for the test process."""
    try:
        port = int(told.read_text())
    except (OSError, ValueError):
        port = 0
    bound = await standins.serve(port)
    partial = told.with_name(told.name + ".partial")
    partial.write_text(str(bound))
    partial.replace(told)


standins = StandIns()
_told = os.environ.get("AIPROXY_STANDINS_PORT_FILE", "")
if _told:
    _server = asyncio.get_running_loop().create_task(_serve_and_tell(Path(_told)))
