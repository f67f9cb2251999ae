"""Load run: 200 concurrent streaming clients for 60 s through the host stand-in and one worker.

Answers three questions: does any call that the upstream answered fail, is there exactly one
usage record per call, and does the worker's memory come back near its start afterwards. The
upstream is the simulator with real per-token latency, so streams overlap as they do at an
event. The app runs as Azure runs it: the host stand-in (local/host.py) on CPU 1 beside the
simulator and the client, the Python worker process alone on CPU 0.

Run: python -m bench.load  (LOAD_CLIENTS=200, LOAD_SECONDS=60 to change the size)
Writes bench/results/load.md and load.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from azure.data.tables import TableServiceClient

from bench.run import cpu_seconds, log_problems
from bench.servers import OPERATOR_KEY, WorkerApp, pinned
from local.azurite import Azurite, free_port, wait_for_port
from local.process import stop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SIM_KEY = "bench-sim-key"
PREFIX = "load"
WORKER_CPU, LOAD_CPU = 0, 1
TOKEN_MS = 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def set_up(base: str, simulator: str) -> tuple[str, str]:
    manage = httpx.Client(
        base_url=f"{base}/manage", headers={"x-aiproxy-operator-key": OPERATOR_KEY}, timeout=30
    )
    today = datetime.now(UTC)
    event = (
        manage.post(
            "/events",
            json={
                "name": "load",
                "starts_at": (today - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S"),
                "ends_at": (today + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S"),
                "time_zone": "UTC",
                "max_token_cap": 4096,
                "daily_request_cap": 100_000_000,
            },
        )
        .raise_for_status()
        .json()
    )
    resource = manage.post(
        "/resources",
        json={"name": "sim", "deployment": "chat", "model_class": "openai-chat",
              "endpoint": simulator, "api_key": SIM_KEY},
    ).raise_for_status().json()  # fmt: skip
    manage.put(f"/events/{event['id']}/resources/{resource['id']}").raise_for_status()
    attendee = manage.post(f"/events/{event['id']}/attendees", json={"user": "load"})
    return event["id"], attendee.raise_for_status().json()["api_key"]


async def drive(
    base: str, key: str, clients: int, seconds: float, watch_pid: int = 0
) -> dict[str, Any]:
    """`clients` loops of streamed chat calls until `seconds` have passed (bounded); the peak
    RSS of `watch_pid` meanwhile."""
    url = f"{base}/openai/deployments/chat/chat/completions?api-version=2024-10-21"
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Tell me about the sea."}], "stream": True}
    )
    headers = {"api-key": key, "content-type": "application/json"}
    stats: dict[str, Any] = {"started": 0, "ok": 0, "failed": 0, "errors": {}, "peak": 0.0}
    durations: list[float] = []
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            stats["started"] += 1
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    text = await response.text()
                    if response.status == 200 and text.rstrip().endswith("data: [DONE]"):
                        stats["ok"] += 1
                        durations.append((time.perf_counter() - started) * 1000)
                        continue
                    reason = f"{response.status} {text[:120]}"
            except Exception as exc:  # counted and reported, never hidden
                reason = type(exc).__name__
            stats["failed"] += 1
            stats["errors"][reason] = stats["errors"].get(reason, 0) + 1

    async def watch() -> None:
        while watch_pid and time.monotonic() < deadline + 5:
            stats["peak"] = max(stats["peak"], rss_mib(watch_pid))
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    watcher.cancel()
    ordered = sorted(durations)
    stats["p50_ms"] = round(statistics.median(ordered), 1) if ordered else None
    stats["p99_ms"] = round(ordered[int(len(ordered) * 0.99)], 1) if ordered else None
    return stats


def count_records(connection: str, event_id: str, expect: int, limit: float = 120) -> int:
    table = TableServiceClient.from_connection_string(connection).get_table_client(f"{PREFIX}usage")
    deadline, found = time.monotonic() + limit, 0
    while time.monotonic() < deadline:
        found = sum(1 for _ in table.query_entities(f"event_id eq '{event_id}'", select=["RowKey"]))
        if found >= expect:
            break
        time.sleep(2)
    return found


def main() -> int:
    clients = int(os.environ.get("LOAD_CLIENTS", "200"))
    seconds = float(os.environ.get("LOAD_SECONDS", "60"))
    two_cores = len(os.sched_getaffinity(0)) >= 2
    if two_cores:
        os.sched_setaffinity(0, {LOAD_CPU})  # the client stays off the worker's core
    load_cpu = LOAD_CPU if two_cores else None
    work = Path(tempfile.mkdtemp(prefix="aiproxy-load-"))
    azurite = Azurite(free_port()).start()
    sim_port = free_port()
    simulator = subprocess.Popen(
        pinned(load_cpu, [sys.executable, "-m", "local.simulator", "--port", str(sim_port),
                          "--api-key", SIM_KEY, "--latency-ms-per-token", str(TOKEN_MS)]),
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    worker = WorkerApp(
        work, azurite.connection_string, load_cpu, WORKER_CPU if two_cores else None, PREFIX
    )
    try:
        wait_for_port(sim_port, process=simulator)
        worker.wait()
        base = f"{worker.base}/api"
        event_id, key = set_up(base, f"http://127.0.0.1:{sim_port}")
        warm = asyncio.run(drive(base, key, 10, 2))  # warm: caches, connections, counters
        warm_records = count_records(azurite.connection_string, event_id, warm["started"])
        pid = worker.repin()
        before, host_before = rss_mib(pid), rss_mib(worker.host_pid)
        cpu_before, host_cpu_before = cpu_seconds(pid), cpu_seconds(worker.host_pid)
        started = time.monotonic()
        stats = asyncio.run(drive(base, key, clients, seconds, watch_pid=pid))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(pid) - cpu_before
        host_cpu = cpu_seconds(worker.host_pid) - host_cpu_before
        peak = max(stats["peak"], rss_mib(pid))
        records = count_records(
            azurite.connection_string, event_id, warm_records + stats["started"]
        )
        time.sleep(30)
        after, host_after = rss_mib(pid), rss_mib(worker.host_pid)
        status = worker.status()["worker"]
    finally:
        worker.stop()
        stop(simulator)
        azurite.stop()
    log = worker.log()
    shutil.rmtree(work, ignore_errors=True)
    problems = log_problems(log)
    result = {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "calls": stats["started"],
        "ok": stats["ok"],
        "failed": stats["failed"],
        "errors": stats["errors"],
        "calls_per_second": round(stats["started"] / elapsed, 1),
        "call_p50_ms": stats["p50_ms"],
        "call_p99_ms": stats["p99_ms"],
        "usage_records": records - warm_records,
        "worker": {
            "runtime_version": status.get("runtime_version"),
            "restarts": status.get("restarts"),
            "same_process": status.get("pid") == pid,
            "cpu_busy": round(cpu / elapsed, 3),
            "cpu_ms_per_call": round(cpu * 1000 / max(stats["started"], 1), 3),
        },
        "host_cpu_busy": round(host_cpu / elapsed, 3),
        "rss_mib": {
            "before": round(before, 1),
            "peak": round(peak, 1),
            "after_30s": round(after, 1),
        },
        "host_rss_mib": {"before": round(host_before, 1), "after_30s": round(host_after, 1)},
        "log_errors": problems["distinct_errors"][:5],
        "log_error_count": problems["errors"],
    }
    w = result["worker"]
    report = f"""# Load run: {clients} concurrent streaming clients for {seconds:.0f} s, through the worker

The app as Azure runs it: one Python worker process (azure-functions-runtime
{w["runtime_version"]}) alone on CPU 0, behind the host stand-in (local/host.py) on CPU 1 with
the simulator (16-token answers at {TOKEN_MS} ms a token) and the client; Azurite in memory.
Every call is a streamed chat completion read to `data: [DONE]`.

| calls | ok | failed | calls/s | call p50 ms | call p99 ms | usage records | worker RSS before | worker RSS peak | worker RSS 30 s after |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| {result["calls"]:,} | {result["ok"]:,} | {result["failed"]} | {result["calls_per_second"]} | {stats["p50_ms"]} | {stats["p99_ms"]} | {result["usage_records"]:,} | {before:.1f} MiB | {peak:.1f} MiB | {after:.1f} MiB |

Failures by reason: {json.dumps(stats["errors"]) if stats["errors"] else "none"}.
Every call has exactly one usage record: {"yes" if result["usage_records"] == stats["started"] else "NO"}.
The worker used {w["cpu_busy"]:.0%} of its core ({w["cpu_ms_per_call"]} ms CPU per call), the
host stand-in {result["host_cpu_busy"]:.0%} of CPU 1 (RSS {host_before:.1f} MiB before,
{host_after:.1f} MiB after). Worker restarts: {w["restarts"]}; same worker process throughout:
{"yes" if w["same_process"] else "NO"}. Errors in the host's and worker's log: {problems["errors"]}.
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.md").write_text(report)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report)
    ok = (
        stats["failed"] == 0
        and result["usage_records"] == stats["started"]
        and w["same_process"]
        and not w["restarts"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
