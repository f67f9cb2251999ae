"""Every admitted call is counted, even when its worker dies: each call's entry (its
provisional record at its worst case) is stored before the caller gets a byte of the answer,
deleted once the call has its usage record, and turned into an estimated usage record by a
successor's maintenance pass once it expired."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from local.azurite import Azurite
from tests.harness import (
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    host_env,
    run_timer,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.e2e  # a worker process killed mid-stream

STREAMS = 20
MAX_TOKENS = 300  # at 100 ms a token, a stream runs for 30 s: the worker dies long before,
# even on a busy machine (the test waits up to 20 s for the day's count before the kill)
SLOW = "[sim:latency_ms_per_token=100]"
EXPIRY = 3  # seconds after admission an unended call is taken for lost (test setting)


def worker_pid(host: AppHost) -> int | None:
    try:
        return host.status()["worker"]["pid"]
    except httpx.HTTPError:
        return None


def today(host: AppHost, key: str) -> dict[str, Any]:
    response = host.http.get("/eventinfo", headers={"api-key": key})
    assert response.status_code == 200, response.text
    return response.json()["today"]


@pytest.fixture
def journaled_host(azurite: Azurite, log_dir: Path, tmp_path: Path) -> Any:
    prefix = unique_prefix("journal")
    env = host_env(
        azurite.connection_string,
        prefix,
        AIPROXY_CALL_EXPIRY_SECONDS=str(EXPIRY),
        AIPROXY_USAGE_SPILL_DIR=str(tmp_path),
        AIPROXY_STREAM_IDLE_TIMEOUT="10",
    )
    host = AppHost(log_dir, env, name="journal")
    yield host, Storage(azurite.connection_string, prefix)
    host.stop()


def test_calls_of_a_killed_worker_are_recorded_at_their_worst_case_by_its_successor(
    journaled_host: tuple[AppHost, Storage], sim: Simulator
) -> None:
    host, storage = journaled_host
    setup = EventSetup(host, sim, attendee_budget="1000")  # calls hold their worst case
    client = openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=setup.key, api_version="2024-10-21", max_retries=0
    )
    # Calls that end normally first: one record each, never a second one.
    finished = []
    for n in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"done {n}"}], max_tokens=5
        )
        finished.append(raw.headers["x-aiproxy-request-id"])
    records = storage.usage(setup.id, expect=3)
    assert sorted(r["request_id"] for r in records) == sorted(finished)
    wait_until(lambda: not storage.rows("inflight"), timeout=20)  # their entries are deleted

    # 20 streams, each with part of its answer received.
    received: list[tuple[str, str]] = []
    lock = threading.Lock()
    all_started = threading.Barrier(STREAMS + 1, timeout=120)

    def stream(n: int) -> None:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"stream {n} {SLOW}"}],
            max_tokens=MAX_TOKENS,
            stream=True,
        )
        chunks = iter(raw.parse())
        first = next(chunks)  # part of the answer is here
        with lock:
            received.append((raw.headers["x-aiproxy-request-id"], first.id))
        all_started.wait()
        try:
            for _ in chunks:  # until the worker dies under it
                pass
        except (openai.APIError, httpx.HTTPError):
            pass

    pool = ThreadPoolExecutor(STREAMS)
    futures = [pool.submit(stream, n) for n in range(STREAMS)]
    try:
        all_started.wait()
        # Every caller has bytes of its answer: every call's entry is in storage already.
        inflight = storage.rows("inflight")
        streamed = sorted(request_id for request_id, _ in received)
        assert sorted(row["RowKey"] for row in inflight) == streamed
        first = host.status()["worker"]["pid"]
        # Today's request count is shared within a second; the test starts from it.
        assert wait_until(lambda: today(host, setup.key)["requests_used"] == 3 + STREAMS, 20)
        before = today(host, setup.key)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: worker_pid(host) not in (first, None), timeout=60)
    finally:
        for future in futures:
            future.result(timeout=60)
        pool.shutdown()
    assert len(received) == STREAMS

    # The successor's maintenance pass (the rollup timer) records what the dead worker left.
    def recorded() -> list[dict[str, Any]]:
        run_timer(host, "rollup_usage")
        rows = storage.rows("usage", f"event_id eq '{setup.id}'")
        return rows if len(rows) >= 3 + STREAMS else []

    rows = wait_until(recorded, timeout=60, interval=0.5)
    by_id = {row["request_id"]: row for row in rows}
    assert len(rows) == len(by_id) == 3 + STREAMS  # one record per call, none twice
    assert set(by_id) == set(finished) | set(streamed)
    for request_id in finished:
        assert by_id[request_id]["estimated"] is False
        assert by_id[request_id]["outcome"] == "ok"
    lost = [by_id[request_id] for request_id in streamed]
    for record in lost:
        assert record["estimated"] is True
        assert record["outcome"] == "worker_lost"
        assert record["streamed"] is True
        # The reserved worst case: the input estimate plus the most it may answer.
        assert record["completion_tokens"] == MAX_TOKENS
        assert record["prompt_tokens"] > 0
        assert record["total_tokens"] == record["prompt_tokens"] + MAX_TOKENS
        # And the money its budgets held for it: priced, at its worst case, never free.
        assert record["unpriced"] is False and record["price_source"] == "worst case"
    cost = {request_id: int(by_id[request_id]["cost_nano"]) for request_id in by_id}
    assert min(cost[r] for r in streamed) > max(cost[r] for r in finished) > 0
    assert not storage.rows("inflight")  # each entry taken once, then gone

    # The usage report and the attendee's daily counts include them.
    worst = sum(record["total_tokens"] for record in lost)
    report = host.manage.get(f"/events/{setup.id}/usage", params={"group_by": "attendee"})
    assert report.status_code == 200, report.text
    totals = report.json()["totals"]
    assert totals["requests"] == 3 + STREAMS
    assert totals["total_tokens"] == sum(row["total_tokens"] for row in rows)
    assert totals["cost_nano"] == sum(cost.values())  # the lost calls' money is in the report
    expected_tokens = before["tokens_used"] + worst
    wait_until(lambda: today(host, setup.key)["tokens_used"] == expected_tokens, timeout=20)
    assert today(host, setup.key)["requests_used"] == 3 + STREAMS

    # And the attendee's budget has spent them: the lost calls at the worst case they held.
    def budget_spent() -> int:
        rows = storage.rows("budgets", f"PartitionKey eq '{setup.id}'")
        return sum(int(row["spent"]) for row in rows if row["RowKey"] == setup.attendee["id"])

    assert wait_until(lambda: budget_spent() == sum(cost.values()), timeout=20)

    # Another pass finds nothing left to record, nor to spend again.
    run_timer(host, "rollup_usage")
    assert len(storage.rows("usage", f"event_id eq '{setup.id}'")) == 3 + STREAMS
    run_timer(host, "rollup_usage")  # (a second pass after the first's writes have synced)
    assert budget_spent() == sum(cost.values())


def test_a_call_that_ends_leaves_one_record_settled_not_estimated(
    journaled_host: tuple[AppHost, Storage], sim: Simulator
) -> None:
    host, storage = journaled_host
    setup = EventSetup(host, sim)
    client = openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=setup.key, api_version="2024-10-21", max_retries=0
    )
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    request_id = raw.headers["x-aiproxy-request-id"]
    for _ in raw.parse():
        pass
    [record] = storage.usage(setup.id, expect=1)
    wait_until(lambda: not storage.rows("inflight", f"RowKey eq '{request_id}'"), timeout=20)
    expired = datetime.fromisoformat(record["time"]).timestamp() + EXPIRY + 1

    def passed_after_its_expiry() -> bool:  # past its expiry too, a pass leaves it alone
        run_timer(host, "rollup_usage")
        return time.time() > expired

    wait_until(passed_after_its_expiry, timeout=60, interval=0.5)
    records = storage.rows("usage", f"event_id eq '{setup.id}'")
    assert [r["request_id"] for r in records] == [request_id]
    assert records[0]["estimated"] is False and records[0]["outcome"] == "ok"
    assert records[0]["completion_tokens"] == 5


def test_calls_ended_before_a_stop_are_not_recorded_twice(
    azurite: Azurite, log_dir: Path, sim: Simulator, tmp_path: Path
) -> None:
    """The host drains a worker's calls and kills it at once: entries of the last calls may be
    left behind with their records on the worker's disk. Past their expiry, a pass finds
    those records and only deletes the entries."""
    prefix = unique_prefix("journalstop")
    env = host_env(
        azurite.connection_string, prefix, AIPROXY_CALL_EXPIRY_SECONDS=str(EXPIRY),
        AIPROXY_USAGE_SPILL_DIR=str(tmp_path), AIPROXY_USAGE_FLUSH_SECONDS="600",
    )  # fmt: skip
    storage = Storage(azurite.connection_string, prefix)
    host = AppHost(log_dir, env, name="journal-stop")
    try:
        setup = EventSetup(host, sim)
        client = openai.AzureOpenAI(
            azure_endpoint=host.base, api_key=setup.key, api_version="2024-10-21", max_retries=0
        )

        def call(n: int) -> str:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"{n}"}], max_tokens=3
            )
            return raw.headers["x-aiproxy-request-id"]

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(call, range(40)))
        stopped_at = time.time()
    finally:
        host.stop()  # drains, then kills the worker
    again = AppHost(log_dir, env, name="journal-stop-again")
    try:
        assert again.http.get("/health").status_code == 200

        def settled() -> bool:
            run_timer(again, "rollup_usage")
            return time.time() > stopped_at + EXPIRY + 1 and not storage.rows("inflight")

        wait_until(settled, timeout=60, interval=0.5)
        rows = storage.rows("usage", f"event_id eq '{setup.id}'")
    finally:
        again.stop()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # each once
    assert not any(r["estimated"] for r in rows)


def test_two_instances_passing_at_once_record_each_lost_call_once(
    azurite: Azurite, log_dir: Path, sim: Simulator, tmp_path: Path
) -> None:
    """An instance gone whole (host and worker), its calls in flight: two other instances run
    their passes at the same time; each entry is claimed by one of them (ETag)."""
    prefix = unique_prefix("journaltwo")
    env = host_env(
        azurite.connection_string, prefix, AIPROXY_CALL_EXPIRY_SECONDS=str(EXPIRY),
        AIPROXY_STREAM_IDLE_TIMEOUT="10",
    )  # fmt: skip
    storage = Storage(azurite.connection_string, prefix)
    lost = AppHost(log_dir, {**env, "AIPROXY_USAGE_SPILL_DIR": str(tmp_path / "a")}, name="lost")
    setup = EventSetup(lost, sim)
    client = openai.AzureOpenAI(
        azure_endpoint=lost.base, api_key=setup.key, api_version="2024-10-21", max_retries=0
    )
    streams = 5
    started = threading.Barrier(streams + 1, timeout=120)

    def stream(n: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"{n} {SLOW}"}],
            max_tokens=MAX_TOKENS, stream=True,
        )  # fmt: skip
        chunks = iter(raw.parse())
        next(chunks)
        started.wait()
        try:
            for _ in chunks:
                pass
        except (openai.APIError, httpx.HTTPError):
            pass
        return raw.headers["x-aiproxy-request-id"]

    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(stream, n) for n in range(streams)]
        started.wait()
        worker = lost.status()["worker"]["pid"]
        lost.proc.process.kill()  # the host first: it starts no new worker
        os.kill(worker, signal.SIGKILL)
        ids = sorted(future.result(timeout=60) for future in futures)
    lost.stop()
    others = [
        AppHost(log_dir, {**env, "AIPROXY_USAGE_SPILL_DIR": str(tmp_path / name)}, name=name)
        for name in ("other-b", "other-c")
    ]
    try:

        def recorded() -> list[dict[str, Any]]:
            with ThreadPoolExecutor(2) as both:
                list(both.map(lambda host: run_timer(host, "rollup_usage"), others))
            rows = storage.rows("usage", f"event_id eq '{setup.id}'")
            return rows if len(rows) >= streams else []

        rows = wait_until(recorded, timeout=60, interval=0.5)
        worst = sum(row["total_tokens"] for row in rows)
        wait_until(lambda: today(others[0], setup.key)["tokens_used"] == worst, timeout=20)
        claims = sum(host.log().count("never ended; recorded") for host in others)
    finally:
        for host in others:
            host.stop()
    assert sorted(row["request_id"] for row in rows) == ids  # each once
    assert all(row["estimated"] and row["outcome"] == "worker_lost" for row in rows)
    assert claims == streams  # one claim per entry over both instances
