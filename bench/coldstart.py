"""Cold start: from the Python worker process's start to its first answered proxied call.

An event, its deployment (the simulator) and an attendee key are set up through a first host
stand-in and its worker, which then stop. Then, COLDSTART_TRIES times (default 3), a new host
stand-in starts on the same storage, and a client on the other core asks a streamed chat call
every 20 ms until one is answered whole. Measured: the worker process's start (its start time
in /proc) to that answer, and the host stand-in's start to it. The app's own tables and key
cache start cold each time (a new process), as an instance Azure starts does; the machine's file
cache is warm (the figures leave out reading the app from a cold disk).

Run: python -m bench.coldstart (writes bench/results/coldstart.md and coldstart.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet

from bench.load import SIM_KEY, set_up
from bench.run import machine, machine_busy
from bench.servers import WorkerApp, pinned
from local.azurite import Azurite, free_port, wait_for_port
from local.process import stop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKER_CPU, LOAD_CPU = 0, 1
TARGET_SECONDS = 1.5
POLL_SECONDS = 0.02
LIMIT_SECONDS = 90.0


def boot_time() -> float:
    """When the machine booted, in seconds since the epoch, to the microsecond.

    Not /proc/stat's `btime`: it is cut to a whole second, so a process's start read from it
    was up to a second early, and every cold start as much too long (0.64 s on this machine
    the day it was found). The real-time clock less the time since boot is exact."""
    return time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_BOOTTIME)


def started_at(pid: int) -> float:
    """A process's start, in seconds since the epoch (to the kernel's tick)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        found += [int(x) for x in text.split()]
    return found


def first_answer(url: str, key: str, host_pid: int) -> tuple[float, int]:
    """Poll until a streamed call is answered whole: (when, the worker's pid)."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    deadline = time.monotonic() + LIMIT_SECONDS
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                with client.stream("POST", url, json=body, headers={"api-key": key}) as answer:
                    data = b"".join(answer.iter_bytes())
                if answer.status_code == 200 and data.rstrip().endswith(b"data: [DONE]"):
                    answered = time.time()
                    workers = [p for p in children(host_pid)]
                    return answered, workers[-1] if workers else 0
            except httpx.HTTPError:
                pass
            time.sleep(POLL_SECONDS)
    raise TimeoutError("no call answered")


def main() -> int:
    tries = int(os.environ.get("COLDSTART_TRIES", "3"))
    two_cores = len(os.sched_getaffinity(0)) >= 2
    if two_cores:
        os.sched_setaffinity(0, {LOAD_CPU})
    work = Path(tempfile.mkdtemp(prefix="aiproxy-coldstart-"))
    azurite = Azurite(free_port()).start()
    sim_port = free_port()
    simulator = subprocess.Popen(
        pinned(LOAD_CPU if two_cores else None, [sys.executable, "-m", "local.simulator",
               "--port", str(sim_port), "--api-key", SIM_KEY, "--latency-ms-per-token", "1"]),
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    secret = {"AIPROXY_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    # The host stand-in and the worker it starts on CPU 0, as on an instance; the client apart.
    cpus = (WORKER_CPU, None) if two_cores else (None, None)
    runs: list[dict[str, Any]] = []
    try:
        wait_for_port(sim_port, process=simulator)
        setup = WorkerApp(work, azurite.connection_string, *cpus, "cold", name="setup", **secret)
        setup.wait()
        _event, key = set_up(f"{setup.base}/api", f"http://127.0.0.1:{sim_port}")
        setup.stop()
        for n in range(tries):
            busy = machine_busy(1.0)
            app = WorkerApp(work, azurite.connection_string, *cpus, "cold", name=f"cold{n}",
                            **secret)  # fmt: skip
            host_started = started_at(app.host_pid)
            url = f"{app.base}/api/openai/deployments/chat/chat/completions?api-version=2024-10-21"
            try:
                answered, worker_pid = first_answer(url, key, app.host_pid)
                worker_started = started_at(worker_pid) if worker_pid else None
            finally:
                app.stop()
            run = {
                "worker_start_to_first_answer_s": round(answered - worker_started, 3)
                if worker_started
                else None,
                "host_start_to_first_answer_s": round(answered - host_started, 3),
                "cores_busy_before": busy,
            }
            print(f"coldstart: {run}", flush=True)
            runs.append(run)
    finally:
        stop(simulator)
        azurite.stop()
        shutil.rmtree(work, ignore_errors=True)
    worker_times = [
        r["worker_start_to_first_answer_s"] for r in runs if r.get("worker_start_to_first_answer_s")
    ]
    report = {
        "machine": machine(),
        "target_s": TARGET_SECONDS,
        "runs": runs,
        "worker_start_to_first_answer_s_median": sorted(worker_times)[len(worker_times) // 2]
        if worker_times
        else None,
    }
    lines = [
        "# Cold start: worker process start to its first answered call",
        "",
        f"- Date: {report['machine']['date']}, commit `{report['machine']['commit']}`",
        "- The host stand-in and the worker it starts on CPU 0; a client on CPU 1 asks a streamed chat "
        "call every 20 ms until one is answered whole (the simulator, 1 ms a token). The app's "
        "tables and caches start cold; the machine's file cache is warm.",
        f"- Target: at most {TARGET_SECONDS:g} s from the worker process's start.",
        "",
        "| try | worker start → first answer s | host start → first answer s | cores busy before |",
        "|---:|---:|---:|---|",
    ]
    for n, run in enumerate(runs, 1):
        busy = " / ".join(f"{v:.0%}" for v in run["cores_busy_before"].values())
        lines.append(
            f"| {n} | {run['worker_start_to_first_answer_s']} | "
            f"{run['host_start_to_first_answer_s']} | {busy} |"
        )
    lines += ["", f"Median: {report['worker_start_to_first_answer_s_median']} s."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "coldstart.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "coldstart.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
