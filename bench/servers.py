"""The servers the bench measures, each a child process on a core of its choosing.

- `WorkerApp`: the app as Azure runs it, the host stand-in (`local.host`) and the Python worker
  process it starts; the host plays the platform's part and stays on the harness's core, the
  worker is moved alone onto the proxy's core once it has started.
- `InProcessApp`: bench only, the app's functions served in one uvicorn process
  (bench/inprocess.py), as the project's figures were measured before the worker runtime.
- `RelayServer`: the floor, a bare aiohttp relay to the upstream (bench/relay.py).

Their output goes to a log file, each line stamped with the time it arrived, so a run's log
lines can be told apart from the next run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_SETTINGS = ROOT / "local.settings.example.json"
FUNCTION_KEY = "bench-function-key"  # the host stand-in's admin API
OPERATOR_KEY = "bench-operator-key"  # manage/*


def pinned(cpu: int | None, args: list[str]) -> list[str]:
    return args if cpu is None else ["taskset", "-c", str(cpu), *args]


def threads(pid: int) -> list[int]:
    """The threads of `pid` (Linux sets affinity and priority per thread)."""
    return [int(task) for task in os.listdir(f"/proc/{pid}/task")]


def pin_process(pid: int, cpu: int) -> int:
    """Every thread of `pid` onto `cpu` (sched_setaffinity on a pid moves its main thread
    only); threads started later inherit it. Returns how many threads were moved."""
    moved = 0
    for thread in threads(pid):
        try:
            os.sched_setaffinity(thread, {cpu})
            moved += 1
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that just ended
    return moved


def app_env(storage: str, prefix: str, work: Path, **extra: str) -> dict[str, str]:
    """The app's settings for a bench run: everything switched on, usage to Azurite, and the
    usage journal in this run's own folder (never taken over from an earlier run)."""
    from cryptography.fernet import Fernet

    return {
        **os.environ,
        "AIPROXY_STORAGE_CONNECTION_STRING": storage,
        "AIPROXY_TABLE_PREFIX": prefix,
        "AIPROXY_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "AIPROXY_FUNCTION_KEY": FUNCTION_KEY,
        "AIPROXY_OPERATOR_KEY": OPERATOR_KEY,
        "AIPROXY_USAGE_FLUSH_SECONDS": os.environ.get("BENCH_USAGE_FLUSH_SECONDS", "1"),
        "AIPROXY_USAGE_SPILL_DIR": str(work / f"usage-{prefix}"),
        "AIPROXY_ALLOW_LOOPBACK_UPSTREAMS": "true",  # the simulator is on 127.0.0.1
        **extra,
    }


class Server:
    """A child process, its time-stamped log, and the port it serves."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT
    ) -> None:
        from local.azurite import free_port

        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self._lock = threading.Lock()
        args = [a.replace("{port}", str(self.port)) for a in args]
        self.process = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid  # taskset execs the program: same pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self._log.write(f"{stamp} {line}\n")

    def wait(self, timeout: float = 90) -> None:
        from local.azurite import wait_for_port

        try:
            wait_for_port(self.port, timeout=timeout, process=self.process)
        except (RuntimeError, TimeoutError) as error:
            time.sleep(0.5)
            raise RuntimeError(f"{self.name}: {error}\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        with self._lock:
            if not self._log.closed:
                self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        from local.process import stop

        stop(self.process, timeout=20)
        self._reader.join(5)
        with self._lock:
            self._log.close()


class RelayServer(Server):
    """bench/relay.py on `cpu`, relaying to `upstream`."""

    def __init__(
        self, work: Path, upstream: str, cpu: int | None, loop: str = "asyncio", name: str = ""
    ) -> None:
        args = [sys.executable, "-m", "bench.relay", "--port", "{port}", "--upstream", upstream]
        args += ["--loop", loop]
        name = name or f"relay-{loop}"
        super().__init__(name, pinned(cpu, args), dict(os.environ), work / f"{name}.log")

    @property
    def measured_pid(self) -> int:
        return self.pid


class InProcessApp(Server):
    """bench/inprocess.py on `cpu`: the app's functions in one uvicorn process."""

    def __init__(self, work: Path, storage: str, cpu: int | None, prefix: str) -> None:
        args = [sys.executable, "-m", "bench.inprocess", "--port", "{port}"]
        args += ["--settings", str(EXAMPLE_SETTINGS)]
        env = app_env(storage, prefix, work)
        super().__init__("in-process", pinned(cpu, args), env, work / "in-process.log")

    @property
    def measured_pid(self) -> int:
        return self.pid


class WorkerApp(Server):
    """The host stand-in on `host_cpu` and its Python worker moved onto `worker_cpu`.

    `root` is the tree whose code runs (another commit's worktree for an A/B). `measured_pid`
    is the worker's; `host_pid` the stand-in's.
    """

    def __init__(
        self,
        work: Path,
        storage: str,
        host_cpu: int | None,
        worker_cpu: int | None,
        prefix: str,
        root: Path = ROOT,
        name: str = "worker",
        **extra_env: str,
    ) -> None:
        args = [sys.executable, "-m", "local.host", "--port", "{port}"]
        args += ["--settings", str(root / "local.settings.example.json"), "--log-level", "warning"]
        env = app_env(storage, prefix, work, **extra_env)
        super().__init__(name, pinned(host_cpu, args), env, work / f"{name}.log", cwd=root)
        self.worker_cpu = worker_cpu
        self.worker_pid = 0
        self.restarts = 0
        self.runtime_version = ""

    @property
    def host_pid(self) -> int:
        return self.pid

    @property
    def measured_pid(self) -> int:
        return self.worker_pid

    def wait(self, timeout: float = 90) -> None:
        super().wait(timeout)
        self.repin()

    def status(self) -> dict[str, Any]:
        import httpx

        answer = httpx.get(
            f"{self.base}/admin/host/status", headers={"x-functions-key": FUNCTION_KEY}, timeout=30
        )
        answer.raise_for_status()
        return answer.json()

    def repin(self) -> int:
        """Read the worker's pid from the host's status (a restarted worker has a new one) and
        put all its threads on the worker's core. Returns the pid."""
        worker = self.status()["worker"]
        self.worker_pid = int(worker["pid"])
        self.restarts = int(worker.get("restarts") or 0)
        self.runtime_version = str(worker.get("runtime_version") or "")
        if self.worker_cpu is not None:
            pin_process(self.worker_pid, self.worker_cpu)
        return self.worker_pid
