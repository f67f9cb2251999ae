"""Start and stop Azurite's Table and Queue services (from the project's node_modules) on
127.0.0.1: tables hold the app's state, the queue takes realtime calls to meter."""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from local.process import stop
from shared.platform.settings import AZURITE_ACCOUNT_KEY

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "node_modules" / ".bin" / "azurite-table"
QUEUE_BINARY = ROOT / "node_modules" / ".bin" / "azurite-queue"


def connection_string(port: int, queue_port: int | None = None) -> str:
    queues = f"QueueEndpoint=http://127.0.0.1:{queue_port}/devstoreaccount1;" if queue_port else ""
    return (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={AZURITE_ACCOUNT_KEY};"
        f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;{queues}"
    )


def free_port() -> int:
    """A free port on 127.0.0.1 for a server that binds it a moment later, outside the system's
    ephemeral range: a port from that range (what binding port 0 gives) can be handed to
    another socket in that moment, another server's or an outgoing connection's own end, and
    a busy test run makes thousands of those."""
    low = _ephemeral_low()
    for _ in range(200):
        port = 15_000 + secrets.randbelow(low - 15_000)  # not `random`: tests seed it
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # every try taken: the system's choice
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the system's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, 20_000)


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before listening on {port}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Azurite:
    """One Azurite table and queue service: in memory (tests) or in a folder (make run keeps
    events). The queue listens on `queue_port` (a free port when not given)."""

    def __init__(
        self,
        port: int,
        location: Path | None = None,
        access_log: Path | None = None,
        queue_port: int | None = None,
    ) -> None:
        self.port = port
        self.queue_port = queue_port or free_port()
        self.location = location
        self.access_log = access_log  # one line per table request served (tests count lookups)
        self.process: subprocess.Popen | None = None
        self.queue_process: subprocess.Popen | None = None
        self._errors: dict[str, Any] = {}  # service -> the file its stderr goes to

    @property
    def connection_string(self) -> str:
        return connection_string(self.port, self.queue_port)

    def start(self) -> Azurite:
        """Both services, once they listen."""
        return self.launch().ready()

    def launch(self) -> Azurite:
        """Start both services side by side (node takes seconds to load each) without waiting
        for them: `ready` waits. What they write to stderr goes to a file of each (a pipe
        nobody reads would stop a service once it filled), read when one fails to start."""
        args = self._service("table", BINARY, self.port, self.location)
        if self.access_log is None:
            args.append("--silent")
        out = subprocess.DEVNULL if self.access_log is None else open(self.access_log, "ab")  # noqa: SIM115
        self.process = self._popen(args, out, "table")
        if self.access_log is not None:
            out.close()  # the child holds its own copy
        queues = None if self.location is None else self.location / "queues"
        args = [*self._service("queue", QUEUE_BINARY, self.queue_port, queues), "--silent"]
        self.queue_process = self._popen(args, subprocess.DEVNULL, "queue")
        return self

    def _popen(self, args: list[str], out: Any, name: str) -> subprocess.Popen:
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - the child holds its own copy
        self._errors[name] = errors
        return subprocess.Popen(args, stdout=out, stderr=errors, start_new_session=True)

    def ready(self, timeout: float = 30.0) -> Azurite:
        """Wait until both services listen (an error, with what it said, if one of those
        started here exits)."""
        for name, port, process in (
            ("table", self.port, self.process),
            ("queue", self.queue_port, self.queue_process),
        ):
            try:
                wait_for_port(port, timeout, process=process)
            except RuntimeError as error:
                said = self._said(name)
                raise RuntimeError(f"Azurite's {name} service: {error}: {said}") from None
        return self

    def _said(self, name: str) -> str:
        errors = self._errors.get(name)
        if errors is None:
            return ""
        errors.seek(0)
        return errors.read()[-2000:].decode(errors="replace").strip()

    @staticmethod
    def _service(name: str, local: Path, port: int, location: Path | None) -> list[str]:
        """The command that starts Azurite's `name` service (table, queue) on `port`, its data
        in memory or under `location`."""
        binary = str(local) if local.exists() else shutil.which(f"azurite-{name}")
        if binary is None:
            raise RuntimeError("Azurite is not installed: run `npm ci` (make does it for you)")
        args = [
            binary,
            f"--{name}Host", "127.0.0.1",
            f"--{name}Port", str(port),
            "--disableTelemetry",
            "--skipApiVersionCheck",
        ]  # fmt: skip
        if location is None:
            args.append("--inMemoryPersistence")
        else:
            location.mkdir(parents=True, exist_ok=True)
            args += ["--location", str(location)]
        return args

    def stop(self) -> None:
        if self.process is not None:
            # SIGINT: Azurite saves its data on SIGINT but not on SIGTERM.
            stop(self.process, signal.SIGINT)
        self.process = None
        if self.queue_process is not None:
            stop(self.queue_process, signal.SIGINT)
        self.queue_process = None
        for errors in self._errors.values():
            errors.close()
        self._errors.clear()
