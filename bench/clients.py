"""Upstream HTTP clients compared: aiohttp (what the proxy uses) and httpx, same requests.

Each client runs in its own process pinned to the proxy's core, under uvloop as the dev host
does, with `CONCURRENCY` tasks sending the benchmark's chat request to the fake upstream for
`seconds`: plain answers read whole, streams read chunk by chunk as the relay does. Reported:
requests per second and the process's CPU per request (what an upstream client costs a proxy).

Run: python -m bench.clients URL KEY SECONDS (bench.run calls it with its nginx).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

CONCURRENCY = 16
API_VERSION = "2024-10-21"


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


async def _aiohttp(
    url: str, headers: dict[str, str], body: bytes, stream: bool, until: float
) -> int:
    import aiohttp

    done = 0
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as s:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < until:
                async with s.post(url, headers=headers, data=body) as response:
                    if stream:
                        async for _chunk in response.content.iter_any():
                            pass
                    else:
                        await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"aiohttp: {response.status}")
                done += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done


async def _httpx(url: str, headers: dict[str, str], body: bytes, stream: bool, until: float) -> int:
    import httpx

    done = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < until:
                async with client.stream("POST", url, headers=headers, content=body) as response:
                    if stream:
                        async for _chunk in response.aiter_raw():
                            pass
                    else:
                        await response.aread()
                    if response.status_code != 200:
                        raise RuntimeError(f"httpx: {response.status_code}")
                done += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done


CLIENTS = {"aiohttp": _aiohttp, "httpx": _httpx}


def measure(client: str, mode: str, base: str, key: str, seconds: float) -> dict[str, Any]:
    """In this process: one client, one mode; requests per second and CPU ms per request."""
    import uvloop

    from bench.nginx import JSON_DEPLOYMENT, STREAM_DEPLOYMENT, request_body

    deployment = STREAM_DEPLOYMENT if mode == "stream" else JSON_DEPLOYMENT
    url = f"{base}/openai/deployments/{deployment}/chat/completions?api-version={API_VERSION}"
    headers = {"api-key": key, "content-type": "application/json"}
    body = request_body(mode == "stream")

    async def run(duration: float) -> int:
        return await CLIENTS[client](
            url, headers, body, mode == "stream", time.monotonic() + duration
        )

    uvloop.run(run(1.0))  # warm-up: imports, connections
    cpu, started = _cpu(), time.monotonic()
    done = uvloop.run(run(seconds))
    elapsed, used = time.monotonic() - started, _cpu() - cpu
    return {
        "client": client,
        "mode": mode,
        "requests": done,
        "rps": round(done / elapsed, 1),
        "cpu_ms_per_request": round(used * 1000 / done, 4) if done else None,
    }


def main() -> None:
    base, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    client, mode = sys.argv[4], sys.argv[5]
    print("BENCH_CLIENT " + json.dumps(measure(client, mode, base, key, seconds)), flush=True)


if __name__ == "__main__":
    main()
