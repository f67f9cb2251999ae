"""Real servers on loopback for the tests: Azurite, the simulated upstream, app hosts."""

from __future__ import annotations

import asyncio
import io
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol

import httpx
from azure.data.tables import TableServiceClient
from cryptography.fernet import Fernet

from local.azurite import Azurite
from local.process import stop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_SETTINGS = ROOT / "local.settings.example.json"
FUNCTION_KEY = "test-function-key"  # the host stand-in's: its admin API, not manage/*
OPERATOR_KEY = "test-operator-key"
OPERATOR = {"x-aiproxy-operator-key": OPERATOR_KEY}  # the management calls' credential
SIM_KEY = "simkey"
ENCRYPTION_KEY = Fernet.generate_key().decode()
# Markers (pyproject): the end-to-end tier (host stand-in and worker processes), tests that
# drive a browser, tests that take many seconds by design.
E2E, BROWSER, SLOW = "e2e", "browser", "slow"
# The paths most tests call, and a small chat body.
API_VERSION = "2024-10-21"
CHAT = f"/openai/deployments/gpt-4o-mini/chat/completions?api-version={API_VERSION}"
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class ClientAddress:
    """The loopback address the tests of one module call the app from, and the app objects
    (hosts of either tier) whose `http` and `manage` clients use it. The failed-key guard and
    the other per-address limits count by the caller's address, which the host takes from the
    connection as Azure's front end does: tests that send wrong keys from one module's address
    never slow the next module's calls on a host the two share (conftest gives each module its
    own, in 127.0.2.0/24; tests that need particular addresses use 127.0.0.x, and the lock-out
    tests one each in 127.0.3.0/24)."""

    address = "127.0.0.1"
    _apps: ClassVar[list[Any]] = []

    @classmethod
    def connect(cls, app: Any) -> None:
        """`app.http` and `app.manage` from the current address (again, when it changes)."""
        if app not in cls._apps:
            cls._apps.append(app)
        for name in ("http", "manage"):
            old = getattr(app, name, None)
            if old is not None:
                old.close()
        transport = httpx.HTTPTransport(local_address=cls.address)
        app.manage = httpx.Client(
            base_url=f"{app.base}/manage", headers=OPERATOR, timeout=30, transport=transport
        )
        app.http = httpx.Client(
            base_url=app.base, timeout=30, transport=httpx.HTTPTransport(local_address=cls.address)
        )

    @classmethod
    def move_to(cls, address: str) -> None:
        """Every live app's clients now call from `address`."""
        cls.address = address
        for app in cls._apps:
            cls.connect(app)

    @classmethod
    def forget(cls, app: Any) -> None:
        if app in cls._apps:
            cls._apps.remove(app)


def wait_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """The first truthy answer of `check`, or an AssertionError after `timeout` seconds: what
    a test waits for on a busy machine, instead of sleeping for as long as it usually takes."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"still {answer!r} after {timeout} s")
        time.sleep(interval)


class App(Protocol):
    """The app as a test reaches it, in either tier: `AppHost` (host stand-in and worker
    processes) or `tests.inprocess.InProcessHost` (this process)."""

    base: str  # http://127.0.0.1:port/api
    manage: httpx.Client  # base_url …/api/manage, with the operator key
    http: httpx.Client  # base_url …/api

    def log(self) -> str: ...


def chat(
    host: App, key: str, body: dict[str, Any] = HELLO, *, path: str = CHAT, **options: Any
) -> httpx.Response:
    """A chat call with an event key (`headers` are added to the key's)."""
    headers = {"api-key": key, **options.pop("headers", {})}
    return host.http.post(path, json=body, headers=headers, **options)


class Process:
    """A child process whose output goes to a log file the test can read."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.process, timeout=15)
        self._log.close()


def listening(proc: Process, said: str, timeout: float = 90.0) -> int:
    """The port a server started with `--port 0` bound, from the line it logs once it listens
    (`said`, a pattern with the port as its group): no other process can take that port in
    between, as one picked here and bound there later could be. An error with the log's end
    if the server exits first."""
    pattern = re.compile(said)
    deadline = time.monotonic() + timeout
    while True:
        found = pattern.search(proc.log())
        if found:
            return int(found.group(1))
        if proc.process.poll() is not None:
            raise RuntimeError(f"exited with {proc.process.returncode}: {proc.log()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not listening after {timeout} s: {proc.log()[-2000:]}")
        time.sleep(0.05)


class Simulator:
    """One simulated Azure OpenAI upstream."""

    def __init__(self, log_dir: Path, name: str = "sim", **options: Any) -> None:
        args = [sys.executable, "-m", "local.simulator", "--port", "0"]
        args += ["--api-key", SIM_KEY, "--name", name]
        for option, value in options.items():
            args += [f"--{option.replace('_', '-')}", str(value)]
        log = log_dir / f"simulator-{name}-{secrets.token_hex(3)}.log"
        self.proc = Process(args, dict(os.environ), log)
        self.port = listening(self.proc, r"simulator listening on http://127\.0\.0\.1:(\d+)")
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_sim/stats").json()

    def configure(self, **config: Any) -> None:
        httpx.post(f"{self.url}/_sim/config", json=config).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sim/reset").raise_for_status()

    def stop(self) -> None:
        self.proc.stop()


class TableReads:
    """Reads of one table by point (PartitionKey, RowKey), as the run's Azurite logged them
    (its access log holds every process's requests: name a table of the test's own prefix).
    The count goes on from where the last one stopped reading."""

    def __init__(self, azurite: Azurite, table: str) -> None:
        assert azurite.access_log is not None, "the run's Azurite logs its requests"
        self.log = azurite.access_log
        self.pattern = re.compile(rf'"GET /devstoreaccount1/{table}\(PartitionKey='.encode())
        self.read_to, self.seen = 0, 0

    def count(self) -> int:
        with open(self.log, "rb") as log:
            log.seek(self.read_to)
            lines = log.read()
        whole = lines[: lines.rfind(b"\n") + 1]  # a line still being written waits
        self.read_to += len(whole)
        self.seen += len(self.pattern.findall(whole))
        return self.seen

    def settled(self) -> int:
        """The count once the log stops growing (Azurite writes its line as it answers)."""
        last = [-1]

        def still() -> tuple[int] | None:  # a count of 0 is an answer too
            now = self.count()
            same, last[0] = now == last[0], now
            return (now,) if same else None

        return wait_until(still, timeout=10, interval=0.2)[0]


class SpillRoot:
    """Where the apps of this test run keep their usage journals (AIPROXY_USAGE_SPILL_DIR, one
    folder per table prefix): under pytest's own temporary folder (conftest sets it), which
    pytest prunes, rather than a folder per prefix left in the machine's /tmp."""

    path: Path | None = None


def host_env(storage: str, prefix: str, **overrides: str) -> dict[str, str]:
    spill = {"AIPROXY_USAGE_SPILL_DIR": str(SpillRoot.path / prefix)} if SpillRoot.path else {}
    env = {
        **os.environ,
        "AIPROXY_STORAGE_CONNECTION_STRING": storage,
        # The queue trigger's storage, and a realtime queue of the tables' own.
        "AzureWebJobsStorage": storage,
        "AIPROXY_REALTIME_QUEUE": f"{prefix[:50]}-realtime",
        "AIPROXY_TABLE_PREFIX": prefix,
        "AIPROXY_ENCRYPTION_KEY": ENCRYPTION_KEY,
        "AIPROXY_FUNCTION_KEY": FUNCTION_KEY,
        "AIPROXY_OPERATOR_KEY": OPERATOR_KEY,
        "AIPROXY_USAGE_FLUSH_SECONDS": "0.2",
        "AIPROXY_CACHE_TTL_SECONDS": "2",
        "AIPROXY_UPSTREAM_READ_TIMEOUT": "3",
        "AIPROXY_STREAM_IDLE_TIMEOUT": "3",
        "AIPROXY_ALLOW_LOOPBACK_UPSTREAMS": "true",  # the simulator is on 127.0.0.1
        **spill,
    }
    env.update(overrides)
    return env


class AppHost:
    """One host stand-in process on a free port, with its Python worker process."""

    def __init__(self, log_dir: Path, env: dict[str, str], name: str = "host") -> None:
        self.env = env
        args = [sys.executable, "-m", "local.host", "--port", "0"]
        args += ["--settings", str(EXAMPLE_SETTINGS), "--log-level", "info"]
        self.proc = Process(args, env, log_dir / f"{name}-{secrets.token_hex(3)}.log")
        self.port = listening(self.proc, r"host: listening on http://127\.0\.0\.1:(\d+)/")
        self.base = f"http://127.0.0.1:{self.port}/api"
        ClientAddress.connect(self)  # self.http, self.manage

    def status(self) -> dict[str, Any]:
        """The host's status, with its worker process (pid, runtime version, restarts)."""
        answer = httpx.get(
            f"http://127.0.0.1:{self.port}/admin/host/status",
            headers={"x-functions-key": FUNCTION_KEY},
            timeout=30,
        )
        answer.raise_for_status()
        return answer.json()

    def log(self) -> str:
        """What the host and its worker logged so far."""
        return self.proc.log()

    def unanswered(self) -> set[str]:
        """Invocations the worker has not answered yet. Once it answers one, what it logged
        about it is in the log (its lines come before its answer, on one stream)."""
        return set(self.status()["unanswered_invocations"])

    def stop(self) -> None:
        ClientAddress.forget(self)
        self.manage.close()
        self.http.close()
        self.proc.stop()


def run_timer(host: AppHost, name: str) -> None:
    """The host's admin API, as an operator triggers a timer on Azure: the timer runs now, in
    the host's worker (answered once it is done)."""
    response = httpx.post(
        f"http://127.0.0.1:{host.port}/admin/functions/{name}",
        headers={"x-functions-key": FUNCTION_KEY},
        json={"input": ""},
        timeout=60,
    )
    assert response.status_code == 202, response.text


async def burst(
    path: str, body: dict[str, Any], hosts: list[AppHost], key: str, count: int
) -> list[httpx.Response]:
    """`count` calls of `body` to `path` at once, spread over the hosts."""
    clients = [httpx.AsyncClient(base_url=h.base, timeout=30) for h in hosts]
    try:
        return await asyncio.gather(
            *(
                clients[i % len(clients)].post(path, json=body, headers={"api-key": key})
                for i in range(count)
            )
        )
    finally:
        for client in clients:
            await client.aclose()


def host_answer(response: httpx.Response, status: int) -> None:
    """An answer of the Functions host itself (no route, wrong method: 404; no function key:
    401): the app never sees the call, and the host sends no body (docs/api.md#errors)."""
    assert response.status_code == status, (response.request.url, response.text)
    assert response.content == b"", response.text


class Storage:
    """Direct reads of the app's tables, to check what the app wrote."""

    def __init__(self, connection_string: str, prefix: str) -> None:
        self.service = TableServiceClient.from_connection_string(connection_string)
        self.prefix = prefix

    def rows(self, table: str, filter: str | None = None) -> list[dict[str, Any]]:
        client = self.service.get_table_client(self.prefix + table)
        try:
            if filter:
                return [dict(e) for e in client.query_entities(filter)]
            return [dict(e) for e in client.list_entities()]
        except Exception as exc:  # a table not created yet holds no rows
            if "TableNotFound" in str(exc) or "ResourceNotFound" in str(exc):
                return []
            raise

    def usage(self, event_id: str, *, expect: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The usage records of an event, once at least `expect` of them were written."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows("usage", f"event_id eq '{event_id}'")
            if len(rows) >= expect or time.monotonic() > deadline:
                return sorted(rows, key=lambda r: r["RowKey"])
            time.sleep(0.1)


def window(hours_before: float = 1, hours_after: float = 24, zone: str = "UTC") -> dict[str, str]:
    """starts_at/ends_at around now, as wall-clock times in `zone`."""
    from zoneinfo import ZoneInfo

    now = datetime.now(UTC).astimezone(ZoneInfo(zone)).replace(tzinfo=None, microsecond=0)
    return {
        "starts_at": (now - timedelta(hours=hours_before)).isoformat(),
        "ends_at": (now + timedelta(hours=hours_after)).isoformat(),
        "time_zone": zone,
    }


class EventSetup:
    """An event with a catalog on the simulator and one attendee, built over the API."""

    def __init__(self, host: AppHost, sim: Simulator, **event_fields: Any) -> None:
        self.host = host
        body = {
            "name": event_fields.pop("name", "Test event"),
            **window(),
            "max_token_cap": 512,
            "daily_request_cap": 1000,
            **event_fields,
        }
        response = host.manage.post("/events", json=body)
        assert response.status_code == 201, response.text
        self.event = response.json()
        self.id = self.event["id"]
        self.resources: dict[str, dict[str, Any]] = {}
        for deployment, model_class in (
            ("gpt-4o-mini", "openai-chat"),
            ("gpt-35-turbo-instruct", "openai-completions"),
            ("text-embedding-3-small", "openai-embeddings"),
        ):
            self.add_resource(sim.url, deployment, model_class)
        self.attendee = self.add_attendee("attendee@example.com")
        self.key = self.attendee["api_key"]

    def add_resource(self, endpoint: str, deployment: str, model_class: str, **extra: Any) -> dict:
        body = {
            "name": f"{deployment} at {endpoint}",
            "deployment": deployment,
            "model_class": model_class,
            "endpoint": endpoint,
            "auth": "key",
            "api_key": SIM_KEY,
            **extra,
        }
        resource = self.host.manage.post("/resources", json=body)
        assert resource.status_code == 201, resource.text
        attached = self.host.manage.put(f"/events/{self.id}/resources/{resource.json()['id']}")
        assert attached.status_code == 200, attached.text
        self.resources[resource.json()["id"]] = resource.json()
        return resource.json()

    def add_attendee(self, user: str) -> dict[str, Any]:
        response = self.host.manage.post(f"/events/{self.id}/attendees", json={"user": user})
        assert response.status_code in (200, 201), response.text
        return response.json()


@contextmanager
def timed() -> Iterator[list[float]]:
    """Elapsed seconds, appended on exit."""
    elapsed: list[float] = []
    start = time.perf_counter()
    yield elapsed
    elapsed.append(time.perf_counter() - start)


def unique_prefix(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", f"t{label}{os.getpid()}{int(time.time() * 1000) % 10**8}")[:30]


class StandIns:
    """The control API of the stand-ins inside a worker (tests/standins.py)."""

    def __init__(self, port: int) -> None:
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def travel_to(self, utc: str) -> None:
        """Move the worker's clock to `utc` (ISO 8601, UTC)."""
        target = datetime.fromisoformat(utc).replace(tzinfo=UTC)
        shift = (target - datetime.now(UTC)).total_seconds()
        self.http.post("/clock", json={"shift": shift}).raise_for_status()

    def reset(self) -> None:
        """The real time again, the runtime flushed and closed, fresh stand-ins."""
        self.http.post("/clock", json={}).raise_for_status()
        self.http.post("/shutdown").raise_for_status()

    def vault_secrets(self) -> dict[str, str]:
        return self.http.get("/vault").json()

    def credential_scopes(self) -> list[str]:
        return self.http.get("/credential").json()

    def telemetry(self) -> dict[str, Any]:
        return self.http.get("/telemetry").json()

    def invocations_held(self) -> int:
        return self.http.get("/invocations").json()["held"]


def standins_settings(log_dir: Path) -> tuple[dict[str, str], Path]:
    """The settings that load the tests' stand-ins into a host's worker (tests/standins.py),
    and the file where the worker writes the port of their control API."""
    told = log_dir / f"standins-{uuid.uuid4().hex}.port"
    return {
        "AIPROXY_WORKER_PRELOAD": "tests.standins",
        "AIPROXY_STANDINS_PORT_FILE": str(told),
    }, told


def standins_told(told: Path) -> StandIns:
    """The control API of the stand-ins whose worker writes its port to `told`."""

    def port() -> int | None:
        try:
            return int(told.read_text())
        except (OSError, ValueError):
            return None

    return StandIns(wait_until(port, timeout=30))


@contextmanager
def host_with_standins(
    log_dir: Path, storage: str, prefix: str, name: str, **overrides: str
) -> Iterator[tuple[AppHost, StandIns]]:
    """An app host whose worker carries the tests' stand-ins, and their control API."""
    settings, told = standins_settings(log_dir)
    host = AppHost(log_dir, host_env(storage, prefix, **settings, **overrides), name=name)
    try:
        control = standins_told(told)
    except BaseException:
        host.stop()
        raise
    try:
        yield host, control
    finally:
        control.http.close()
        host.stop()


def wav(seconds: float, rate: int = 16_000) -> bytes:
    """A silent mono 16-bit WAV file of `seconds`."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return buffer.getvalue()
