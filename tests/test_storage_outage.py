"""Storage that goes away mid-run loses nothing: requests keep flowing on cached state, usage
records wait and are written when storage is back, and the rollups come out right."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.azurite import Azurite, free_port
from tests.harness import (
    CHAT,
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    host_env,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.e2e  # app hosts across a storage restart


@pytest.fixture
def persistent_azurite(tmp_path: Path) -> Iterator[Azurite]:
    server = Azurite(free_port(), tmp_path / "azurite").start()
    yield server
    server.stop()


@pytest.mark.slow
async def test_300_concurrent_requests_across_a_storage_restart_leave_300_records(
    persistent_azurite: Azurite, log_dir: Path, sim: Simulator, tmp_path: Path
) -> None:
    prefix = unique_prefix("outage")
    env = host_env(
        persistent_azurite.connection_string,
        prefix,
        AIPROXY_USAGE_SPILL_DIR=str(tmp_path / "spill"),
    )
    host = AppHost(log_dir, env, name="outage")
    storage = Storage(persistent_azurite.connection_string, prefix)
    try:
        setup = EventSetup(host, sim, daily_request_cap=100_000)
        body = {
            "messages": [
                {"role": "user", "content": "[sim:tokens=20 latency_ms_per_token=100] go"}
            ],
            "stream": False,
        }
        warm = host.http.post(CHAT, json=body, headers={"api-key": setup.key})
        assert warm.status_code == 200  # key, event and catalog are cached now

        async with httpx.AsyncClient(base_url=host.base, timeout=60) as client:
            calls = [
                client.post(CHAT, json=body, headers={"api-key": setup.key}) for _ in range(300)
            ]
            upstream = sim.stats()["total_requests"]

            def in_flight() -> bool:  # the upstream has a good part of them (each takes 2 s)
                return sim.stats()["total_requests"] - upstream >= 100

            pending = asyncio.gather(*calls)
            await asyncio.to_thread(wait_until, in_flight, 30)
            persistent_azurite.stop()  # storage gone while 300 calls are in flight
            await asyncio.sleep(3.0)  # longer than the 2 s cache: lookups must fall back
            persistent_azurite.start()
            answers = await pending
        assert [a.status_code for a in answers].count(200) == 300

        deadline = time.monotonic() + 60
        records = storage.usage(setup.id, expect=301, timeout=60)
        while len(records) < 301 and time.monotonic() < deadline:
            records = storage.usage(setup.id, expect=301, timeout=5)
        assert len(records) == 301  # exactly: none lost, none twice
        report = host.manage.get(f"/events/{setup.id}/usage", params={"group_by": "attendee"})
        assert report.json()["totals"]["requests"] == 301
        assert report.json()["totals"]["completion_tokens"] == 301 * 20
    finally:
        host.stop()


def test_health_without_storage_tells_anonymous_callers_no_exception_text(
    log_dir: Path,
) -> None:
    port = free_port()  # nothing listens there: every storage call fails to connect
    env = host_env(f"{Azurite(port).connection_string}", unique_prefix("healthless"))
    host = AppHost(log_dir, env, name="healthless")
    try:
        answer = host.http.get("/health")
        assert answer.status_code == 503
        body = answer.json()
        assert body == {"status": "degraded", "storage": "unavailable", "usage_pending": 0}
        for leak in (str(port), "127.0.0.1", "Error", "Exception", "onnect", "http"):
            assert leak not in answer.text, leak
        wait_until(lambda: "health: storage unavailable: " in host.log(), 10)
    finally:
        host.stop()
