"""What the proxy adds to an MCP tool call: one tools/call through /api/mcp/{name} against the
same call sent to the MCP server directly, in one run.

The MCP server is the SDK's (local/mcpserver.py, event-stream answers), the app runs as on
Azure (the host stand-in and its Python worker, bench/servers.py), storage is Azurite. Calls go
one at a time, direct and proxied alternating, each in its own session opened beforehand, so
the difference is the proxy's: the key check, the session's seal, the allowed tools, the caps,
the relay of the answer's events and the usage record. The worker's CPU per proxied call is
its CPU time over the proxied calls. Part of `make bench`; writes bench/results/mcp.md.

Run: python -m bench.mcp [calls]
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.servers import OPERATOR_KEY, Server, WorkerApp
from local.azurite import Azurite, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "mcp.md"
TOKEN = "bench-mcp-token"
PROTOCOL = "2025-06-18"
ACCEPT = {"accept": "application/json, text/event-stream", "mcp-protocol-version": PROTOCOL}
CALL = {
    "jsonrpc": "2.0", "id": 2, "method": "tools/call",
    "params": {"name": "add", "arguments": {"a": 2, "b": 40}},
}  # fmt: skip


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session(client: httpx.Client, url: str, headers: dict[str, str]) -> dict[str, str]:
    """initialize and initialized: the headers of the session's next messages."""
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {},
        "clientInfo": {"name": "bench", "version": "1"}}}  # fmt: skip
    answer = client.post(url, json=init, headers={**ACCEPT, **headers})
    answer.raise_for_status()
    headers = {**ACCEPT, **headers, "mcp-session-id": answer.headers["mcp-session-id"]}
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    client.post(url, json=done, headers=headers).raise_for_status()
    return headers


def call(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    answer = client.post(url, json=CALL, headers=headers)
    elapsed = time.perf_counter() - started
    if answer.status_code != 200 or '"42"' not in answer.text:
        raise RuntimeError(f"{url}: {answer.status_code} {answer.text[:300]}")
    return elapsed


def setup(app: WorkerApp, mcp_url: str) -> str:
    """An event with the MCP server in its catalog; an attendee's key."""
    manage = httpx.Client(
        base_url=f"{app.base}/api/manage", headers={"x-aiproxy-operator-key": OPERATOR_KEY},
        timeout=30,
    )  # fmt: skip
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    event = manage.post("/events", json={
        "name": "MCP bench", "time_zone": "UTC", "max_token_cap": 512,
        "daily_request_cap": 1_000_000, "starts_at": (now - timedelta(hours=1)).isoformat(),
        "ends_at": (now + timedelta(hours=2)).isoformat()})  # fmt: skip
    event.raise_for_status()
    event_id = event.json()["id"]
    resource = manage.post("/resources", json={
        "name": "bench tools", "deployment": "tools", "model_class": "mcp", "endpoint": mcp_url,
        "auth": "bearer", "api_key": TOKEN, "allowed_tools": ["add"]})  # fmt: skip
    resource.raise_for_status()
    manage.put(f"/events/{event_id}/resources/{resource.json()['id']}").raise_for_status()
    attendee = manage.post(f"/events/{event_id}/attendees", json={"user": "bench@example.com"})
    attendee.raise_for_status()
    manage.close()
    return attendee.json()["api_key"]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run(calls: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-mcp-"))
    azurite = Azurite(free_port()).start()
    mcp = Server("mcp", [sys.executable, "-m", "local.mcpserver", "--port", "{port}", "--token",
                         TOKEN], dict(os.environ), work / "mcp.log")  # fmt: skip
    app = WorkerApp(work, azurite.connection_string, None, None, "benchmcp")
    try:
        mcp.wait()
        app.wait()
        mcp_url = f"{mcp.base}/mcp"
        key = setup(app, mcp_url)
        proxy_url = f"{app.base}/api/mcp/tools"
        with httpx.Client(timeout=30) as client:
            direct = session(client, mcp_url, {"authorization": f"Bearer {TOKEN}"})
            proxied = session(client, proxy_url, {"authorization": f"Bearer {key}"})
            for _ in range(20):  # warm both paths
                call(client, mcp_url, direct)
                call(client, proxy_url, proxied)
            direct_times, proxied_times, worker_cpu = [], [], 0.0
            for _ in range(calls):
                direct_times.append(call(client, mcp_url, direct))
                before = cpu_seconds(app.worker_pid)
                proxied_times.append(call(client, proxy_url, proxied))
                worker_cpu += cpu_seconds(app.worker_pid) - before
    finally:
        app.stop()
        mcp.stop()
        azurite.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "calls": calls,
        "direct_p50_ms": statistics.median(direct_times) * 1000,
        "direct_p95_ms": percentile(direct_times, 0.95) * 1000,
        "proxied_p50_ms": statistics.median(proxied_times) * 1000,
        "proxied_p95_ms": percentile(proxied_times, 0.95) * 1000,
        "added_p50_ms": (statistics.median(proxied_times) - statistics.median(direct_times)) * 1000,
        "worker_cpu_ms_per_call": worker_cpu / calls * 1000,
    }


def report(numbers: dict[str, Any]) -> str:
    return "\n".join([
        "# MCP tool calls: direct and through the proxy",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; {numbers['calls']} sequential tools/call each way "
        "(event-stream answers), `python -m bench.mcp`.",
        "",
        "| | p50 ms | p95 ms |",
        "|---|---|---|",
        f"| direct | {numbers['direct_p50_ms']:.2f} | {numbers['direct_p95_ms']:.2f} |",
        f"| through the proxy | {numbers['proxied_p50_ms']:.2f} | "
        f"{numbers['proxied_p95_ms']:.2f} |",
        "",
        f"Added at the median: {numbers['added_p50_ms']:.2f} ms; worker CPU per proxied call: "
        f"{numbers['worker_cpu_ms_per_call']:.2f} ms (the worker's CPU time, /proc, over the "
        "proxied calls; /proc counts in clock ticks, so this is an average over many calls).",
        "",
    ])  # fmt: skip


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    text = report(run(calls))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
