"""The in-process tier: the app's HTTP functions served from the test's own process.

`FunctionsApp` is an ASGI app over what `function_app.app` registers: each HTTP function's
route template (under the host's route prefix, matched by the host stand-in's own
`compile_route`), methods, auth level and user function. It routes a call the way the host
stand-in does (404 without a body for no route or method, 401 without a body for a function-level
route without the function key, the X-Forwarded-* headers of the front end) and hands the
function the same FastAPI `Request`, path parameters set, that the worker runtime hands it.

`InProcessHost` serves it with uvicorn on 127.0.0.1 from a thread with an event loop of its own,
so the tests reach it exactly as they reach an `AppHost` (`base`, `manage`, `http`, the
official SDKs), minus the host and worker processes and the gRPC hop. The app's settings and
its runtime are per process: `configure` applies a module's settings and starts a fresh runtime
in the server's loop; only one configuration is live at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import pytest

from local.azurite import free_port
from local.host import _routing_path, compile_route, load_local_settings, route_prefix
from tests.harness import (
    E2E,
    EXAMPLE_SETTINGS,
    ROOT,
    App,
    ClientAddress,
    StandIns,
    host_env,
    standins_settings,
    standins_told,
)

log = logging.getLogger("tests.inprocess")

# The front end's headers the host replaces with its own (local/host.py).
_FORWARDED = (b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto")


@dataclass(frozen=True)
class HttpFunction:
    """One HTTP function as `function_app.app` registers it."""

    name: str
    route: str
    pattern: Any  # re.Pattern of the route under the prefix
    methods: frozenset[str]
    auth_level: str
    handler: Any
    argument: str  # the trigger's parameter name (`req`)


def timer_functions(functions: list[Any]) -> dict[str, Any]:
    """The timer functions of a FunctionApp, by name: their user functions."""
    return {
        function.get_function_name(): function.get_user_function()
        for function in functions
        if str(function.get_trigger().get_dict_repr().get("type")) == "timerTrigger"
    }


def http_functions(functions: list[Any], prefix: str) -> list[HttpFunction]:
    """The HTTP functions of a FunctionApp, in the order the worker indexes them."""
    found = []
    for function in functions:
        trigger = function.get_trigger().get_dict_repr()
        if str(trigger.get("type")) != "httpTrigger":
            continue
        methods = [str(getattr(m, "value", m)) for m in trigger.get("methods") or []]
        found.append(
            HttpFunction(
                name=function.get_function_name(),
                route=trigger.get("route") or function.get_function_name(),
                pattern=compile_route(prefix, trigger.get("route") or function.get_function_name()),
                methods=frozenset(m.upper() for m in methods or ("GET", "POST", "PUT", "DELETE")),
                auth_level=str(
                    getattr(trigger["authLevel"], "value", trigger["authLevel"])
                ).lower(),
                handler=function.get_user_function(),
                argument=str(trigger["name"]),
            )
        )
    return found


class FunctionsApp:
    """ASGI: the host's routing in front of the app's user functions."""

    def __init__(self, app: Any, prefix: str, function_key: str) -> None:
        # The app remembers the names it listed and refuses to list them again: this listing
        # leaves it as it was, for the worker or a test that lists them later.
        remembered, app.functions_bindings = app.functions_bindings, {}
        indexed = app.get_functions()
        app.functions_bindings = remembered
        self.functions = http_functions(indexed, prefix)
        self.timers = timer_functions(indexed)
        self.function_key = function_key

    def match(self, path: str, method: str) -> tuple[HttpFunction, dict[str, str]] | None:
        for function in self.functions:
            if method not in function.methods:
                continue
            found = function.pattern.match(path)
            if found:
                return function, {k: v for k, v in found.groupdict().items() if v is not None}
        return None

    def authorized(self, headers: Mapping[str, str], query: str) -> bool:
        supplied = headers.get("x-functions-key", "")
        if not supplied and query:
            supplied = parse_qs(query).get("code", [""])[0]
        key = self.function_key
        return bool(key and supplied) and hmac.compare_digest(supplied.encode(), key.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from fastapi import Request
        from starlette.responses import PlainTextResponse, Response

        if scope["type"] != "http":
            return
        if scope["path"].startswith("/admin/functions/") and scope["method"] == "POST":
            await self._run_timer(scope, receive, send)
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        found = self.match(_routing_path(raw.decode("latin-1")), scope["method"])
        if found is None:
            await Response(status_code=404)(scope, receive, send)  # the host's: no body
            return
        function, params = found
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        if function.auth_level != "anonymous" and not self.authorized(headers, query):
            await Response(status_code=401)(scope, receive, send)
            return
        scope = {**scope, "headers": self._forwarded(scope), "path_params": params}
        try:
            answer = await function.handler(**{function.argument: Request(scope, receive)})
        except Exception:  # the worker logs the failed invocation; its server answers 500
            log.exception("function %s failed", function.name)
            answer = PlainTextResponse("Internal Server Error", status_code=500)
        await answer(scope, receive, send)

    async def _run_timer(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The host's admin API: run a timer now, answered once the run is over."""
        from starlette.responses import Response

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if not self.authorized(headers, scope.get("query_string", b"").decode("latin-1")):
            await Response(status_code=401)(scope, receive, send)
            return
        name = scope["path"].removeprefix("/admin/functions/").lower()
        timer = next((t for n, t in self.timers.items() if n.lower() == name), None)
        if timer is None:
            await Response(status_code=404)(scope, receive, send)
            return
        await timer(_PastDue(False))
        await Response(status_code=202)(scope, receive, send)

    @staticmethod
    def _forwarded(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        """As on Azure: the front end's X-Forwarded-* (or this connection's) reach the app."""
        original = dict(scope["headers"])
        headers = [(k, v) for k, v in scope["headers"] if k not in _FORWARDED]
        peer = (scope.get("client") or ("",))[0].encode()
        chain = [original[b"x-forwarded-for"]] if b"x-forwarded-for" in original else []
        scheme = scope.get("scheme", "http").encode()
        headers += [
            (b"x-forwarded-for", b", ".join([*chain, peer])),
            (b"x-forwarded-host", original.get(b"x-forwarded-host") or original.get(b"host", b"")),
            (b"x-forwarded-proto", original.get(b"x-forwarded-proto") or scheme),
        ]
        return headers


@dataclass(frozen=True)
class _PastDue:
    """What a timer function is handed (the app reads nothing of it)."""

    past_due: bool


class LogCapture(logging.Handler):
    """What the app logs while a configuration is live, as text (what `AppHost.log` reads)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.buffer = io.StringIO()
        self.lock_text = threading.Lock()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == threading.main_thread().ident:
            return  # the test's own lines (its clients): the app runs in the server's threads
        try:
            line = self.format(record)
        except Exception:
            return
        with self.lock_text:
            self.buffer.write(line + "\n")

    def text(self) -> str:
        with self.lock_text:
            return self.buffer.getvalue()


class InProcessHost:
    """The app served from this process on a loopback port: the `AppHost` interface."""

    def __init__(self, env: Mapping[str, str]) -> None:
        import uvicorn

        import function_app

        self.env = dict(env)
        self.prefix = route_prefix(ROOT)
        self._standins_port: int | None = None
        self.app = FunctionsApp(function_app.app, self.prefix, self.env["AIPROXY_FUNCTION_KEY"])
        self.port = free_port()
        # Idle connections stay open as long as the host stand-in's aiohttp server keeps them
        # (75 s): uvicorn's 5 s is also httpx's pool expiry, and a client that reuses a
        # connection at the moment the server closes it gets "Server disconnected".
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_keep_alive=75,
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="inprocess-host", daemon=True)
        self.thread.start()
        self._wait_started()
        self.logs = LogCapture()
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.INFO)  # as the worker sets it
        root.addHandler(self.logs)
        self.configure(self.env)
        self.base = f"http://127.0.0.1:{self.port}/{self.prefix}"
        ClientAddress.connect(self)  # self.http, self.manage

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def _wait_started(self) -> None:
        from tests.harness import wait_until

        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=30)
        if not self.server.started:
            raise RuntimeError("the in-process host did not start")

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine in the server's loop (where the app's runtime lives)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def configure(self, env: Mapping[str, str], standins: bool = False) -> StandIns | None:
        """Serve with these settings from now on: the old runtime flushed and closed, the
        settings read again, a fresh runtime (its plugins and clients) made in the server loop.
        The settings and the runtime are read from the environment while they are made. With
        `standins`, the tests' stand-ins (tests/standins.py) are behind the app's seams, fresh,
        as in a worker that preloads them; their control API is returned."""
        from shared import runtime
        from shared.platform import clock, identity, settings

        self.run(runtime.shutdown())
        clock.reset()
        identity.set_key_vault_client(None)  # the seams as a worker has them
        identity.set_credential(None)
        control = self._standins() if standins else None
        self.env = dict(env)
        with _environment(self.env):
            load_local_settings(ROOT, EXAMPLE_SETTINGS)  # what the host stand-in adds
            settings.get.cache_clear()
            settings.get()

            async def start() -> None:
                runtime.get_runtime()

            self.run(start())
        self.logs.buffer = io.StringIO()
        return control

    def _standins(self) -> StandIns:
        """The stand-ins behind the seams, fresh, and their control API (served from the
        server's loop, where the app runs)."""
        from tests import standins

        if self._standins_port is None:
            self._standins_port = self.run(standins.standins.serve())
        standins.standins.reset()
        return StandIns(self._standins_port)

    def log(self) -> str:
        """What the app logged since this configuration started."""
        return self.logs.text()

    def status(self) -> dict[str, Any]:
        """The functions as the host's status API lists them."""
        http = [
            {
                "name": f.name,
                "trigger": "httpTrigger",
                "route": f.route,
                "methods": sorted(f.methods),
                "auth_level": f.auth_level,
            }
            for f in self.app.functions
        ]
        timers = [
            {"name": n, "trigger": "timerTrigger", "route": None, "methods": [], "auth_level": ""}
            for n in self.app.timers
        ]
        return {"state": "Running", "functions": http + timers}

    def stop(self) -> None:
        from shared import runtime

        ClientAddress.forget(self)
        self.manage.close()
        self.http.close()
        with contextlib.suppress(Exception):
            self.run(runtime.shutdown())
        self.server.should_exit = True
        self.thread.join(15)
        logging.getLogger().removeHandler(self.logs)
        logging.getLogger().setLevel(self._root_level)


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ as `env` says, AIPROXY_ settings it does not name removed, then restored."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("AIPROXY_") and n not in env]:
        del os.environ[name]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Configured:
    """The app with settings of a module's own, in the module's tier: the in-process host set up
    so until the module ends (one configuration at a time), or a new AppHost per call in a
    module marked `e2e`."""

    def __init__(self, request: pytest.FixtureRequest, storage: str, prefix: str) -> None:
        self.request, self.storage, self.prefix = request, storage, prefix
        self.e2e = request.node.get_closest_marker(E2E) is not None
        self.inprocess: InProcessHost | None = None

    def __call__(self, name: str = "host", **overrides: str) -> App:
        """`configured("name", AIPROXY_X="1")` (`prefix=` for tables of the module's own)."""
        return self._make(name, False, overrides)[0]

    def with_standins(self, name: str = "host", **overrides: str) -> tuple[App, StandIns]:
        """The same, with the tests' stand-ins (Key Vault, Entra credential, clock, telemetry;
        tests/standins.py) behind the app's seams, and their control API."""
        host, control = self._make(name, True, overrides)
        assert control is not None
        return host, control

    def _make(
        self, name: str, standins: bool, overrides: dict[str, str]
    ) -> tuple[App, StandIns | None]:
        if self.e2e:
            app_hosts = self.request.getfixturevalue("app_hosts")
            if not standins:
                return app_hosts(name, **overrides), None
            settings, told = standins_settings(self.request.getfixturevalue("log_dir"))
            return app_hosts(name, **settings, **overrides), standins_told(told)
        prefix = overrides.pop("prefix", self.prefix)
        self.inprocess = self.request.getfixturevalue("inprocess")
        control = self.inprocess.configure(host_env(self.storage, prefix, **overrides), standins)
        return self.inprocess, control

    def close(self) -> None:
        """The in-process host back to the test settings."""
        if self.inprocess is not None:
            self.inprocess.configure(host_env(self.storage, self.prefix))
