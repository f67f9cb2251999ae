"""The Python floor: a bare aiohttp relay to the fake upstream, for the bench to measure beside
the proxy.

It reads each request's body and sends it with one pooled `aiohttp.ClientSession` to the same
path on the upstream, then passes the answer back as it comes: a JSON answer whole, an SSE
stream chunk by chunk. No checks, no metering, no logging: the least a Python proxy can cost
per request on this harness (shared BENCHMARKS.md, "The Python floor").

Run: python -m bench.relay --port P --upstream http://127.0.0.1:N [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import aiohttp
from aiohttp import web

# Headers of one connection, or recomputed by aiohttp: never copied across.
_SKIPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


class Relay:
    """One upstream base URL and one pooled client session."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            auto_decompress=False,
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIPPED}
        async with self.session.request(
            request.method, self.upstream + request.raw_path, headers=headers, data=body
        ) as answer:
            kept = [(k, v) for k, v in answer.headers.items() if k.lower() not in _SKIPPED]
            if answer.headers.get("content-type", "").startswith("text/event-stream"):
                response = web.StreamResponse(status=answer.status, headers=kept)
                await response.prepare(request)
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
            return web.Response(status=answer.status, headers=kept, body=await answer.read())


async def serve(port: int, upstream: str) -> None:
    relay = Relay(upstream)
    await relay.start()
    runner = web.ServerRunner(web.Server(relay.handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"relay: listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    assert relay.session is not None
    await relay.session.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A bare aiohttp relay (the bench's floor).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8081")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (the Functions worker runs asyncio's own)",
    )
    args = parser.parse_args(argv)
    run: Any = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        run = uvloop.run
    run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
