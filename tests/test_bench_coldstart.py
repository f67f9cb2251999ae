"""The cold start bench's clock (bench/coldstart.py): a process's start as the bench reads it
from /proc is when it really started, so the figure it reports is not a second too long."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.coldstart import started_at


def test_a_process_start_read_from_proc_is_when_it_started() -> None:
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        after = time.time()
        started = started_at(child.pid)
    finally:
        child.kill()
        child.wait()
    tick = 0.011  # /proc counts a process's start in clock ticks (10 ms)
    assert before - tick <= started <= after + tick, (before, started, after)
