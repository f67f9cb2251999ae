"""`make bench`: the proxy's throughput, latency, CPU per request, TTFB and memory, through
the Functions worker runtime, beside the Python floor and the in-process figures of before.

The harness of shared BENCHMARKS.md: a very fast fake Azure OpenAI upstream (nginx, see
bench/nginx.py) and the load generator wrk share CPU 1. Measured side by side, each alone on
CPU 0, in one run:

- `direct`: wrk straight at nginx (the harness's ceiling);
- `relay`: a bare aiohttp relay (bench/relay.py), the least a Python proxy costs (the floor);
- `in-process`: bench only, the app's functions in one uvicorn process (bench/inprocess.py),
  the way the project was measured before it ran on the worker runtime;
- `worker`: the app as Azure runs it, in the Python worker process (`azure_functions_runtime`)
  started by the host stand-in (local/host.py). The stand-in plays the platform's part (on Azure
  it is the Functions host, .NET, outside our Python process), so it stays on CPU 1 with the
  harness and its CPU is reported on its own; the worker is moved onto CPU 0 once it runs.

The app has everything switched on (key and event checks, usage records to Azurite, flushed
every second). Azurite stands in for Table Storage, a separate service in Azure, so it runs on
CPU 1 and not on the proxy's core.

Runs (wrk -t1, --latency, 30 s timeout, BENCH_SECONDS each, default 15): plain and streamed chat
at 1, 16 and 64 connections for each target, interleaved; the relay under uvloop too at 16. The
key figure: at 16 connections, the worker's CPU per request over the relay's. Then the time to
first byte of 200 sequential streams per target, and the worker's RSS after its first 10k
requests and after 200k (BENCH_MEMORY=0 skips the 200k). Writes bench/results/latest.md and
bench/results/latest.json.

Run: python -m bench.run (make bench installs what it needs first).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.nginx import request_body
from bench.servers import FUNCTION_KEY, OPERATOR_KEY, WorkerApp, pinned

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LUA = BENCH / "chat.lua"

API_VERSION = "2024-10-21"
CONNECTIONS = (1, 16, 64)
MODES = ("json", "stream")
KEY_CONNECTIONS = 16  # where the worker's CPU per request is held against the relay's
PROXY_CPU, LOAD_CPU = 0, 1
SETTLE_SECONDS = 2.5  # after a run: the usage writer (1 s batches) finishes on the run's bill
TTFB_REQUESTS, TTFB_WARMUP = 200, 10
MEMORY_FIRST, MEMORY_TOTAL, MEMORY_LIMIT_SECONDS = 10_000, 200_000, 600
QUIET_WAIT_SECONDS = 120  # at most, for other work on this machine to end before the runs
USAGE_WAIT_SECONDS = 180  # for the usage writer's backlog to reach Azurite after the runs
WORKER_TABLES, IN_PROCESS_TABLES = "bench", "benchinproc"
APPS = ("in-process", "worker")
FLOOR = "worker, relay function"  # bench/relay_function.py in the worker runtime  # the targets that run the app (usage records, settling)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


# --- tools ----------------------------------------------------------------------------------


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )


def ensure_tools() -> None:
    """nginx, wrk and taskset; installed with apt-get when we are root, else say how."""
    missing = [name for name in ("nginx", "wrk") if _which(name) is None]
    if missing:
        command = "apt-get update && apt-get install -y nginx wrk"
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            print(
                f"bench: {' and '.join(missing)} missing. Install them first:\n"
                f"    sudo sh -c '{command}'",
                file=sys.stderr,
            )
            sys.exit(2)
        print(f"bench: installing {' '.join(missing)}: {command}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx", "wrk"], check=True, env=env)
    for name in ("nginx",):
        path = _which(name)
        if path and shutil.which(name) is None:
            os.environ["PATH"] += os.pathsep + str(Path(path).parent)
    if shutil.which("taskset") is None:
        print("bench: taskset (util-linux) is missing.", file=sys.stderr)
        sys.exit(2)


# --- /proc ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_times() -> dict[int, tuple[float, float, float]]:
    """Per CPU: (busy, steal, total) seconds since boot, from /proc/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            numbers = [int(v) for v in values]
            idle = numbers[3] + numbers[4]  # idle, iowait
            steal = numbers[7] if len(numbers) > 7 else 0
            total = sum(numbers[:8])
            times[int(name[3:])] = ((total - idle - steal) / tick, steal / tick, total / tick)
    return times


def machine_load(
    before: dict[int, tuple[float, float, float]],
    after: dict[int, tuple[float, float, float]],
    measured_cpu: float,
) -> dict[str, float]:
    """How busy each core was during a run, and what ran on the proxy's core besides the
    process measured (other work on this machine would skew the figures)."""
    load: dict[str, float] = {}
    for cpu in sorted(after):
        busy = after[cpu][0] - before[cpu][0]
        steal = after[cpu][1] - before[cpu][1]
        total = (after[cpu][2] - before[cpu][2]) or 1.0
        load[f"cpu{cpu}_busy"] = round(busy / total, 3)
        load[f"cpu{cpu}_steal"] = round(steal / total, 3)
        if cpu == PROXY_CPU:
            load[f"cpu{cpu}_other"] = round(max(0.0, busy - measured_cpu) / total, 3)
    return load


QUIET_BELOW = 0.15  # a core this busy with nothing of ours running: other work is on


def machine_busy(seconds: float = 2.0) -> dict[str, float]:
    """Each core's busy share over `seconds`: before a run, what else this machine is doing
    (other work skews every figure; the report says how busy it was)."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    return {
        f"cpu{cpu}": round(
            (after[cpu][0] - before[cpu][0]) / ((after[cpu][2] - before[cpu][2]) or 1), 3
        )
        for cpu in sorted(after)
    }


def wait_for_quiet(limit_seconds: float, threshold: float = QUIET_BELOW) -> dict[str, float]:
    """Wait (at most `limit_seconds`) until no core is busier than `threshold` over 2 s:
    other work on a shared machine comes and goes. Returns the last reading."""
    deadline = time.monotonic() + limit_seconds
    while True:
        busy = machine_busy()
        if max(busy.values(), default=0.0) <= threshold or time.monotonic() > deadline:
            return busy


def warn_if_busy(busy: dict[str, float], who: str) -> None:
    if max(busy.values(), default=0.0) > QUIET_BELOW:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
        print(f"{who}: WARNING: this machine is busy before the run ({shares}): other work "
              "skews the figures", file=sys.stderr, flush=True)  # fmt: skip


def settle(pid: int, *, minimum: float = SETTLE_SECONDS, limit: float = 30.0) -> float:
    """Wait until the process is quiet (under 3% of a core for 0.5 s, after at least
    `minimum` s, at most `limit` s): its usage writer has caught up. Returns the seconds."""
    started = time.monotonic()
    time.sleep(minimum)
    while time.monotonic() - started < limit:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < 0.015:
            break
    return time.monotonic() - started


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(args: list[str]) -> str:
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=10)
        except OSError:
            return ""
        return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout + out.stderr else ""

    from importlib.metadata import version as package_version

    packages = {}
    for name in (
        "azure-functions-runtime", "azure-functions", "uvicorn", "httptools", "uvloop",
        "aiohttp", "fastapi", "starlette", "grpcio", "azure-data-tables", "orjson",
    ):  # fmt: skip
        try:
            packages[name] = package_version(name)
        except Exception:
            packages[name] = ""
    git = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: no index refresh
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, env=git
    ).stdout.strip()
    changed = subprocess.run(  # earlier results being rewritten do not change what is measured
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=git,
    ).stdout.strip()

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "uncommitted_changes": bool(changed),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nginx": version(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": version(["wrk", "-v"]).split(" [")[0],
        "packages": packages,
    }


# --- set-up ---------------------------------------------------------------------------------


def window() -> dict[str, str]:
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    return {
        "starts_at": (now - timedelta(hours=1)).isoformat(),
        "ends_at": (now + timedelta(days=2)).isoformat(),
        "time_zone": "UTC",
    }


def set_up_event(base: str, upstreams: list[str]) -> tuple[str, str]:
    """An event with roomy caps, pools `bench` and `bench-stream` of two resources each
    (one per nginx port), and one attendee; returns (event id, attendee key)."""
    import httpx

    from bench.nginx import API_KEY, JSON_DEPLOYMENT, STREAM_DEPLOYMENT

    # The operator key; and the function key, which is what a commit from before the operator
    # key (an A side of bench.ab) took for manage/* (today's app gives it no power there).
    headers = {"x-aiproxy-operator-key": OPERATOR_KEY, "x-functions-key": FUNCTION_KEY}
    with httpx.Client(base_url=f"{base}/api/manage", headers=headers, timeout=30) as manage:

        def ok(response: httpx.Response) -> dict[str, Any]:
            if response.status_code >= 300:
                raise RuntimeError(f"management API: {response.status_code} {response.text}")
            return response.json()

        event = ok(
            manage.post(
                "/events",
                json={
                    "name": "Benchmark",
                    **window(),
                    "max_token_cap": 4096,
                    "daily_request_cap": 100_000_000,
                },
            )
        )
        for deployment in (JSON_DEPLOYMENT, STREAM_DEPLOYMENT):
            for number, url in enumerate(upstreams, 1):
                resource = ok(
                    manage.post(
                        "/resources",
                        json={
                            "name": f"{deployment} {number}",
                            "deployment": deployment,
                            "model_class": "openai-chat",
                            "endpoint": url,
                            "auth": "key",
                            "api_key": API_KEY,
                        },
                    )
                )
                ok(manage.put(f"/events/{event['id']}/resources/{resource['id']}"))
        attendee = ok(
            manage.post(f"/events/{event['id']}/attendees", json={"user": "bench@example.com"})
        )
    return event["id"], attendee["api_key"]


# --- targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str  # direct, relay, in-process, worker
    base: str  # http://127.0.0.1:port
    prefix: str  # "" or "/api"
    key: str

    def path(self, mode: str) -> str:
        from bench.nginx import JSON_DEPLOYMENT, STREAM_DEPLOYMENT

        deployment = STREAM_DEPLOYMENT if mode == "stream" else JSON_DEPLOYMENT
        return (
            f"{self.prefix}/openai/deployments/{deployment}/chat/completions"
            f"?api-version={API_VERSION}"
        )

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])


def smoke(target: Target) -> None:
    """One plain and one streamed answer, checked, before any load."""
    import httpx

    headers = {"api-key": target.key, "content-type": "application/json"}
    with httpx.Client(base_url=target.base, headers=headers, timeout=30) as client:
        plain = client.post(target.path("json"), content=request_body(False))
        if plain.status_code != 200 or plain.json().get("usage") is None:
            raise RuntimeError(f"{target.name} json: {plain.status_code} {plain.text[:500]}")
        stream = client.post(target.path("stream"), content=request_body(True))
        text = stream.text
        if (
            stream.status_code != 200
            or "text/event-stream" not in stream.headers.get("content-type", "")
            or not text.rstrip().endswith("data: [DONE]")
        ):
            raise RuntimeError(f"{target.name} stream: {stream.status_code} {text[:500]}")


# --- wrk ------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    mode: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    errors: dict[str, int]
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    cpu_ms_per_request: float | None = None  # the process measured (for `worker`, the worker)
    cpu_busy: float | None = None  # share of one core it used while wrk ran
    host_cpu_ms_per_request: float | None = None  # `worker` only: the host stand-in's
    host_cpu_busy: float | None = None
    settle_seconds: float | None = None  # after the run, until the process was quiet
    load: dict[str, float] | None = None  # per core: busy, steal; other work on the proxy's
    started: str = ""  # local wall clock, as the servers' logs are stamped
    ended: str = ""
    log: list[str] | None = None  # what the server logged from the start until quiet again


def wrk(
    target: Target,
    mode: str,
    connections: int,
    seconds: float,
    *,
    stop_after: int = 0,
    mix: bool = False,
) -> dict[str, Any]:
    """One wrk run; its BENCH_RESULT line. With stop_after, ends after that many responses."""
    env = {
        **os.environ,
        "BENCH_PATH": target.path(mode),
        "BENCH_STREAM": "1" if mode == "stream" else "0",
        "BENCH_MIX_PATH": target.path("stream") if mix else "",
        "BENCH_KEY": target.key,
        "BENCH_STOP_AFTER": str(stop_after),
    }
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s"]
    args += ["--latency", "-s", str(LUA), target.base]
    process = subprocess.Popen(
        pinned(LOAD_CPU if CPUS >= 2 else None, args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("BENCH_STOPPED") and process.poll() is None:
                process.send_signal(signal.SIGINT)  # wrk prints its summary on SIGINT

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(seconds + 90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    reader.join(10)
    for line in lines:
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError("wrk gave no result:\n" + "".join(lines)[-2000:])


def to_run(target: Target, mode: str, connections: int, result: dict[str, Any]) -> Run:
    seconds = result["duration_us"] / 1e6
    latency = result["latency_us"]
    errors = result["errors"]
    return Run(
        target=target.name,
        mode=mode,
        connections=connections,
        seconds=round(seconds, 2),
        requests=result["requests"],
        rps=round(result["requests"] / seconds, 1) if seconds else 0.0,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p999_ms=latency["p999"] / 1000,
        mean_ms=round(latency["mean"] / 1000, 3),
        max_ms=latency["max"] / 1000,
        non_2xx=errors["status"],
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        errors=errors,
    )


def measured_run(
    pid: int, target: Target, mode: str, connections: int, seconds: int
) -> tuple[Run, float]:
    """One wrk run at `target`, and the CPU process `pid` spent per request on it (ms), counted
    until the process is quiet again (A/B rounds: bench/ab.py, bench/percall.py)."""
    before = cpu_seconds(pid)
    run = to_run(target, mode, connections, wrk(target, mode, connections, seconds))
    settle(pid)
    return run, (cpu_seconds(pid) - before) * 1000 / max(run.requests, 1)


def warm_up(target: Target, pid: int, requests: int) -> None:
    """Check `target` answers, send it `requests` mixed calls, and wait until `pid` is quiet."""
    smoke(target)
    wrk(target, "json", 16, 120, stop_after=requests, mix=True)
    settle(pid)


def checkout(commit: str, tree: Path) -> str:
    """`commit` in a temporary git worktree at `tree`: '' when done, else why not."""
    added = subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), commit],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    return added.stderr.strip() if added.returncode else ""


def pin_to_cores() -> tuple[int | None, int | None]:
    """With two cores or more, this process (the load: wrk, nginx, Azurite are started from it)
    moves to the load core; the proxy's core and the load core, to pin the rest to (None, None
    on one core)."""
    if CPUS < 2:
        return None, None
    os.sched_setaffinity(0, {LOAD_CPU})
    return PROXY_CPU, LOAD_CPU


def stop_all(*servers: Any) -> None:
    """Stop what a bench started, in order; None stands for one it never got to start."""
    for server in servers:
        if server is not None:
            server.stop()


def remove_checkout(tree: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                   capture_output=True)  # fmt: skip


# --- time to first byte ---------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


class _Connection:
    """One keep-alive HTTP/1.1 connection on a raw socket, timing each response's arrival."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def _more(self) -> bytes:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data
        return data

    def exchange(self, request: bytes) -> tuple[int, float, float, float, bytes]:
        """(status, first byte s, first `data:` event s, whole response s, body)."""
        self.buffer = b""
        start = time.perf_counter()
        self.sock.sendall(request)
        self._more()
        first_byte = time.perf_counter() - start
        first_event = None
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        body = b""
        if b"data:" in self.buffer:
            first_event = time.perf_counter() - start
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                while b"\r\n" not in self.buffer:
                    self._more()
                size_line, rest = self.buffer.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(rest) < size + 2:
                    self._more()
                    if first_event is None and b"data:" in self.buffer:
                        first_event = time.perf_counter() - start
                    size_line, rest = self.buffer.split(b"\r\n", 1)
                if first_event is None and b"data:" in rest[:size]:
                    first_event = time.perf_counter() - start
                body += rest[:size]
                self.buffer = rest[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            while len(self.buffer) < length:
                self._more()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        total = time.perf_counter() - start
        return status, first_byte, first_event if first_event is not None else total, total, body

    def close(self) -> None:
        self.sock.close()


def ttfb(target: Target, count: int = TTFB_REQUESTS) -> dict[str, Any]:
    """Sequential streamed requests on one keep-alive connection, like one SDK client."""
    body = request_body(True)
    path = target.path("stream")
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
        f"Content-Type: application/json\r\napi-key: {target.key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    connection = _Connection(target.port)
    first_bytes, first_events, totals, failures = [], [], [], 0
    try:
        for i in range(TTFB_WARMUP + count):
            status, first_byte, first_event, total, content = connection.exchange(request)
            if i < TTFB_WARMUP:
                continue
            if status != 200 or not content.rstrip().endswith(b"data: [DONE]"):
                failures += 1
                continue
            first_bytes.append(first_byte * 1000)
            first_events.append(first_event * 1000)
            totals.append(total * 1000)
    finally:
        connection.close()

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(_percentile(values, 50), 3),
            "p99": round(_percentile(values, 99), 3),
            "mean": round(statistics.fmean(values), 3) if values else float("nan"),
        }

    return {
        "target": target.name,
        "requests": count,
        "failures": failures,
        "first_byte_ms": summary(first_bytes),
        "first_event_ms": summary(first_events),
        "whole_stream_ms": summary(totals),
    }


# --- usage records --------------------------------------------------------------------------


def count_usage(storage: str, prefix: str, limit_seconds: float = 120.0) -> tuple[int, bool]:
    """Usage rows in one app's bench tables (all from this run); (count, complete)."""
    from azure.data.tables import TableServiceClient

    service = TableServiceClient.from_connection_string(storage)
    table = service.get_table_client(f"{prefix}usage")
    deadline = time.monotonic() + limit_seconds
    count = 0
    try:
        for _ in table.list_entities(select=["RowKey"], results_per_page=1000):
            count += 1
            if count % 1000 == 0 and time.monotonic() > deadline:
                return count, False
    except Exception as exc:
        if "TableNotFound" in str(exc) or "ResourceNotFound" in str(exc):
            return 0, True
        raise
    return count, True


def await_usage(
    storage: str, prefix: str, expect: int, limit_seconds: float = USAGE_WAIT_SECONDS
) -> dict[str, Any]:
    """Count an app's usage rows until there are at least `expect` (a writer that fell behind,
    or waits out a storage retry, is still writing) or `limit_seconds` have passed."""
    started = time.monotonic()
    while True:
        count, complete = count_usage(storage, prefix)
        waited = time.monotonic() - started
        if count >= expect or waited > limit_seconds:
            return {
                "count": count,
                "complete": complete,
                "requests": expect,
                "waited_seconds": round(waited, 1),
            }
        time.sleep(3)


# --- report ---------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def table(runs: list[Run]) -> str:
    rows = [
        "| target | mode | conns | req/s | p50 ms | p90 ms | p99 ms | added p50 ms | "
        "added p99 ms | non-2xx | socket errors | CPU/req ms | CPU busy | "
        "host stand-in CPU/req ms | host stand-in busy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        rows.append(
            f"| {run.target} | {run.mode} | {run.connections} | {run.rps:,.0f} | "
            f"{_ms(run.p50_ms)} | {_ms(run.p90_ms)} | {_ms(run.p99_ms)} | "
            f"{_ms(run.added_p50_ms)} | {_ms(run.added_p99_ms)} | {run.non_2xx} | "
            f"{run.socket_errors} | {_ms(run.cpu_ms_per_request, 3)} | "
            f"{_share(run.cpu_busy)} | {_ms(run.host_cpu_ms_per_request, 3)} | "
            f"{_share(run.host_cpu_busy)} |"
        )
    return "\n".join(rows)


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def key_ratios(runs: list[Run]) -> dict[str, dict[str, float | None]]:
    """Per mode, at KEY_CONNECTIONS: each target's CPU per request over the relay's (the
    issue's target: the worker's at most 2), and its req/s as a share of the relay's."""
    ratios: dict[str, dict[str, float | None]] = {}
    for mode in MODES:
        at = {r.target: r for r in runs if r.mode == mode and r.connections == KEY_CONNECTIONS}
        relay = at.get("relay")
        if relay is None or not relay.cpu_ms_per_request:
            continue
        entry: dict[str, float | None] = {"relay_cpu_ms": relay.cpu_ms_per_request}
        for name, key in (("worker", "worker"), ("in-process", "in_process"),
                          ("relay, uvloop", "relay_uvloop"),
                          (FLOOR, "worker_relay_function")):  # fmt: skip
            run = at.get(name)
            if run is None or not run.cpu_ms_per_request:
                continue
            entry[f"{key}_cpu_ms"] = run.cpu_ms_per_request
            entry[f"{key}_over_relay"] = round(run.cpu_ms_per_request / relay.cpu_ms_per_request, 2)
            entry[f"{key}_rps_share"] = round(run.rps / relay.rps, 2) if relay.rps else None
            if run.host_cpu_ms_per_request is not None:
                both = run.cpu_ms_per_request + run.host_cpu_ms_per_request
                entry[f"{key}_with_host_over_relay"] = round(both / relay.cpu_ms_per_request, 2)
        worker, floor = at.get("worker"), at.get(FLOOR)
        if worker and floor and worker.cpu_ms_per_request and floor.cpu_ms_per_request:
            entry["worker_over_worker_relay_function"] = round(
                worker.cpu_ms_per_request / floor.cpu_ms_per_request, 2
            )
        ratios[mode] = entry
    return ratios


def ratio_lines(ratios: dict[str, dict[str, float | None]]) -> list[str]:
    if not ratios:
        return []
    lines = [
        f"## The key figure: CPU per request over the relay's, at {KEY_CONNECTIONS} connections",
        "",
        "Target (issue 14): the worker's CPU per request at most 2x the bare aiohttp relay's, "
        "measured the same way in the same run.",
        "",
        "| mode | relay CPU/req ms | worker CPU/req ms | **worker / relay** | "
        "in-process CPU/req ms | in-process / relay | worker + host stand-in / relay | "
        "relay under uvloop / relay |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in ratios.items():
        worker = r.get("worker_over_relay")
        lines.append(
            f"| {mode} | {_ms(r.get('relay_cpu_ms'), 3)} | {_ms(r.get('worker_cpu_ms'), 3)} | "
            f"**{_ms(worker)}** | {_ms(r.get('in_process_cpu_ms'), 3)} | "
            f"{_ms(r.get('in_process_over_relay'))} | "
            f"{_ms(r.get('worker_with_host_over_relay'))} | "
            f"{_ms(r.get('relay_uvloop_over_relay'))} |"
        )
    if any("worker_relay_function_cpu_ms" in r for r in ratios.values()):
        lines += [
            "",
            "Where the worker's share goes: the same relay as a function in the worker runtime "
            f"(`{FLOOR}`, bench/relay_function.py: no checks, no metering) costs what the "
            "runtime adds to any function; the app's own work is the rest.",
            "",
            "| mode | relay function in the worker CPU/req ms | its / relay (the runtime) | "
            "worker (the app) / relay function in the worker (the app's own work) |",
            "|---|---:|---:|---:|",
        ]
        for mode, r in ratios.items():
            lines.append(
                f"| {mode} | {_ms(r.get('worker_relay_function_cpu_ms'), 3)} | "
                f"{_ms(r.get('worker_relay_function_over_relay'))} | "
                f"{_ms(r.get('worker_over_worker_relay_function'))} |"
            )
    return [*lines, ""]


def load_notes(runs: list[Run]) -> list[str]:
    """Runs during which something else used the proxy's core, or the server logged (a
    timer, errors): their figures carry that extra work."""
    notes = []
    for run in runs:
        if run.target == "direct":
            continue
        load = run.load or {}
        other = load.get(f"cpu{PROXY_CPU}_other", 0.0)
        steal = max((v for k, v in load.items() if k.endswith("_steal")), default=0.0)
        what = f"- {run.target}, {run.mode} at {plural(run.connections, 'connection')}:"
        if other > 0.05:
            notes.append(f"{what} other processes used {other:.0%} of CPU {PROXY_CPU}.")
        if steal > 0.02:
            notes.append(f"{what} the hypervisor stole up to {steal:.0%} of a core.")
        for line in run.log or []:
            notes.append(f"{what} logged `{line}`.")
    return ["During these runs:", "", *notes, ""] if notes else []


# Each line of a server's log is stamped when it arrived (bench/servers.py). Then either
# Python's logging format (in-process: "<time>,ms LEVEL logger: message") or the host
# stand-in's ("host LEVEL logger: message", "worker LEVEL category [invocation]: message").
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (.*)$")
_RECORD = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |(?:host|worker) )"
    r"(TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.\-]+)(?: \[\w+\])?: (.*)$"
)


def log_records(text: str) -> list[tuple[str, str]]:
    """(time, "LEVEL logger: message [-> exception]") for each record of a server's log;
    tracebacks are reduced to their last line."""
    records: list[list[str]] = []
    for raw in text.splitlines():
        stamped = _STAMP.match(raw)
        stamp, line = stamped.groups() if stamped else ("", raw)
        match = _RECORD.match(line)
        if match:
            level, logger, message = match.groups()
            records.append([stamp, f"{level} {logger}: {message[:160]}", ""])
        elif records and line and not line[0].isspace() and not line.startswith("Traceback"):
            records[-1][2] = line.strip()[:160]
    return [(r[0], r[1] + (f" -> {r[2]}" if r[2] else "")) for r in records]


def log_problems(text: str) -> dict[str, Any]:
    records = [entry for _, entry in log_records(text)]
    errors = [e for e in records if e.startswith(("ERROR", "CRITICAL"))]
    return {
        "errors": len(errors),
        "warnings": sum(e.startswith("WARNING") for e in records),
        "distinct_errors": sorted(set(errors)),
    }


def summarize(entries: list[str], examples: int = 1) -> list[str]:
    """Log entries grouped by level and logger: a count and the first few, shortened."""
    groups: dict[str, list[str]] = {}
    for entry in entries:
        groups.setdefault(entry.split(":", 1)[0], []).append(entry)
    out = []
    for name, group in groups.items():
        if len(group) == 1:
            out.append(group[0][:160])
            continue
        shown = "; ".join(sorted({e.split(": ", 1)[-1][:100] for e in group})[:examples])
        out.append(f"{len(group)} x {name}, e.g. {shown}")
    return out


def attach_logs(runs: list[Run], logs: dict[str, str]) -> None:
    """Each run gets what its own server logged while it ran and settled."""
    records = {name: log_records(text) for name, text in logs.items()}
    for run in runs:
        if run.started and run.target in records:
            run.log = summarize(
                [e for stamp, e in records[run.target] if run.started <= stamp <= run.ended]
            )


def control_lines(report: dict[str, Any], runs: list[Run]) -> list[str]:
    controls = report.get("controls") or []
    if not controls:
        return []
    one = [r for r in runs if r.mode == "json" and r.connections == 1]
    rows = [*(asdict(r) for r in one), *controls]
    lines = [
        "## Harness controls at 1 connection",
        "",
        "The direct run measures nginx and wrk alone on CPU 1. A request through the worker also "
        "crosses cores four times (host stand-in on CPU 1, worker on CPU 0, upstream on CPU 1), "
        "and the app's usage records keep Azurite busy on CPU 1, beside the upstream and wrk. "
        "These direct runs add each of those without the app (the records come from the app's "
        "own writer, in a thread on CPU 0, at the worker run's rate):",
        "",
        "| run | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['rps']:,.0f} | {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | "
            f"{_ms(r['p99_ms'])} | {_ms(r['p999_ms'])} | {_ms(r['max_ms'])} |"
        )
    worker = next((r for r in one if r.target == "worker"), None)
    storage = next((c for c in controls if "Azurite" in c["target"]), None)
    if worker and storage:
        lines += [
            "",
            f"Worker p99 minus the p99 of the direct run with Azurite writing: "
            f"{worker.p99_ms - storage['p99_ms']:.2f} ms (p50: "
            f"{worker.p50_ms - storage['p50_ms']:.2f} ms).",
        ]
    return [*lines, ""]


def client_lines(report: dict[str, Any]) -> list[str]:
    clients = report.get("clients") or []
    if not clients:
        return []
    from bench.clients import CONCURRENCY

    lines = [
        "## Upstream HTTP clients",
        "",
        f"Each client alone in a process on CPU {PROXY_CPU} (uvloop), {CONCURRENCY} tasks "
        "sending the same chat request to nginx; plain answers read whole, streams chunk by "
        "chunk. CPU per request is what the client costs a proxy.",
        "",
        "| client | mode | req/s | CPU/req ms |",
        "|---|---|---:|---:|",
    ]
    for c in clients:
        lines.append(
            f"| {c['client']} | {c['mode']} | {c['rps']:,.0f} | {_ms(c['cpu_ms_per_request'], 3)} |"
        )
    return [*lines, ""]


def markdown(report: dict[str, Any], runs: list[Run]) -> str:
    m = report["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    idle = report["idle_cpu"]
    lines = [
        "# Benchmark: latest run",
        "",
        f"- Date: {m['date']}, commit `{m['commit']}`"
        + (" with uncommitted changes in the working tree" if m["uncommitted_changes"] else ""),
        f"- Machine: {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}",
        f"- Python {m['python']} ({packages}); nginx {m['nginx']}; {m['wrk']}",
        f"- Pinning: {report['pinning']}",
        "- Before the run, with nothing of the bench's running yet, the cores were busy: "
        + ", ".join(f"{k} {v:.0%}" for k, v in report["busy_before"].items())
        + " (other work on this machine).",
        f"- Each run: `wrk -t1 -c<conns> -d{report['seconds']}s --timeout 30s --latency`, a "
        "two-message chat completion with `max_tokens: 128`; streams are 35 SSE events from "
        "the fake upstream (nginx), ending with a usage chunk and `data: [DONE]`.",
        "- Targets: `direct` is wrk straight at nginx. `relay` is a bare aiohttp relay "
        "(bench/relay.py: one pooled client session, no checks, asyncio's own loop as in the "
        "worker); `relay, uvloop` the same under uvloop. `in-process` is **bench only**: the "
        "app's functions called in one uvicorn process (uvloop, httptools; bench/inprocess.py), "
        "as the project was measured before it ran on the worker runtime; Azure never runs it "
        "so. `worker` is the app as Azure runs it: the Python worker process "
        f"(azure-functions-runtime {report.get('runtime_version', '')}, its uvicorn server on "
        "asyncio's loop) behind the host stand-in (local/host.py), which plays the Functions "
        "host's part and stays on the harness's core. `worker, relay function` (at 16 connections) "
        "is the same worker runtime serving only a relay function (bench/relay_function.py).",
        "- The app: key and event checks, usage records to Azurite (in memory) batched every "
        "1 s. Pools of two resources per deployment. CPU/req is the measured process's "
        "utime+stime from the start of the run until it is quiet again (its usage writer caught "
        "up), per request: the worker process for `worker`, with the host stand-in's in its own "
        "column. CPU busy is the share of its core it used while wrk ran. Added latency is the "
        "run's percentile minus the direct run's. Idle, the in-process server used "
        f"{idle.get('in-process', 0):.1%} of its core, the worker {idle.get('worker', 0):.1%} and "
        f"the host stand-in {idle.get('host', 0):.1%}.",
        "",
        *ratio_lines(report["ratios"]),
        "## All runs",
        "",
        table(runs),
        "",
        *load_notes(runs),
        *control_lines(report, runs),
        *client_lines(report),
        "## Time to first byte, streams",
        "",
        f"{TTFB_REQUESTS} sequential streamed requests on one keep-alive connection "
        f"(after {TTFB_WARMUP} unmeasured), from a raw-socket client on CPU {LOAD_CPU}. First "
        "byte: the response's first byte; first event: the first `data:` bytes.",
        "",
        "| target | first byte p50 ms | first byte p99 ms | first event p50 ms | "
        "first event p99 ms | whole stream p50 ms | failures |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in report["ttfb"]:
        lines.append(
            f"| {t['target']} | {_ms(t['first_byte_ms']['p50'], 3)} | "
            f"{_ms(t['first_byte_ms']['p99'], 3)} | {_ms(t['first_event_ms']['p50'], 3)} | "
            f"{_ms(t['first_event_ms']['p99'], 3)} | {_ms(t['whole_stream_ms']['p50'], 3)} | "
            f"{t['failures']} |"
        )
    memory = report["memory"]
    lines += [
        "",
        "## Worker memory (VmRSS)",
        "",
        "The worker process's resident memory, driven by wrk at 16 connections through the "
        "host stand-in, alternating plain and streamed requests.",
        "",
        "| after | requests through the worker | RSS MiB |",
        "|---|---:|---:|",
    ]
    for point in memory["points"]:
        lines.append(
            f"| {point['label']} | {point['requests']:,} | {point['rss_kib'] / 1024:,.1f} |"
        )
    if memory.get("run"):
        run = memory["run"]
        errors = sum(run["errors"].values())
        lines += [
            "",
            f"The last step took {run['requests']:,} requests in {run['seconds']:.0f} s "
            f"({run['requests'] / max(run['seconds'], 0.001):,.0f} req/s), "
            + (f"errors: {run['errors']}." if errors else "no errors."),
        ]
    if memory.get("ratio") is not None:
        first, last = memory["points"][1], memory["points"][-1]
        calls = last["requests"] - first["requests"]
        growth = (last["rss_kib"] - first["rss_kib"]) / calls if calls else 0.0
        lines += [
            "",
            f"RSS after {memory['last_label']} / after 10k requests: {memory['ratio']:.2f} "
            f"({growth:,.2f} KiB more per request in between).",
        ]
    else:
        lines += ["", f"The 200k-request figure was skipped ({memory.get('skipped', '')})."]
    held = memory.get("coordinator")
    if held:
        lines += [
            "",
            f"The worker runtime's HTTP coordinator (azure-functions-runtime "
            f"{held['runtime_version']}), driven alone the way the runtime drives it for "
            f"{held['calls']:,} calls (bench/coordinator.py): {held['entries_kept']:,} entries "
            f"still held afterwards, {held['kib_per_call']:.2f} KiB more per call.",
        ]
    if memory.get("after_usage_written_kib"):
        lines += [
            "",
            f"Once every usage record had reached Azurite: "
            f"{memory['after_usage_written_kib'] / 1024:,.1f} MiB.",
        ]
    if memory.get("in_process_rss_kib"):
        lines += [
            "",
            f"For comparison, the in-process server's RSS after its runs: "
            f"{memory['in_process_rss_kib'] / 1024:,.1f} MiB; the host stand-in's: "
            f"{memory['host_rss_kib'] / 1024:,.1f} MiB.",
        ]
    for name, problems in report["logs"].items():
        if problems["errors"] or problems["warnings"]:
            lines += [
                "",
                f"## {name} log",
                "",
                f"{plural(problems['errors'], 'error')} and "
                f"{plural(problems['warnings'], 'warning')} logged; the distinct errors:",
                "",
                *(f"- `{entry}`" for entry in problems["distinct_errors"]),
            ]
    lines += ["", "## Usage records", ""]
    for name, usage in report["usage_records"].items():
        lines.append(
            f"- {name}: {usage['count']:,}{'' if usage['complete'] else '+'} usage records in "
            f"Azurite for {usage['requests']:,} requests that wrk and the bench saw completed "
            f"(counted {usage.get('waited_seconds', 0):.0f} s after the last run, once there "
            "were as many; wrk does not count the requests still in flight when a run ends, "
            "the app records those too)."
            + ("" if usage["count"] >= usage["requests"] else " **Records are missing.**")
        )
    if report.get("worker_restarts"):
        lines += ["", f"**The worker restarted {report['worker_restarts']} times during the run.**"]
    return "\n".join(lines) + "\n"


# --- upstream HTTP clients and harness controls ---------------------------------------------


def coordinator() -> dict[str, Any] | None:
    """What the worker runtime keeps per invocation, measured alone (bench/coordinator.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.coordinator"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_COORDINATOR ")), None)
    return json.loads(line.split(" ", 1)[1]) if line else None


def compare_clients(base: str, key: str, seconds: float) -> list[dict[str, Any]]:
    """aiohttp against httpx as the upstream client, each in a process on the proxy's core."""
    results = []
    for mode in MODES:
        for client in ("aiohttp", "httpx"):
            args = [sys.executable, "-m", "bench.clients", base, key, str(seconds), client, mode]
            done = subprocess.run(
                pinned(PROXY_CPU if CPUS >= 2 else None, args),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=seconds + 120,
            )
            line = next(
                (x for x in done.stdout.splitlines() if x.startswith("BENCH_CLIENT ")), None
            )
            if line is None:
                raise RuntimeError(f"bench.clients {client} {mode}: {done.stderr[-2000:]}")
            results.append(json.loads(line.split(" ", 1)[1]))
    return results


def _write_usage_at(storage: str, rate: float, stop: threading.Event) -> None:
    """Usage records at `rate` a second through the proxy's own writer (1 s batches), from a
    thread on the proxy's core (idle meanwhile): Azurite does what a proxy run makes it do."""
    import asyncio

    from shared.governance.usage import UsageRecord, UsageWriter
    from shared.platform.settings import load
    from shared.platform.tables import Tables

    if CPUS >= 2:
        os.sched_setaffinity(0, {PROXY_CPU})  # this thread only

    async def main() -> None:
        tables = Tables(
            load({"AIPROXY_STORAGE_CONNECTION_STRING": storage, "AIPROXY_TABLE_PREFIX": "control"})
        )
        writer = UsageWriter(tables, flush_seconds=1.0)
        started, n = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate)
            now = datetime.now(UTC)
            for _ in range(due - n):
                n += 1
                writer.append(
                    UsageRecord(
                        event_id="control", attendee_id="a", deployment="bench",
                        resource_id="r", model_class="openai-chat", status=200,
                        prompt_tokens=19, completion_tokens=12, total_tokens=31,
                        streamed=False, estimated=False, latency_ms=0.6, time=now,
                        local_date=now.strftime("%Y%m%d"), request_id=f"control{n:08d}",
                    )
                )  # fmt: skip
            await asyncio.sleep(0.01)
        await writer.close()
        await tables.close()

    asyncio.run(main())


def harness_controls(
    work: Path, direct: Target, storage: str, write_rate: float, seconds: float
) -> list[Run]:
    """Direct runs at one connection under what the proxy run adds besides the proxy itself:
    the upstream a core away (every proxied request crosses cores four times), and Azurite
    writing the proxy's usage records on the load core."""
    from bench.nginx import FakeUpstream
    from local.azurite import free_port

    controls = []
    far = FakeUpstream(work / "nginx-far", [free_port()], PROXY_CPU).start()
    try:
        target = Target("direct, upstream on CPU 0", far.urls[0], "", direct.key)
        controls.append(to_run(target, "json", 1, wrk(target, "json", 1, seconds)))
    finally:
        far.stop()
    stop = threading.Event()
    writer = threading.Thread(target=_write_usage_at, args=(storage, write_rate, stop))
    writer.start()
    try:
        time.sleep(1.5)  # the first batches are on their way
        target = Target(f"direct, Azurite writing {write_rate:,.0f} records/s", direct.base,
                        "", direct.key)  # fmt: skip
        controls.append(to_run(target, "json", 1, wrk(target, "json", 1, seconds)))
    finally:
        stop.set()
        writer.join(60)
    return controls


# --- main -----------------------------------------------------------------------------------

CPUS = len(os.sched_getaffinity(0))


@dataclass
class Measured:
    """A target the bench measures, and the server behind it (None for direct)."""

    target: Target
    server: Any = None

    @property
    def name(self) -> str:
        return self.target.name


def measure(m: Measured, mode: str, connections: int, seconds: float, baseline: Run) -> Run:
    """One wrk run at `m`, with its server's CPU from the start until it is quiet again."""
    server = m.server
    worker = isinstance(server, WorkerApp)
    if worker:
        server.repin()  # a restarted worker has a new pid, and starts on the host's core
    pid = server.measured_pid
    host_pid = server.host_pid if worker else None
    started = datetime.now().replace(microsecond=0)
    before = cpu_seconds(pid)
    host_before = cpu_seconds(host_pid) if host_pid else 0.0
    system_before = cpu_times()
    result = wrk(m.target, mode, connections, seconds)
    at_end = cpu_seconds(pid)
    host_at_end = cpu_seconds(host_pid) if host_pid else 0.0
    system_after = cpu_times()
    settled = settle(pid, minimum=SETTLE_SECONDS if m.name in APPS else 0.5)
    after = cpu_seconds(pid)
    host_after = cpu_seconds(host_pid) if host_pid else 0.0
    run = to_run(m.target, mode, connections, result)
    run.added_p50_ms = round(run.p50_ms - baseline.p50_ms, 3)
    run.added_p99_ms = round(run.p99_ms - baseline.p99_ms, 3)
    if run.requests:
        run.cpu_ms_per_request = round((after - before) * 1000 / run.requests, 3)
        if host_pid:
            run.host_cpu_ms_per_request = round((host_after - host_before) * 1000 / run.requests, 3)
    if run.seconds:
        run.cpu_busy = round((at_end - before) / run.seconds, 3)
        if host_pid:
            run.host_cpu_busy = round((host_at_end - host_before) / run.seconds, 3)
    run.settle_seconds = round(settled, 1)
    run.load = machine_load(system_before, system_after, at_end - before)
    run.started = started.isoformat(sep=" ")
    run.ended = datetime.now().replace(microsecond=0).isoformat(sep=" ")
    return run


def main() -> int:
    seconds = env_int("BENCH_SECONDS", 15)
    memory_on = os.environ.get("BENCH_MEMORY", "1").strip() != "0"
    ensure_tools()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.nginx import API_KEY, FakeUpstream
    from bench.servers import InProcessApp, RelayServer
    from local.azurite import Azurite, free_port

    proxy_cpu, load_cpu = pin_to_cores()  # this process, Azurite and nginx: the load core
    if proxy_cpu is not None:
        pinning = (
            f"relay, in-process server and worker process each on CPU {PROXY_CPU} (one measured "
            f"at a time); nginx, wrk, Azurite, the host stand-in and the TTFB client on CPU "
            f"{LOAD_CPU} (`taskset`; the worker's threads moved with sched_setaffinity)"
        )
    else:
        pinning = "none (fewer than 2 CPUs)"
        print("bench: fewer than 2 CPUs; running unpinned", file=sys.stderr)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    busy_before = wait_for_quiet(QUIET_WAIT_SECONDS)
    warn_if_busy(busy_before, "bench")
    work = Path(tempfile.mkdtemp(prefix="aiproxy-bench-"))
    azurite = upstream = None
    servers: dict[str, Any] = {}
    try:
        print("bench: starting Azurite, nginx, the relays, the in-process server and the "
              "host stand-in with its worker", flush=True)  # fmt: skip
        azurite = Azurite(free_port()).start()
        upstream = FakeUpstream(work / "nginx", [free_port(), free_port()], load_cpu).start()
        storage = azurite.connection_string
        servers["relay"] = RelayServer(work, upstream.urls[0], proxy_cpu, "asyncio")
        servers["relay, uvloop"] = RelayServer(work, upstream.urls[0], proxy_cpu, "uvloop")
        servers["in-process"] = InProcessApp(work, storage, proxy_cpu, IN_PROCESS_TABLES)
        worker = WorkerApp(work, storage, load_cpu, proxy_cpu, WORKER_TABLES)
        servers["worker"] = worker
        servers[FLOOR] = WorkerApp(
            work, storage, load_cpu, proxy_cpu, "benchfloor", name="worker-relay-function",
            AIPROXY_WORKER_PRELOAD="bench.relay_function", BENCH_RELAY_UPSTREAM=upstream.urls[0],
        )  # fmt: skip
        for server in servers.values():
            server.wait()
        measured = {
            "relay": Measured(Target("relay", servers["relay"].base, "", API_KEY),
                              servers["relay"]),
            "relay, uvloop": Measured(
                Target("relay, uvloop", servers["relay, uvloop"].base, "", API_KEY),
                servers["relay, uvloop"],
            ),
            FLOOR: Measured(Target(FLOOR, servers[FLOOR].base, "/api", API_KEY), servers[FLOOR]),
        }  # fmt: skip
        for name in APPS:
            _event, key = set_up_event(servers[name].base, upstream.urls)
            measured[name] = Measured(Target(name, servers[name].base, "/api", key), servers[name])
        direct = Target("direct", upstream.urls[0], "", API_KEY)
        smoke(direct)
        for m in measured.values():
            smoke(m.target)
        requests = {name: 2 for name in APPS}  # through each app, for the usage count
        memory_points = [{"label": "start", "requests": 2, "rss_kib": rss_kib(worker.worker_pid)}]
        idle_pids = {
            "in-process": servers["in-process"].pid,
            "worker": worker.worker_pid,
            "host": worker.host_pid,
        }
        idle_before = {name: cpu_seconds(pid) for name, pid in idle_pids.items()}
        time.sleep(3)
        idle_cpu = {
            name: round((cpu_seconds(pid) - idle_before[name]) / 3, 4)
            for name, pid in idle_pids.items()
        }

        for name in ("in-process", "worker"):
            print(f"bench: first {MEMORY_FIRST:,} requests through {name} (warm-up)", flush=True)
            if name == "worker":
                worker.repin()
            result = wrk(measured[name].target, "json", 16, 120,
                         stop_after=MEMORY_FIRST - requests[name], mix=True)  # fmt: skip
            requests[name] += result["requests"]
            settle(servers[name].measured_pid)
        memory_points.append(
            {"label": "first 10k requests", "requests": requests["worker"],
             "rss_kib": rss_kib(worker.worker_pid)}
        )  # fmt: skip
        servers[FLOOR].repin()
        for name in ("relay", "relay, uvloop", FLOOR):
            wrk(measured[name].target, "json", 16, 2)

        runs: list[Run] = []
        for mode in MODES:
            for connections in CONNECTIONS:
                what = f"{mode}, {plural(connections, 'connection')}"
                stamp = datetime.now().strftime("%H:%M:%S")
                print(f"bench: {stamp} {what}: direct", flush=True)
                baseline = to_run(
                    direct, mode, connections, wrk(direct, mode, connections, seconds)
                )
                runs.append(baseline)
                names = ["relay", "in-process", "worker"]
                if connections == KEY_CONNECTIONS:
                    names += ["relay, uvloop", FLOOR]
                line = [f"direct {baseline.rps:,.0f} req/s"]
                for name in names:
                    stamp = datetime.now().strftime("%H:%M:%S")
                    print(f"bench: {stamp} {what}: {name}", flush=True)
                    run = measure(measured[name], mode, connections, seconds, baseline)
                    runs.append(run)
                    if name in requests:
                        requests[name] += run.requests
                    line.append(
                        f"{name} {run.rps:,.0f} req/s p50 {run.p50_ms:.2f} ms "
                        f"CPU/req {_ms(run.cpu_ms_per_request, 3)} ms"
                        + (f" (host {_ms(run.host_cpu_ms_per_request, 3)})"
                           if run.host_cpu_ms_per_request is not None else "")
                    )  # fmt: skip
                    if run.non_2xx or run.socket_errors:
                        report_errors(servers[name], measured[name].target, mode, run)
                print("       " + "; ".join(line), flush=True)

        controls: list[Run] = []
        if os.environ.get("BENCH_CONTROLS", "1").strip() != "0":
            print("bench: harness controls at 1 connection", flush=True)
            c1 = next(
                r for r in runs if r.target == "worker" and r.mode == "json" and r.connections == 1
            )
            controls = harness_controls(work, direct, storage, c1.rps, seconds)
        clients: list[dict[str, Any]] = []
        if os.environ.get("BENCH_CLIENTS", "1").strip() != "0":
            print("bench: upstream HTTP clients, aiohttp and httpx", flush=True)
            clients = compare_clients(upstream.urls[0], API_KEY, min(seconds, 10))

        print(f"bench: time to first byte, {TTFB_REQUESTS} streams per target", flush=True)
        worker.repin()
        ttfbs = [ttfb(direct)]
        for name in ("relay", "in-process", "worker"):
            ttfbs.append(ttfb(measured[name].target))
            if name in requests:
                requests[name] += TTFB_REQUESTS + TTFB_WARMUP
        settle(worker.worker_pid)
        memory_points.append(
            {"label": "the runs above", "requests": requests["worker"],
             "rss_kib": rss_kib(worker.worker_pid)}
        )  # fmt: skip

        memory: dict[str, Any] = {"points": memory_points}
        if memory_on and requests["worker"] < MEMORY_TOTAL:
            print(
                f"bench: memory: up to {MEMORY_TOTAL:,} requests through the worker "
                f"(at most {MEMORY_LIMIT_SECONDS} s)",
                flush=True,
            )
            worker.repin()
            started = time.monotonic()
            result = wrk(measured["worker"].target, "json", 16, MEMORY_LIMIT_SECONDS,
                         stop_after=MEMORY_TOTAL - requests["worker"], mix=True)  # fmt: skip
            requests["worker"] += result["requests"]
            elapsed = time.monotonic() - started
            settle(worker.worker_pid)
            label = (
                "200k requests" if requests["worker"] >= MEMORY_TOTAL else f"{elapsed:.0f} s bound"
            )
            memory_points.append(
                {"label": label, "requests": requests["worker"],
                 "rss_kib": rss_kib(worker.worker_pid)}
            )  # fmt: skip
            memory["run"] = {
                "requests": result["requests"],
                "seconds": round(elapsed, 1),
                "errors": result["errors"],
            }
            if sum(result["errors"].values()):
                print(f"bench: memory run errors: {result['errors']}", flush=True)
        elif not memory_on:
            memory["skipped"] = "BENCH_MEMORY=0"
        first = memory_points[1]["rss_kib"]
        if memory_on:
            memory["ratio"] = round(memory_points[-1]["rss_kib"] / first, 3) if first else None
            memory["last_label"] = memory_points[-1]["label"]
        memory["coordinator"] = coordinator()
        memory["in_process_rss_kib"] = rss_kib(servers["in-process"].pid)
        memory["host_rss_kib"] = rss_kib(worker.host_pid)

        worker.repin()
        settle(worker.worker_pid)
        settle(servers["in-process"].pid)
        print("bench: counting usage records", flush=True)
        usage = {}
        for name, prefix in (("worker", WORKER_TABLES), ("in-process", IN_PROCESS_TABLES)):
            usage[name] = await_usage(storage, prefix, requests[name])
        # With the backlog written, what the worker keeps.
        memory["after_usage_written_kib"] = rss_kib(worker.worker_pid)
        logs = {name: server.log() for name, server in servers.items()}
        attach_logs(runs, logs)
        ratios = key_ratios(runs)
        report = {
            "machine": machine(),
            "pinning": pinning,
            "busy_before": busy_before,
            "seconds": seconds,
            "connections": list(CONNECTIONS),
            "runtime_version": worker.runtime_version,
            "ratios": ratios,
            "runs": [asdict(run) for run in runs],
            "controls": [asdict(run) for run in controls],
            "clients": clients,
            "ttfb": ttfbs,
            "memory": memory,
            "idle_cpu": idle_cpu,
            "usage_records": usage,
            "worker_restarts": worker.restarts,
            "logs": {name: log_problems(text) for name, text in logs.items()},
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        text = markdown(report, runs)
        (RESULTS / "latest.md").write_text(text)
        (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
        print()
        print(text)
        print(f"bench: wrote {RESULTS.relative_to(ROOT)}/latest.md and latest.json")
        for mode, r in ratios.items():
            print(
                f"bench: KEY FIGURE {mode} at {KEY_CONNECTIONS} connections: worker CPU/req is "
                f"{_ms(r.get('worker_over_relay'))}x the relay's (target <= 2); in-process "
                f"{_ms(r.get('in_process_over_relay'))}x",
                flush=True,
            )
        for name, problems in report["logs"].items():
            if problems["errors"] or problems["warnings"]:
                kept = (
                    Path(tempfile.gettempdir())
                    / f"aiproxy-bench-{name.replace(', ', '-')}-{int(time.time())}.log"
                )
                kept.write_text(logs[name])
                print(f"bench: {name} logged problems (whole log: {kept})")
        missing = any(u["count"] < u["requests"] for u in usage.values())
        bad = any(run.non_2xx or run.socket_errors for run in runs) or worker.restarts or missing
        return 1 if bad else 0
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_all(*servers.values(), upstream, azurite)
        shutil.rmtree(work, ignore_errors=True)


def report_errors(server: Any, target: Target, mode: str, run: Run) -> None:
    """What a server answered and logged when a run saw errors."""
    import httpx

    print(f"bench: {target.name} {mode} run at {plural(run.connections, 'connection')}: "
          f"{run.errors}")  # fmt: skip
    try:
        response = httpx.post(
            f"{target.base}{target.path(mode)}",
            content=request_body(mode == "stream"),
            headers={"api-key": target.key, "content-type": "application/json"},
            timeout=30,
        )
        print(f"bench: a probe request now gets {response.status_code}: {response.text[:300]}")
    except httpx.HTTPError as exc:
        print(f"bench: a probe request failed: {exc!r}")
    tail = server.log().splitlines()[-40:]
    print(f"bench: {target.name} log (last lines):\n" + "\n".join(tail), flush=True)


if __name__ == "__main__":
    sys.exit(main())
