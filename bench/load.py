"""Load run: 200 concurrent streaming clients for 60 s through one dev host.

Answers three questions: does any call that the upstream answered fail, is there exactly one
usage record per call, and does memory come back near its start afterwards. The upstream is
the simulator with real per-token latency, so streams overlap as they do at an event.

Run: python -m bench.load  (LOAD_CLIENTS=200, LOAD_SECONDS=60 to change the size)
Writes bench/results/load.md and load.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from azure.data.tables import TableServiceClient
from cryptography.fernet import Fernet

from local.azurite import Azurite, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FUNCTION_KEY = "bench-function-key"
SIM_KEY = "bench-sim-key"
PREFIX = "load"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pinned(cpu: int, args: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *args] if os.cpu_count() and os.cpu_count() > 1 else args


def set_up(base: str, simulator: str) -> tuple[str, str]:
    manage = httpx.Client(base_url=f"{base}/manage", headers={"x-functions-key": FUNCTION_KEY})
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


async def drive(base: str, key: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` loops of streamed chat calls until `seconds` have passed (bounded)."""
    url = f"{base}/openai/deployments/chat/chat/completions?api-version=2024-10-21"
    body = json.dumps(
        {"messages": [{"role": "user", "content": "Tell me about the sea."}], "stream": True}
    )
    headers = {"api-key": key, "content-type": "application/json"}
    stats = {"started": 0, "ok": 0, "failed": 0, "errors": {}}
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            stats["started"] += 1
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    text = await response.text()
                    if response.status == 200 and text.rstrip().endswith("data: [DONE]"):
                        stats["ok"] += 1
                        continue
                    reason = f"{response.status} {text[:120]}"
            except Exception as exc:  # counted and reported, never hidden
                reason = type(exc).__name__
            stats["failed"] += 1
            stats["errors"][reason] = stats["errors"].get(reason, 0) + 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
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
    if os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})  # the load client stays off the dev host's core
    azurite = Azurite(free_port()).start()
    sim_port, host_port = free_port(), free_port()
    env = {
        **os.environ,
        "AIPROXY_STORAGE_CONNECTION_STRING": azurite.connection_string,
        "AIPROXY_TABLE_PREFIX": PREFIX,
        "AIPROXY_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "AIPROXY_FUNCTION_KEY": FUNCTION_KEY,
    }
    simulator = subprocess.Popen(
        pinned(1, [sys.executable, "-m", "local.simulator", "--port", str(sim_port),
                   "--api-key", SIM_KEY, "--latency-ms-per-token", "20"]),
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    host = subprocess.Popen(
        pinned(0, [sys.executable, "-m", "local.devhost", "--port", str(host_port),
                   "--settings", str(ROOT / "local.settings.example.json")]),
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port(sim_port, process=simulator)
        wait_for_port(host_port, timeout=60, process=host)
        base = f"http://127.0.0.1:{host_port}/api"
        event_id, key = set_up(base, f"http://127.0.0.1:{sim_port}")
        warm = asyncio.run(drive(base, key, 10, 2))  # warm: caches, connections, counters
        warm_records = count_records(azurite.connection_string, event_id, warm["started"])
        before = rss_mib(host.pid)
        started = time.monotonic()
        stats = asyncio.run(drive(base, key, clients, seconds))
        elapsed = time.monotonic() - started
        peak = rss_mib(host.pid)
        records = count_records(
            azurite.connection_string, event_id, warm_records + stats["started"]
        )
        time.sleep(30)
        after = rss_mib(host.pid)
    finally:
        host.terminate()
        simulator.terminate()
        log = host.communicate(timeout=30)[1]
        simulator.wait(10)
        azurite.stop()
    result = {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "calls": stats["started"],
        "ok": stats["ok"],
        "failed": stats["failed"],
        "errors": stats["errors"],
        "calls_per_second": round(stats["started"] / elapsed, 1),
        "usage_records": records - warm_records,
        "rss_mib": {
            "before": round(before, 1),
            "peak": round(peak, 1),
            "after_30s": round(after, 1),
        },
        "devhost_errors": [line for line in log.splitlines() if " ERROR " in line][:5],
    }
    report = f"""# Load run: {clients} concurrent streaming clients for {seconds:.0f} s

One dev host on CPU 0; the simulator (16-token answers at 20 ms a token) and the client on
CPU 1; Azurite in memory. Every call is a streamed chat completion read to `data: [DONE]`.

| calls | ok | failed | calls/s | usage records | RSS before | RSS peak | RSS 30 s after |
|---:|---:|---:|---:|---:|---:|---:|---:|
| {result["calls"]:,} | {result["ok"]:,} | {result["failed"]} | {result["calls_per_second"]} | {result["usage_records"]:,} | {before:.1f} MiB | {peak:.1f} MiB | {after:.1f} MiB |

Failures by reason: {json.dumps(stats["errors"]) if stats["errors"] else "none"}.
Dev host errors logged: {len(result["devhost_errors"])}.
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.md").write_text(report)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report)
    ok = stats["failed"] == 0 and result["usage_records"] == stats["started"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
