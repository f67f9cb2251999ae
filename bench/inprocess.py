"""Bench only: the app's HTTP functions served in-process, with no Functions host or worker.

Azure never runs the app this way. The bench keeps it as a comparison: the figures the project
measured before it moved to the real worker runtime came from such a process (one uvicorn
server that imports `function_app` and calls the handlers directly), so setting it beside the
worker in one run shows what the host's hop and the worker runtime cost. Route templates and
auth levels come from the app's own registrations (the host stand-in's route compiler); the
function key is AIPROXY_FUNCTION_KEY; no timers run.

Run: python -m bench.inprocess --port P [--settings local.settings.example.json]
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.inprocess")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class HttpFunction:
    name: str
    pattern: re.Pattern[str]
    methods: frozenset[str]
    auth_level: str
    handler: Callable[..., Awaitable[Any]]


def _value(value: Any) -> str:
    return str(getattr(value, "value", value))


def http_functions(app: Any, prefix: str) -> list[HttpFunction]:
    """The HTTP functions an azure.functions FunctionApp registered."""
    from local.host import compile_route

    found = []
    for function in app.get_functions():
        trigger = function.get_trigger().get_dict_repr()
        if trigger["type"] != "httpTrigger":
            continue
        name = function.get_function_name()
        methods = trigger.get("methods") or ["GET", "POST", "PUT", "PATCH", "DELETE"]
        found.append(
            HttpFunction(
                name=name,
                pattern=compile_route(prefix, trigger.get("route") or name),
                methods=frozenset(_value(m).upper() for m in methods),
                auth_level=_value(trigger.get("authLevel", "function")).lower(),
                handler=function.get_user_function(),
            )
        )
    return found


class InProcess:
    """An ASGI app dispatching straight to the registered HTTP functions."""

    def __init__(self, functions: list[HttpFunction], function_key: str) -> None:
        self.functions = functions
        self.function_key = function_key

    def _authorized(self, scope: Scope) -> bool:
        supplied = next((v for k, v in scope["headers"] if k == b"x-functions-key"), b"")
        key = self.function_key.encode()
        return bool(key and supplied) and hmac.compare_digest(supplied, key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        for function in self.functions:
            match = function.pattern.match(path)
            if match is None or method not in function.methods:
                continue
            if function.auth_level != "anonymous" and not self._authorized(scope):
                await _empty(send, 401)  # as the Functions host answers
                return
            await self._call(function, match.groupdict(), scope, receive, send)
            return
        await _empty(send, 404)

    async def _call(
        self, function: HttpFunction, params: dict[str, str], scope: Scope, receive: Receive,
        send: Send,
    ) -> None:  # fmt: skip
        from starlette.requests import Request

        scope["path_params"] = {k: v for k, v in params.items() if v is not None}
        try:
            response = await function.handler(Request(scope, receive))
        except Exception:
            log.exception("function %s failed", function.name)
            await _empty(send, 500)
            return
        await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                from shared.runtime import shutdown

                try:
                    await shutdown()  # flush usage, close clients
                except Exception:
                    log.exception("shutdown failed")
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _empty(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def build(settings_file: Path | None = None) -> InProcess:
    from local.host import load_local_settings, route_prefix

    load_local_settings(ROOT, settings_file)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import function_app

    functions = http_functions(function_app.app, route_prefix(ROOT))
    return InProcess(functions, os.environ.get("AIPROXY_FUNCTION_KEY", ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Bench only: the app's functions in-process.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--settings", type=Path, help="settings file (default: the example's)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    app = build(args.settings)
    print(f"in-process: {len(app.functions)} HTTP functions", flush=True)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
