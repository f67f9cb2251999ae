"""Bench only: the floor inside the worker runtime, a function that only relays.

One HTTP function on the proxy's chat route that does what bench/relay.py does (read the body,
send it with one pooled `aiohttp.ClientSession` to the upstream, pass the answer back as it
comes) and nothing else, served by the real worker runtime behind the host stand-in. Set beside
the bare relay and the app in the same run, it splits the worker's CPU per request into what the
runtime costs any function (its HTTP server, the gRPC invocation, asyncio's loop) and what the
app adds.

The worker imports this module before it indexes the app (AIPROXY_WORKER_PRELOAD, local/worker.py)
and it stands in for `function_app`, so the runtime indexes this app instead of the project's.
BENCH_RELAY_UPSTREAM is the upstream's base URL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator

import aiohttp
import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, Response, StreamingResponse

from shared.platform.telemetry import set_log_levels

UPSTREAM = os.environ.get("BENCH_RELAY_UPSTREAM", "http://127.0.0.1:8081").rstrip("/")
# Headers of one connection, recomputed by aiohttp, or the host's: never copied across.
_SKIPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})

set_log_levels()  # the app's own log levels, so both log alike
app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            auto_decompress=False,
        )
    return _session


@app.route(route="openai/deployments/{deployment}/chat/completions", methods=["POST"])
async def relay(req: Request) -> StreamingResponse:
    body = await req.body()
    headers = {k: v for k, v in req.headers.items() if k.lower() not in _SKIPPED}
    path = req.url.path.removeprefix("/api")
    url = f"{UPSTREAM}{path}?{req.url.query}" if req.url.query else UPSTREAM + path
    answer = await session().post(url, data=body, headers=headers)
    kept = {k: v for k, v in answer.headers.items() if k.lower() not in _SKIPPED}
    if answer.headers.get("content-type", "").startswith("text/event-stream"):

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.content.iter_any():
                    yield chunk
            finally:
                answer.release()

        return StreamingResponse(chunks(), status_code=answer.status, headers=kept)
    data = await answer.read()
    answer.release()
    return Response(content=data, status_code=answer.status, headers=kept)


sys.modules["function_app"] = sys.modules[__name__]
