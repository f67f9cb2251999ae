"""What the worker runtime keeps per HTTP invocation, measured alone.

`azure_functions_runtime` pairs each forwarded HTTP request with its invocation in one
process-wide `HttpCoordinator` (`http_v2.http_coordinator`): a context entry per invocation id,
holding two asyncio events. This drives it the way the runtime does for each call (the request
arrives, the invocation takes it, the response is set and taken) for `CALLS` invocation ids and
reports how many entries it still holds afterwards and how much the process grew per call, so the
worker's RSS growth in `make bench` can be told apart from the app's.

Run: python -m bench.coordinator (bench.run calls it and prints one line, BENCH_COORDINATOR {json}).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

CALLS = 50_000


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _drive(calls: int) -> dict[str, Any]:
    from azure_functions_runtime.http_v2 import http_coordinator

    class Message:
        """Stands for the request and the response objects the runtime pairs."""

    before = _rss_kib()
    for _ in range(calls):
        invocation = str(uuid.uuid4())
        http_coordinator.set_http_request(invocation, Message())  # the HTTP side
        await http_coordinator.get_http_request_async(invocation)  # the invocation takes it
        http_coordinator.set_http_response(invocation, Message())
        await http_coordinator.await_http_response_async(invocation)  # the HTTP side answers
    kept = len(getattr(http_coordinator, "_context_references", {}))
    return {
        "calls": calls,
        "entries_kept": kept,
        "kib_per_call": round((_rss_kib() - before) / calls, 3),
    }


def measure(calls: int = CALLS) -> dict[str, Any]:
    from importlib.metadata import version

    result = asyncio.run(_drive(calls))
    result["runtime_version"] = version("azure-functions-runtime")
    return result


if __name__ == "__main__":
    print("BENCH_COORDINATOR " + json.dumps(measure()), flush=True)
