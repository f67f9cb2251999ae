"""What the journal of calls in flight costs per call (shared/governance/journal.py).

Two instances of the app as Azure runs it (host stand-in and worker process), on the same
Azurite and the same simulated upstream, one with the journal (the default expiry) and one
without (`AIPROXY_CALL_EXPIRY_SECONDS=0`), measured in alternating rounds in one run:

- the time to the first byte of sequential streamed calls (one keep-alive connection, like one
  SDK client), with an upstream that answers at once (the journal's write is then all on the
  path to the first byte: its worst case) and with one that takes 40 ms to its first byte (a
  fast model: the write goes on while the request is upstream), and with 16 clients at once
  on that upstream (entries admitted while one is written go together in the next write);
- the worker's CPU per call over the same rounds.

Both instances and Azurite share this machine, so the figures carry its noise; the difference
of medians over several rounds is what to read. Writes bench/results/journal.md.

Run: python -m bench.journal [calls per round] [rounds]
"""

from __future__ import annotations

import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench.run import _Connection, cpu_seconds, window
from bench.servers import Server, WorkerApp
from local.azurite import Azurite

RESULTS = Path(__file__).resolve().parent / "results" / "journal.md"
API_VERSION = "2024-10-21"
UPSTREAMS = {"at once": 0, "40 ms to first byte": 40}
CONNECTIONS = 16  # clients at once in the concurrent rounds
CONCURRENT = f"40 ms, {CONNECTIONS} clients at once"


def request(port: int, key: str, first_byte_ms: int) -> bytes:
    body = orjson.dumps(
        {
            "messages": [{"role": "user", "content": f"hi [sim:first_byte_ms={first_byte_ms}]"}],
            "max_tokens": 8,
            "stream": True,
        }
    )
    path = f"/api/openai/deployments/bench/chat/completions?api-version={API_VERSION}"
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\napi-key: {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def round_of(app: WorkerApp, key: str, first_byte_ms: int, calls: int) -> tuple[list[float], float]:
    """First-byte times (ms) of `calls` sequential streams, and the worker's CPU per call (us)."""
    message = request(app.port, key, first_byte_ms)
    connection = _Connection(app.port)
    firsts = []
    try:
        for _ in range(5):  # warm the connection and the caches
            connection.exchange(message)
        cpu = cpu_seconds(app.measured_pid)
        for _ in range(calls):
            status, first_byte, _, _, content = connection.exchange(message)
            if status != 200 or not content.rstrip().endswith(b"data: [DONE]"):
                raise RuntimeError(f"{app.name}: {status} {content[:300]!r}")
            firsts.append(first_byte * 1000)
        cpu = cpu_seconds(app.measured_pid) - cpu
    finally:
        connection.close()
    return firsts, cpu / calls * 1e6


def concurrent_round(
    app: WorkerApp, key: str, first_byte_ms: int, calls: int, connections: int = CONNECTIONS
) -> tuple[list[float], float]:
    """The same with `connections` clients at once (`calls` each): entries admitted while one
    is being written go together in the next write."""
    import threading

    message = request(app.port, key, first_byte_ms)
    firsts: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        connection = _Connection(app.port)
        mine = []
        try:
            for _ in range(calls):
                status, first_byte, _, _, content = connection.exchange(message)
                if status != 200:
                    raise RuntimeError(f"{app.name}: {status} {content[:300]!r}")
                mine.append(first_byte * 1000)
        finally:
            connection.close()
        with lock:
            firsts.extend(mine)

    cpu = cpu_seconds(app.measured_pid)
    threads = [threading.Thread(target=client) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    cpu = cpu_seconds(app.measured_pid) - cpu
    return firsts, cpu / max(len(firsts), 1) * 1e6


def event_on(app: WorkerApp, upstream: str) -> str:
    """An event with the `bench` deployment on the simulator; returns the attendee key."""
    import httpx

    from bench.servers import OPERATOR_KEY

    with httpx.Client(
        base_url=f"{app.base}/api/manage", headers={"x-aiproxy-operator-key": OPERATOR_KEY},
        timeout=30,
    ) as manage:  # fmt: skip
        event = manage.post(
            "/events",
            json={"name": "Journal bench", **window(), "max_token_cap": 512,
                  "daily_request_cap": 100_000_000},
        ).json()  # fmt: skip
        resource = manage.post(
            "/resources",
            json={"name": "bench", "deployment": "bench", "model_class": "openai-chat",
                  "endpoint": upstream, "auth": "key", "api_key": "simkey"},
        ).json()  # fmt: skip
        manage.put(f"/events/{event['id']}/resources/{resource['id']}").raise_for_status()
        attendee = manage.post(f"/events/{event['id']}/attendees", json={"user": "b@example.com"})
        return attendee.json()["api_key"]


def measure(calls: int, rounds: int) -> dict[str, Any]:
    import os

    from local.azurite import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    azurite = Azurite(free_port()).start()
    sim = Server(
        "simulator",
        [sys.executable, "-m", "local.simulator", "--port", "{port}", "--api-key", "simkey"],
        dict(os.environ),
        work / "sim.log",
    )
    apps: dict[str, WorkerApp] = {}
    try:
        sim.wait()
        upstream = sim.base
        for name, expiry in (("with journal", "300"), ("without", "0")):
            apps[name] = WorkerApp(
                work, azurite.connection_string, None, None, f"bj{expiry}",
                name=name.replace(" ", "-"), AIPROXY_CALL_EXPIRY_SECONDS=expiry,
            )  # fmt: skip
        for app in apps.values():
            app.wait()
        keys = {name: event_on(app, upstream) for name, app in apps.items()}
        firsts: dict[tuple[str, str], list[float]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for upstream_name, first_byte_ms in UPSTREAMS.items():
                for name, app in apps.items():
                    f, c = round_of(app, keys[name], first_byte_ms, calls)
                    firsts.setdefault((name, upstream_name), []).extend(f)
                    cpus.setdefault((name, upstream_name), []).append(c)
            for name, app in apps.items():
                f, c = concurrent_round(app, keys[name], 40, max(calls // CONNECTIONS, 5))
                firsts.setdefault((name, CONCURRENT), []).extend(f)
                cpus.setdefault((name, CONCURRENT), []).append(c)
        return {
            "calls": calls,
            "rounds": rounds,
            "rows": [
                {
                    "upstream": upstream_name,
                    "app": name,
                    "p50": statistics.median(firsts[(name, upstream_name)]),
                    "p90": statistics.quantiles(firsts[(name, upstream_name)], n=10)[-1],
                    "cpu_us": statistics.median(cpus[(name, upstream_name)]),
                }
                for upstream_name in (*UPSTREAMS, CONCURRENT)
                for name in apps
            ],
        }
    finally:
        for app in apps.values():
            app.stop()
        sim.stop()
        azurite.stop()
        shutil.rmtree(work, ignore_errors=True)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# The journal of calls in flight: cost per call",
        "",
        f"{result['rounds']} alternating rounds of {result['calls']} sequential streamed chat "
        f"calls per instance and upstream, and of {CONNECTIONS} clients at once making "
        f"{max(result['calls'] // CONNECTIONS, 5)} calls each; the app as Azure runs it (host stand-in and worker), "
        f"Azurite and the simulator on the same machine ({platform.machine()}, "
        f"{platform.python_version()}). First byte: milliseconds from the request's last byte "
        "to the answer's first; CPU: the worker's, per call, median of the rounds.",
        "",
        "| upstream | instance | first byte p50 | p90 | worker CPU per call |",
        "|---|---|---:|---:|---:|",
    ]
    rows = result["rows"]
    for row in rows:
        lines.append(
            f"| {row['upstream']} | {row['app']} | {row['p50']:.2f} ms | {row['p90']:.2f} ms "
            f"| {row['cpu_us']:.0f} us |"
        )
    lines += ["", "Added by the journal:", ""]
    for upstream in (*UPSTREAMS, CONCURRENT):
        on, off = (next(r for r in rows if r["upstream"] == upstream and r["app"] == name)
                   for name in ("with journal", "without"))  # fmt: skip
        lines.append(
            f"- upstream {upstream}: first byte {on['p50'] - off['p50']:+.2f} ms (p50), "
            f"worker CPU {on['cpu_us'] - off['cpu_us']:+.0f} us per call"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    text = markdown(measure(calls, rounds))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
