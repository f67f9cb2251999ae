"""The dev host: serves function_app.app the way the Functions host does, without Core Tools.

It reads host.json's route prefix, serves every registered HTTP function with its route
template, methods and auth level (function-level keys from AIPROXY_FUNCTION_KEY), and fires
timer triggers on their NCRONTAB schedules. Run: python -m local.devhost [--port 7071]
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("devhost")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def load_local_settings(root: Path = ROOT, path: Path | None = None) -> dict[str, str]:
    """local.settings.json Values (or the example's) into os.environ, never over what is set."""
    candidates = (
        [path] if path else [root / "local.settings.json", root / "local.settings.example.json"]
    )
    for path in candidates:
        if path.exists():
            values = json.loads(path.read_text()).get("Values", {})
            for key, value in values.items():
                os.environ.setdefault(key, str(value))
            return values
    return {}


def route_prefix(root: Path = ROOT) -> str:
    host = json.loads((root / "host.json").read_text())
    prefix = host.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    return prefix.strip("/")


def compile_route(prefix: str, template: str) -> re.Pattern[str]:
    """An ASP.NET-style route template ({name}, {name?}, {*rest}, {name:constraint})."""
    pattern, position = "", 0
    for match in re.finditer(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?(\??)\}", template):
        pattern += re.escape(template[position : match.start()])
        catch_all, name, optional = match.groups()
        body = ".*" if catch_all else "[^/]+"
        pattern += f"(?P<{name}>{body})" + ("?" if optional else "")
        position = match.end()
    pattern += re.escape(template[position:])
    base = f"/{prefix}/" if prefix else "/"
    return re.compile("^" + re.escape(base) + pattern + "/?$", re.IGNORECASE)


@dataclass
class HttpFunction:
    name: str
    pattern: re.Pattern[str]
    methods: frozenset[str]
    auth_level: str
    handler: Callable[..., Awaitable[Any]]


@dataclass
class TimerFunction:
    name: str
    schedule: str
    run_on_startup: bool
    handler: Callable[..., Awaitable[Any]]


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))


_collected: dict[int, tuple[list[HttpFunction], list[TimerFunction]]] = {}


def collect(app: Any, prefix: str) -> tuple[list[HttpFunction], list[TimerFunction]]:
    """The HTTP and timer functions an azure.functions FunctionApp registered.

    The Functions library indexes an app once per process, so the answer is kept.
    """
    key = id(app)
    if key not in _collected:
        _collected[key] = _collect(app, prefix)
    return _collected[key]


def _collect(app: Any, prefix: str) -> tuple[list[HttpFunction], list[TimerFunction]]:
    http, timers = [], []
    for function in app.get_functions():
        trigger = function.get_trigger().get_dict_repr()
        handler = function.get_user_function()
        kind = trigger["type"]
        if kind == "httpTrigger":
            methods = trigger.get("methods") or ["GET", "POST", "PUT", "PATCH", "DELETE"]
            http.append(
                HttpFunction(
                    name=function.get_function_name(),
                    pattern=compile_route(
                        prefix, trigger.get("route") or function.get_function_name()
                    ),
                    methods=frozenset(_enum_value(m).upper() for m in methods),
                    auth_level=_enum_value(trigger.get("authLevel", "function")).lower(),
                    handler=handler,
                )
            )
        elif kind == "timerTrigger":
            timers.append(
                TimerFunction(
                    name=function.get_function_name(),
                    schedule=trigger["schedule"],
                    run_on_startup=bool(trigger.get("runOnStartup", False)),
                    handler=handler,
                )
            )
    return http, timers


def resolve_setting(value: str) -> str:
    """`%NAME%` is an app setting reference, as in the Functions host."""
    match = re.fullmatch(r"%([^%]+)%", value.strip())
    if not match:
        return value
    from shared.settings import SCHEDULE_SETTINGS

    name = match.group(1)
    return os.environ.get(name) or SCHEDULE_SETTINGS.get(name, "")


class TimerInfo:
    """What a timer function receives (the parts of func.TimerRequest we use)."""

    def __init__(self, past_due: bool = False) -> None:
        self.past_due = past_due


async def _run_timer(timer: TimerFunction, stop: asyncio.Event) -> None:
    from local.ncrontab import Schedule

    schedule = Schedule(resolve_setting(timer.schedule))
    if timer.run_on_startup:
        await _fire(timer)
    while not stop.is_set():
        now = datetime.now(UTC)
        delay = (
            schedule.next_after(now.replace(tzinfo=None)) - now.replace(tzinfo=None)
        ).total_seconds()
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(delay, 0.0))
            return
        except TimeoutError:
            await _fire(timer)


async def _fire(timer: TimerFunction) -> None:
    try:
        await timer.handler(TimerInfo())
    except Exception:
        log.exception("timer %s failed", timer.name)


def _json_error(status: int, code: str, message: str) -> tuple[int, bytes]:
    body = {"error": {"code": code, "message": message, "status": status}}
    return status, json.dumps(body).encode()


class DevHost:
    """An ASGI app dispatching to the registered functions."""

    def __init__(self, app: Any, prefix: str, function_key: str) -> None:
        self.http, self.timers = collect(app, prefix)
        self.function_key = function_key
        self._stop = asyncio.Event()
        self._timer_tasks: list[asyncio.Task[None]] = []

    def _authorized(self, scope: Scope) -> bool:
        if not self.function_key:
            return False
        supplied = ""
        for name, value in scope["headers"]:
            if name == b"x-functions-key":
                supplied = value.decode("latin-1")
                break
        if not supplied and scope.get("query_string"):
            from urllib.parse import parse_qs

            supplied = parse_qs(scope["query_string"].decode("latin-1")).get("code", [""])[0]
        return bool(supplied) and hmac.compare_digest(supplied.encode(), self.function_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path.startswith("/admin/functions/") and method == "POST":
            await self._run_function(path.removeprefix("/admin/functions/"), scope, send)
            return
        allowed: set[str] = set()
        for function in self.http:
            match = function.pattern.match(path)
            if match is None:
                continue
            if method not in function.methods:
                allowed |= function.methods
                continue
            if function.auth_level != "anonymous" and not self._authorized(scope):
                hint = (
                    "set AIPROXY_FUNCTION_KEY for the dev host"
                    if not self.function_key
                    else "send the function key in 'x-functions-key' or '?code='"
                )
                await _send_json(
                    send,
                    *_json_error(
                        401, "unauthorized", f"This route needs the function key: {hint}."
                    ),
                )
                return
            await self._call(function, match.groupdict(), scope, receive, send)
            return
        if allowed:
            status, body = _json_error(
                405,
                "method_not_allowed",
                f"{method} is not allowed here; use {', '.join(sorted(allowed))}.",
            )
            await _send_json(send, status, body, [(b"allow", ", ".join(sorted(allowed)).encode())])
            return
        await _send_json(
            send, *_json_error(404, "not_found", f"No route for {method} {path[:200]}.")
        )

    async def _run_function(self, name: str, scope: Scope, send: Send) -> None:
        """The host's admin API: run a timer function now. Unlike Azure, which answers 202 at
        once, the dev host answers when the run is over, so scripts and tests can wait for it."""
        if not self._authorized(scope):
            await _send_json(send, *_json_error(401, "unauthorized", "Send the function key."))
            return
        timer = next((t for t in self.timers if t.name == name), None)
        if timer is None:
            await _send_json(send, *_json_error(404, "not_found", f"No timer function {name!r}."))
            return
        await _fire(timer)
        await _send_json(send, 202, b"")

    async def _call(
        self,
        function: HttpFunction,
        params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        from starlette.requests import Request

        scope["path_params"] = params
        request = Request(scope, receive)
        try:
            response = await function.handler(request)
        except Exception:
            log.exception("function %s failed", function.name)
            await _send_json(
                send, *_json_error(500, "internal_error", "The function failed; see the host log.")
            )
            return
        await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._timer_tasks = [
                    asyncio.create_task(_run_timer(t, self._stop)) for t in self.timers
                ]
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._stop.set()
                for task in self._timer_tasks:
                    task.cancel()
                await self._close_app()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _close_app(self) -> None:
        try:
            from shared.runtime import shutdown
        except ImportError:
            return
        try:
            await shutdown()
        except Exception:
            log.exception("shutdown failed")


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})


def build(root: Path = ROOT, settings_file: Path | None = None) -> DevHost:
    load_local_settings(root, settings_file)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import function_app

    return DevHost(function_app.app, route_prefix(root), os.environ.get("AIPROXY_FUNCTION_KEY", ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Function app locally (no Core Tools).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--settings",
        type=Path,
        help="settings file to read (default: local.settings.json, else the example)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The Azure SDK logs every storage request at INFO.
    logging.getLogger("azure").setLevel(logging.WARNING)
    import uvicorn

    host = build(settings_file=args.settings)
    print(f"dev host: {len(host.http)} HTTP functions, {len(host.timers)} timers", flush=True)
    uvicorn.run(
        host,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
