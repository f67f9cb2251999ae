"""Where a test run's CPU goes, module by module: a pytest plugin that is off unless named.

`pytest -p tests.cpuprobe` (with `-n 4` too) appends one JSON line per module to
`CPUPROBE_OUT` (default: cpu-by-module.jsonl in the system's temp folder): the test process
("worker"), when the module started ("at", seconds from that process's session start) and its
wall time, the CPU of the test process itself ("own"), of the processes it started and reaped during
the module ("reaped": hosts, simulators, Chromium, `make run`), and of those still running
below it ("live", and by kind: azurite, host, worker, sim). A session server's CPU counts in the
module that was running meanwhile. Sum the lines to see the suite's CPU by module.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

OUT = Path(os.environ.get("CPUPROBE_OUT", Path(tempfile.gettempdir()) / "cpu-by-module.jsonl"))
KINDS = (("azurite", "azurite"), ("local/worker.py", "worker"), ("local.host", "host"),
         ("local.simulator", "sim"), ("chrom", "chromium"))  # fmt: skip


def _kind(command: list[str]) -> str:
    line = " ".join(command).lower()
    return next((kind for mark, kind in KINDS if mark in line), "other")


def _tree() -> dict[str, Any]:
    me = psutil.Process()
    times = me.cpu_times()
    below: dict[int, tuple[str, float]] = {}
    for process in me.children(recursive=True):
        try:
            spent = process.cpu_times()
            below[process.pid] = (_kind(process.cmdline()), spent.user + spent.system)
        except psutil.Error:  # gone meanwhile
            continue
    return {
        "own": times.user + times.system,
        "reaped": times.children_user + times.children_system,
        "below": below,
    }


_SESSION_START = time.monotonic()


def pytest_sessionstart(session: pytest.Session) -> None:
    global _SESSION_START
    _SESSION_START = time.monotonic()


@pytest.fixture(scope="module", autouse=True)
def _cpu_by_module(request: pytest.FixtureRequest) -> Iterator[None]:
    before, started = _tree(), time.monotonic()
    yield
    after = _tree()
    by_kind: dict[str, float] = {}
    for pid, (kind, spent) in after["below"].items():
        earlier = before["below"].get(pid, (kind, 0.0))[1]
        by_kind[kind] = round(by_kind.get(kind, 0.0) + spent - earlier, 2)
    line = {
        "module": request.node.nodeid,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", ""),
        "at": round(started - _SESSION_START, 2),  # seconds from this process's session start
        "wall": round(time.monotonic() - started, 2),
        "own": round(after["own"] - before["own"], 2),
        "reaped": round(after["reaped"] - before["reaped"], 2),
        "live": round(sum(by_kind.values()), 2),
        "by_kind": by_kind,
    }
    with OUT.open("a") as out:
        out.write(json.dumps(line) + "\n")
