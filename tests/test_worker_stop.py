"""Nothing is lost when a worker stops: the Functions host drains its calls and then kills the
Python worker (it offers no WorkerTerminate handling), and workers crash. Records leave memory
soon after calls stop, and until storage has them they are in a journal on local disk that the
next worker on that disk writes."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from local.azurite import Azurite
from tests.harness import AppHost, EventSetup, Simulator, Storage, host_env, unique_prefix

pytestmark = pytest.mark.e2e  # a worker process stopped or killed mid-call

# No interval flush during these tests: what is written got there by the quiet flush, the
# journal, or not at all.
NO_INTERVAL = {"AIPROXY_USAGE_FLUSH_SECONDS": "600"}


def calls(setup: EventSetup, count: int, *, concurrency: int = 1) -> list[str]:
    """`count` chat calls (every other one streamed); the request ids the proxy gave them."""
    client = openai.AzureOpenAI(
        azure_endpoint=setup.host.base, api_key=setup.key, api_version="2024-10-21", max_retries=0
    )

    def one(n: int) -> str:
        messages = [{"role": "user", "content": f"call {n}"}]
        if n % 2:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=messages, max_tokens=5, stream=True
            )
            for _ in raw.parse():
                pass
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=messages, max_tokens=5
            )
        return raw.headers["x-aiproxy-request-id"]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(count)))


def wait_for_records(storage: Storage, event_id: str, expect: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = storage.rows("usage", f"event_id eq '{event_id}'")
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def journaled(azurite: Azurite, label: str, spill: Path) -> tuple[dict[str, str], Storage]:
    """Host settings with the journal in `spill` and no interval flush, and their storage."""
    prefix = unique_prefix(label)
    env = host_env(
        azurite.connection_string, prefix, AIPROXY_USAGE_SPILL_DIR=str(spill), **NO_INTERVAL
    )
    return env, Storage(azurite.connection_string, prefix)


def test_records_leave_memory_soon_after_calls_stop(
    azurite: Azurite, log_dir: Path, sim: Simulator, tmp_path: Path
) -> None:
    env, storage = journaled(azurite, "quiet", tmp_path)
    host = AppHost(log_dir, env, name="quiet")
    try:
        setup = EventSetup(host, sim)
        ids = calls(setup, 3)
        started = time.monotonic()
        rows = wait_for_records(storage, setup.id, 3, 10)
        waited = time.monotonic() - started
    finally:
        host.stop()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert waited < 5, f"records waited {waited:.1f} s after the calls stopped"


def test_a_worker_stopped_the_way_the_host_stops_it_loses_nothing(
    azurite: Azurite, log_dir: Path, sim: Simulator, tmp_path: Path
) -> None:
    """A burst, then at once SIGTERM to the host: it drains, then kills the worker."""
    env, storage = journaled(azurite, "stop", tmp_path)
    host = AppHost(log_dir, env, name="stopped")
    try:
        setup = EventSetup(host, sim)
        ids = calls(setup, 40, concurrency=8)
        worker = host.status()["worker"]["pid"]
    finally:
        host.stop()
    assert not Path(f"/proc/{worker}").exists()  # the worker is gone with its host
    # The next worker on this disk (a new instance of the app here) writes what was left.
    again = AppHost(log_dir, env, name="stopped-again")
    try:
        assert again.http.get("/health").status_code == 200
        rows = wait_for_records(storage, setup.id, len(ids), 30)
        deadline = time.monotonic() + 30  # the file goes once the rollup marks are written too
        while list(tmp_path.glob("journal-*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = list(tmp_path.glob("journal-*.jsonl"))
    finally:
        again.stop()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # each one, once
    assert all(r["completion_tokens"] == 5 for r in rows)
    assert not left  # written, so gone from disk


def test_a_worker_killed_mid_burst_has_its_records_written_by_the_next_one(
    azurite: Azurite, log_dir: Path, sim: Simulator, tmp_path: Path
) -> None:
    env, storage = journaled(azurite, "crash", tmp_path)
    host = AppHost(log_dir, env, name="crash")
    try:
        setup = EventSetup(host, sim)
        ids = calls(setup, 3)
        first = host.status()["worker"]["pid"]
        os.kill(first, signal.SIGKILL)  # right after the calls: records still in memory
        deadline = time.monotonic() + 60
        while True:  # the host starts a new worker
            try:
                if host.status()["worker"]["pid"] not in (first, None):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, host.log()[-2000:]
            time.sleep(0.1)
        assert host.http.get("/health").status_code == 200  # its first call starts the writer
        rows = wait_for_records(storage, setup.id, 3, 30)
    finally:
        host.stop()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
