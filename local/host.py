"""The host stand-in: what the Functions host (.NET) does for this app, without Core Tools.

It starts the real Python worker (`local/worker.py` around `azure_functions_runtime`) in a
process of its own, speaks the host's gRPC protocol to it (init, metadata, load, invocations),
and serves HTTP on 127.0.0.1 with the routes, methods and auth levels the worker indexed. Each
call is forwarded raw to the worker's own HTTP server with `x-ms-invocation-id`, paired with an
`InvocationRequest` carrying the route parameters, body and answer streamed both ways. Timers
fire on their NCRONTAB schedules; queue triggers poll their Storage queues as the host's Queues
extension does (local/queues.py: leases, dequeue counts, the poison queue). A worker that dies is reported and started again. On SIGTERM
or SIGINT the host stops the way Azure's does: no new calls, in-flight ones drained, then the
worker is killed (it offers no `HandlesWorkerTerminateMessage`).

Run: python -m local.host [--port 7071] [--settings local.settings.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from local import protos as protocol
from local.queues import LEASE_SECONDS, Delivery, QueueListener, QueueOptions, timespan
from shared.errors import CallerGone

ROOT = Path(__file__).resolve().parent.parent
HOST_VERSION = "4.1044.0"  # the Functions host line whose protocol this stand-in speaks
DRAIN_SECONDS = 5.0  # the host's default process shutdown timeout, for in-flight calls
TERMINATE_GRACE_SECONDS = 5  # WorkerConstants.WorkerTerminateGracePeriodInSeconds
STARTUP_SECONDS = 60.0
FUNCTION_TIMEOUT_SECONDS = 300.0  # host.json functionTimeout, when it names none
# The stand-in's own setting (never on Azure): how long a queue message stays out of sight
# while its function runs, renewed at half (the extension's 10 minutes otherwise).
QUEUE_LEASE_SETTING = "AIPROXY_HOST_QUEUE_LEASE_SECONDS"
log = logging.getLogger("host")

# Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


_NOT_FORWARDED = _HOP_BY_HOP | {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"}


class StartupError(RuntimeError):
    """The worker could not index or load the app; the message is the worker's own."""


def load_local_settings(root: Path = ROOT, path: Path | None = None) -> dict[str, str]:
    """local.settings.json Values (or the example's) into os.environ, never over what is set."""
    candidates = (
        [path] if path else [root / "local.settings.json", root / "local.settings.example.json"]
    )
    for candidate in candidates:
        if candidate.exists():
            values = json.loads(candidate.read_text()).get("Values", {})
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
    for match in re.finditer(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::([^}?]*))?(\??)\}", template):
        pattern += re.escape(template[position : match.start()])
        catch_all, name, constraint, optional = match.groups()
        body = ".*" if catch_all else r"-?\d+" if constraint == "int" else "[^/]+"
        pattern += f"(?P<{name}>{body})" + ("?" if optional else "")
        position = match.end()
    pattern += re.escape(template[position:])
    base = f"/{prefix}/" if prefix else "/"
    return re.compile("^" + re.escape(base) + pattern + "/?$", re.IGNORECASE)


def resolve_setting(value: str) -> str:
    """`%NAME%` is an app setting reference, as in the Functions host."""
    match = re.fullmatch(r"%([^%]+)%", value.strip())
    if not match:
        return value
    from shared.platform.settings import SCHEDULE_SETTINGS

    name = match.group(1)
    return os.environ.get(name) or SCHEDULE_SETTINGS.get(name, "")


def next_firing(schedule: str, after: datetime) -> datetime:
    """The next time a six-field NCRONTAB schedule (seconds first) fires after `after`."""
    from croniter import croniter

    if len(schedule.split()) != 6:
        raise ValueError(f"NCRONTAB needs six fields (sec min hour day month dow): {schedule!r}")
    return croniter(schedule, after, second_at_beginning=True).get_next(datetime)


@dataclass
class Function:
    """One function as the worker indexed it."""

    name: str
    function_id: str
    trigger: dict[str, Any]
    metadata: Any
    pattern: re.Pattern[str] | None = None
    methods: frozenset[str] = frozenset()

    @property
    def kind(self) -> str:
        return str(self.trigger.get("type", ""))

    @property
    def auth_level(self) -> str:
        return str(self.trigger.get("authLevel", "function")).lower()


@dataclass
class Channel:
    """The gRPC stream of one worker process."""

    outbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    waiting: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    connected: asyncio.Future[str] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    capabilities: dict[str, str] = field(default_factory=dict)
    # Invocations sent and not answered yet, awaited or not (the runtime never answers one
    # whose HTTP request its server did not route: those stay).
    unanswered: set[str] = field(default_factory=set)


class Host:
    """One worker process, its gRPC channel, and the HTTP front that calls it."""

    def __init__(self, root: Path, function_key: str, python: str = sys.executable) -> None:
        self.root = root
        self.function_key = function_key
        self.python = python
        self.prefix = route_prefix(root)
        host_json = json.loads((root / "host.json").read_text())
        self.function_timeout = timespan(host_json.get("functionTimeout"), FUNCTION_TIMEOUT_SECONDS)
        self.queue_options = QueueOptions.of(host_json)
        self.queue_lease = float(os.environ.get(QUEUE_LEASE_SETTING) or LEASE_SECONDS)
        self.listeners: list[QueueListener] = []
        self.protos = protocol.load()
        self.functions: list[Function] = []
        self.http_uri = ""
        self.runtime_version = ""
        self.process: asyncio.subprocess.Process | None = None
        self.channel = Channel()
        self.ready = asyncio.Event()
        self.stopping = False
        self.restarts = 0
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._grpc: Any = None
        self._grpc_port = 0
        self._session: Any = None
        self._timers: list[asyncio.Task[None]] = []
        self._watch: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()

    # --- the gRPC side ----------------------------------------------------------------

    async def start_grpc(self) -> None:
        import grpc

        host = self

        class Servicer(self.protos.FunctionRpcServicer):  # type: ignore[name-defined]
            async def EventStream(self, request_iterator: Any, context: Any) -> None:
                await host._serve_stream(request_iterator, context)

        limit = 2**31 - 1
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        self.protos.add_FunctionRpcServicer_to_server(Servicer(), self._grpc)
        self._grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()

    async def _serve_stream(self, requests: Any, context: Any) -> None:
        channel = self.channel

        async def read() -> None:
            async for message in requests:
                self._received(channel, message)

        reader = asyncio.create_task(read())
        try:
            while not reader.done():
                getter = asyncio.ensure_future(channel.outbox.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    await context.write(getter.result())
                else:
                    getter.cancel()
        finally:
            reader.cancel()
            channel.closed.set()
            if channel is self.channel:
                # No invocation goes to this worker any more: new ones wait for the next (its
                # process exits without its stream, and is started again once it has). Without
                # this, a queue message taken again between the stream's end and the process's
                # was sent down the closed stream and waited there for good, its lease renewed.
                self.ready.clear()
            for future in channel.waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("the worker's stream closed"))

    def _received(self, channel: Channel, message: Any) -> None:
        kind = message.WhichOneof("content")
        if kind == "start_stream":
            if channel.connected and not channel.connected.done():
                channel.connected.set_result(message.start_stream.worker_id)
        elif kind == "rpc_log":
            self._show_log(message.rpc_log)
        else:
            answer = getattr(message, kind)
            if kind == "invocation_response":
                channel.unanswered.discard(answer.invocation_id)
            key = kind + ":" + _answer_key(kind, answer)
            future = channel.waiting.pop(key, None)
            if future is not None and not future.done():
                future.set_result(answer)

    def _show_log(self, record: Any) -> None:
        level = {0: "TRACE", 1: "DEBUG", 2: "INFO", 3: "WARNING", 4: "ERROR", 5: "CRITICAL"}
        name = level.get(record.level, str(record.level))
        invocation = f" [{record.invocation_id[:8]}]" if record.invocation_id else ""
        print(f"worker {name} {record.category}{invocation}: {record.message}", flush=True)

    async def ask(self, key: str, **content: Any) -> Any:
        """Send a message and wait for the answer paired with `key` (kind:id)."""
        channel = self.channel
        if channel.closed.is_set():  # nothing would ever answer
            raise ConnectionError("the worker's stream closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        channel.waiting[key] = future
        channel.outbox.put_nowait(self.protos.StreamingMessage(request_id="host", **content))
        try:
            return await future
        finally:
            channel.waiting.pop(key, None)

    # --- the worker process ------------------------------------------------------------

    async def start_worker(self) -> None:
        """Start the worker and take it through init, metadata and load."""
        self.ready.clear()
        self.channel = Channel()
        self.channel.connected = asyncio.get_running_loop().create_future()
        worker_id, request_id = str(uuid.uuid4()), str(uuid.uuid4())
        uri = f"http://127.0.0.1:{self._grpc_port}/"
        args = [
            self.python,
            str(self.root / "local" / "worker.py"),
            "--host", "127.0.0.1", "--port", str(self._grpc_port),
            "--workerId", worker_id, "--requestId", request_id,
            "--grpcMaxMessageLength", str(2**31 - 1),
            "--functions-uri", uri, "--functions-worker-id", worker_id,
            "--functions-request-id", request_id,
            "--functions-grpc-max-message-length", str(2**31 - 1),
        ]  # fmt: skip
        self.process = await asyncio.create_subprocess_exec(*args, cwd=self.root)
        try:
            await self._initialize(worker_id)
        except BaseException:
            await self._kill_worker()
            raise
        self._watch = asyncio.create_task(self._watch_worker(self.process))
        self.ready.set()

    async def _initialize(self, worker_id: str) -> None:
        protos, channel = self.protos, self.channel
        assert channel.connected is not None and self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        done, _ = await asyncio.wait(
            {channel.connected, exited}, timeout=STARTUP_SECONDS, return_when="FIRST_COMPLETED"
        )
        if channel.connected not in done:
            exited.cancel()
            raise StartupError(
                f"the worker exited with code {self.process.returncode} before it connected"
                if exited in done
                else "the worker did not connect within 60 s"
            )
        exited.cancel()
        init = await self._within(
            self.ask(
                "worker_init_response:",
                worker_init_request=protos.WorkerInitRequest(
                    host_version=HOST_VERSION,
                    function_app_directory=str(self.root),
                    worker_directory=str(self.root / "local"),
                    capabilities={},
                ),
            )
        )
        _check(init.result, "the worker could not start the app")
        channel.capabilities = dict(init.capabilities)
        self.runtime_version = init.worker_metadata.worker_version
        self.http_uri = channel.capabilities.get("HttpUri", "")
        metadata = await self._within(
            self.ask(
                "function_metadata_response:",
                functions_metadata_request=protos.FunctionsMetadataRequest(
                    function_app_directory=str(self.root)
                ),
            )
        )
        _check(metadata.result, "the worker could not index the app")
        functions = [self._function(m) for m in metadata.function_metadata_results]
        if not functions:
            raise StartupError(
                "the worker indexed no functions in function_app.py "
                "(a function app needs exactly one FunctionApp at module level)"
            )
        if any(f.kind == "httpTrigger" for f in functions) and not self.http_uri:
            raise StartupError(
                "the worker offers no HttpUri: the HTTP streams extension "
                "(azurefunctions-extensions-http-fastapi) is not imported by function_app.py"
            )
        loads = [
            self.ask(
                f"function_load_response:{f.function_id}",
                function_load_request=protos.FunctionLoadRequest(
                    function_id=f.function_id, metadata=f.metadata
                ),
            )
            for f in functions
        ]
        for answer in await self._within(asyncio.gather(*loads)):
            _check(answer.result, "the worker could not load a function")
        self.functions = functions
        await self._wait_for_http_server()
        http = sum(f.kind == "httpTrigger" for f in functions)
        log.info(
            "worker %s ready: azure-functions-runtime %s, %d HTTP functions, %d timers, %d queue "
            "functions",
            worker_id[:8],
            self.runtime_version,
            http,
            sum(f.kind == "timerTrigger" for f in functions),
            sum(f.kind == "queueTrigger" for f in functions),
        )

    async def _within(self, work: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(work, STARTUP_SECONDS)

    def _function(self, metadata: Any) -> Function:
        bindings = [json.loads(raw) for raw in metadata.raw_bindings]
        trigger = next((b for b in bindings if str(b.get("type", "")).endswith("Trigger")), {})
        function = Function(metadata.name, metadata.function_id, trigger, metadata)
        if function.kind == "httpTrigger":
            function.pattern = compile_route(self.prefix, trigger.get("route") or metadata.name)
            methods = trigger.get("methods") or ["GET", "POST", "PUT", "PATCH", "DELETE"]
            function.methods = frozenset(str(m).upper() for m in methods)
        return function

    async def _wait_for_http_server(self) -> None:
        """The runtime starts its uvicorn server in a task: connect until it listens."""
        if not self.http_uri:
            return
        from urllib.parse import urlparse

        uri = urlparse(self.http_uri)
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                _, writer = await asyncio.open_connection(uri.hostname, uri.port)
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise StartupError(f"no HTTP server at {self.http_uri}") from None
                await asyncio.sleep(0.02)

    async def _watch_worker(self, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self.stopping or process is not self.process:
            return
        self.ready.clear()
        self.restarts += 1
        log.error("the worker exited with code %s; starting a new one", code)
        while not self.stopping:
            try:
                await self.start_worker()
                return
            except StartupError as error:
                log.error("the new worker did not start: %s", error)
                await asyncio.sleep(1)

    async def _kill_worker(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    # --- invocations -----------------------------------------------------------------

    async def invoke(self, function: Function, invocation_id: str, data: Any) -> Any:
        binding = self.protos.ParameterBinding(name=function.trigger.get("name", "req"), data=data)
        self.channel.unanswered.add(invocation_id)
        answer = await self.ask(
            f"invocation_response:{invocation_id}",
            invocation_request=self.protos.InvocationRequest(
                invocation_id=invocation_id,
                function_id=function.function_id,
                input_data=[binding],
            ),
        )
        return answer

    async def fire_timer(self, function: Function, past_due: bool = False) -> bool:
        now = datetime.now(UTC)
        schedule = resolve_setting(str(function.trigger.get("schedule", "")))
        payload = {
            "Schedule": {"AdjustForDST": True},
            "ScheduleStatus": {
                "Last": now.isoformat(),
                "Next": next_firing(schedule, now).isoformat(),
                "LastUpdated": now.isoformat(),
            },
            "IsPastDue": past_due,
        }
        invocation_id = str(uuid.uuid4())
        started = time.perf_counter()
        self._begin()
        try:
            await self.ready.wait()
            answer = await self.invoke(
                function, invocation_id, self.protos.TypedData(json=json.dumps(payload))
            )
        except ConnectionError as error:
            log.error("timer %s: %s", function.name, error)
            return False
        finally:
            self._end()
        took = (time.perf_counter() - started) * 1000
        if answer.result.status != self.protos.StatusResult.Success:
            log.error(
                "Executed 'Functions.%s' (Failed, Id=%s, Duration=%.0fms): %s",
                function.name,
                invocation_id,
                took,
                answer.result.exception.message,
            )
            return False
        log.info(
            "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%.0fms)",
            function.name,
            invocation_id,
            took,
        )
        return True

    async def _run_timer(self, function: Function) -> None:
        schedule = resolve_setting(str(function.trigger.get("schedule", "")))
        if function.trigger.get("runOnStartup"):
            await self.fire_timer(function)
        while not self.stopping:
            now = datetime.now(UTC)
            await asyncio.sleep(max((next_firing(schedule, now) - now).total_seconds(), 0.0))
            if not self.stopping:
                await self.fire_timer(function)

    async def fire_queue(self, function: Function, delivery: Delivery) -> bool:
        """One queue message to the function: True when it succeeded."""
        protos = self.protos
        invocation_id = str(uuid.uuid4())
        metadata = {
            name: protos.TypedData(**{kind: value})
            for name, (kind, value) in delivery.metadata.items()
        }
        binding = protos.ParameterBinding(
            name=function.trigger.get("name", "msg"), data=protos.TypedData(string=delivery.body)
        )
        started = time.perf_counter()
        self._begin()
        try:
            await self.ready.wait()
            self.channel.unanswered.add(invocation_id)
            answer = await asyncio.wait_for(
                self.ask(
                    f"invocation_response:{invocation_id}",
                    invocation_request=protos.InvocationRequest(
                        invocation_id=invocation_id,
                        function_id=function.function_id,
                        input_data=[binding],
                        trigger_metadata=metadata,
                    ),
                ),
                self.function_timeout,
            )
        except (ConnectionError, TimeoutError) as error:
            log.error("queue function %s: %s", function.name, error or "function timeout")
            return False
        finally:
            self._end()
        took = (time.perf_counter() - started) * 1000
        succeeded = answer.result.status == protos.StatusResult.Success
        log.log(
            logging.INFO if succeeded else logging.ERROR,
            "Executed 'Functions.%s' (%s, Id=%s, Duration=%.0fms)%s",
            function.name,
            "Succeeded" if succeeded else "Failed",
            invocation_id,
            took,
            "" if succeeded else ": " + answer.result.exception.message,
        )
        return succeeded

    def start_queues(self) -> None:
        """A listener per queue trigger, on the storage its `connection` setting names."""
        self.listeners = []
        for function in self.functions:
            if function.kind != "queueTrigger":
                continue
            trigger = function.trigger
            queue = resolve_setting(str(trigger.get("queueName", "")))
            connection = os.environ.get(str(trigger.get("connection") or "AzureWebJobsStorage"))

            def invoke(delivery: Delivery, function: Function = function) -> Awaitable[bool]:
                return self.fire_queue(function, delivery)

            listener = QueueListener(
                function.name, queue, connection or "", self.queue_options, invoke,
                self.queue_lease,
            )  # fmt: skip
            self.listeners.append(listener)
            self._timers.append(asyncio.create_task(listener.run()))

    def start_timers(self) -> None:
        self._timers = [
            asyncio.create_task(self._run_timer(f))
            for f in self.functions
            if f.kind == "timerTrigger"
        ]

    def _begin(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    # --- the HTTP front ----------------------------------------------------------------

    def authorized(self, headers: Any, query: str) -> bool:
        supplied = headers.get("x-functions-key", "")
        if not supplied and query:
            supplied = parse_qs(query).get("code", [""])[0]
        key = self.function_key
        return bool(key and supplied) and hmac.compare_digest(supplied.encode(), key.encode())

    def match(self, path: str, method: str) -> tuple[Function, dict[str, str]] | None:
        for function in self.functions:
            if function.pattern is None or method not in function.methods:
                continue
            found = function.pattern.match(path)
            if found:
                return function, {k: v for k, v in found.groupdict().items() if v is not None}
        return None

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        if request.path.startswith("/admin/functions/") and request.method == "POST":
            return await self._run_function(request)
        if request.path == "/admin/host/status" and request.method == "GET":
            return self._status(request)
        found = self.match(_routing_path(request.raw_path), request.method)
        if found is None:
            return web.Response(status=404)  # the host's answer: no body
        function, params = found
        if function.auth_level != "anonymous" and not self.authorized(
            request.headers, request.query_string
        ):
            return web.Response(status=401)
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), STARTUP_SECONDS)
            except TimeoutError:
                return web.Response(status=503, text="The Python worker is not running.")
        self._begin()
        try:
            return await self._forward(request, function, params)
        finally:
            self._end()

    async def _forward(self, request: Any, function: Function, params: dict[str, str]) -> Any:
        import aiohttp
        from aiohttp import web

        invocation_id = str(uuid.uuid4())
        # As on Azure: the front end's X-Forwarded-* (or this connection's) reach the worker.
        original = request.headers
        headers = [(k, v) for k, v in original.items() if k.lower() not in _NOT_FORWARDED]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        chain = [original["x-forwarded-for"]] if "x-forwarded-for" in original else []
        headers += [
            ("X-Forwarded-For", ", ".join([*chain, peer[0] if peer else ""])),
            ("X-Forwarded-Host", original.get("x-forwarded-host") or request.host),
            ("X-Forwarded-Proto", original.get("x-forwarded-proto") or request.scheme),
            ("x-ms-invocation-id", invocation_id),
        ]
        http = self.protos.RpcHttp(method=request.method, url=str(request.url), params=params)
        invocation = asyncio.create_task(
            self.invoke(function, invocation_id, self.protos.TypedData(http=http))
        )
        body = request.content if request.body_exists else None
        try:
            async with self._session.request(
                request.method,
                self.http_uri + request.raw_path,
                headers=headers,
                data=body,
                allow_redirects=False,
                auto_decompress=False,
            ) as answer:
                response = web.StreamResponse(status=answer.status, reason=answer.reason)
                for name, value in answer.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        response.headers.add(name, value)
                if "content-length" in answer.headers and answer.status != 204:
                    response.content_length = int(answer.headers["content-length"])
                try:
                    await _to_caller(response.prepare(request))
                    async for chunk in answer.content.iter_any():
                        await _to_caller(response.write(chunk))
                    await _to_caller(response.write_eof())
                except CallerGone:
                    invocation.cancel()  # leaving closes the forwarded request: the call ends
                    return response
        except (aiohttp.ClientError, ConnectionError) as error:
            invocation.cancel()
            log.error("function %s: the worker did not answer: %s", function.name, error)
            return web.Response(status=500)
        except BaseException:
            invocation.cancel()  # the caller hung up: the forwarded request closes with it
            raise
        self._settle(function, invocation)
        return response

    def _settle(self, function: Function, invocation: asyncio.Task[Any]) -> None:
        """Report the invocation's outcome when it comes; give up after the function timeout
        (the runtime never ends an invocation whose request its HTTP server did not route)."""

        async def settle() -> None:
            try:
                answer = await asyncio.wait_for(invocation, self.function_timeout)
            except TimeoutError:
                log.error(
                    "function %s: no invocation result after the function timeout", function.name
                )
                return
            except (ConnectionError, asyncio.CancelledError):
                return
            if answer.result.status != self.protos.StatusResult.Success:
                log.error("function %s failed: %s", function.name, answer.result.exception.message)

        task = asyncio.create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _run_function(self, request: Any) -> Any:
        """The host's admin API: run a timer now. Answers once the run is over (Azure answers
        202 at once), so scripts and tests can wait for it."""
        from aiohttp import web

        if not self.authorized(request.headers, request.query_string):
            return web.Response(status=401)
        name = request.path.removeprefix("/admin/functions/")
        function = next(
            (
                f
                for f in self.functions
                if f.name.lower() == name.lower() and f.kind == "timerTrigger"
            ),
            None,
        )
        if function is None:
            return web.Response(status=404)
        await self.fire_timer(function)
        return web.Response(status=202)

    def _status(self, request: Any) -> Any:
        """The host's status API, with the worker process it runs."""
        from aiohttp import web

        if not self.authorized(request.headers, request.query_string):
            return web.Response(status=401)
        process = self.process
        return web.json_response(
            {
                "state": "Running" if self.ready.is_set() else "Initialized",
                "version": HOST_VERSION,
                "in_flight": self.in_flight,  # calls in the HTTP front
                # The worker's log lines of an invocation come before its answer, on one stream.
                "unanswered_invocations": sorted(self.channel.unanswered),
                "worker": {
                    "pid": process.pid if process else None,
                    "runtime_version": self.runtime_version,
                    "http_uri": self.http_uri,
                    "restarts": self.restarts,
                    "capabilities": self.channel.capabilities,
                },
                "functions": [
                    {
                        "name": f.name,
                        "trigger": f.kind,
                        "route": f.trigger.get("route"),
                        "methods": sorted(f.methods),
                        "auth_level": f.auth_level,
                    }
                    for f in self.functions
                ],
                "queues": [
                    {
                        "function": q.name,
                        "queue": q.queue_name,
                        "processed": q.processed,
                        "poisoned": q.poisoned,
                        "running": len(q.running),
                    }
                    for q in self.listeners
                ],
            }
        )

    # --- life cycle --------------------------------------------------------------------

    async def serve(self, port: int, on_ready: Callable[[int], None] | None = None) -> None:
        import aiohttp
        from aiohttp import web

        await self.start_grpc()
        await self.start_worker()
        self._session = aiohttp.ClientSession(
            # The worker's uvicorn closes a connection idle for 5 s, counted from when it wrote
            # the last answer: one reused at that moment fails the call ("Server disconnected").
            # This side counts from when it took the whole answer in, which on a busy machine
            # can be seconds later (300 answers at once), so none is reused after 1 s.
            connector=aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=1.0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        server = web.Server(self.handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else port  # 0: the one bound
        self.start_timers()
        self.start_queues()
        if on_ready:
            on_ready(port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop(site)
        await runner.cleanup()

    async def stop(self, site: Any = None) -> None:
        """Stop as the Functions host does: drain, WorkerTerminate if offered, then kill."""
        self.stopping = True
        for listener in self.listeners:
            listener.stopping = True  # no new messages; those running drain with the calls
        for task in self._timers:
            task.cancel()
        if site is not None:
            await site.stop()  # no new connections
        try:
            await asyncio.wait_for(self._idle.wait(), DRAIN_SECONDS)
        except TimeoutError:
            log.warning(
                "%d calls still running after %.0f s; stopping", self.in_flight, DRAIN_SECONDS
            )
        for listener in self.listeners:
            await listener.stop()
        await self.stop_worker()
        if self._session is not None:
            await self._session.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=1)

    async def stop_worker(self) -> None:
        """WorkerTerminate with a grace period when the worker offers to handle it; then kill."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        if self.channel.capabilities.get("HandlesWorkerTerminateMessage"):
            grace = self.protos.WorkerTerminate()
            grace.grace_period.FromSeconds(TERMINATE_GRACE_SECONDS)
            self.channel.outbox.put_nowait(
                self.protos.StreamingMessage(request_id="host", worker_terminate=grace)
            )
            try:
                await asyncio.wait_for(process.wait(), TERMINATE_GRACE_SECONDS)
            except TimeoutError:
                pass
        await self._kill_worker()


async def _to_caller(write: Awaitable[Any]) -> None:
    try:
        await write
    except ConnectionError as error:  # a reset or closed connection to the caller
        raise CallerGone from error


def _routing_path(raw_path: str) -> str:
    """The path as ASP.NET routes it: percent-decoded, except an encoded '/' stays one segment."""
    path = raw_path.split("?", 1)[0]
    return unquote(path.replace("%2F", "%252F").replace("%2f", "%252f"))


def _answer_key(kind: str, answer: Any) -> str:
    if kind == "invocation_response":
        return answer.invocation_id
    if kind == "function_load_response":
        return answer.function_id
    return ""


def _check(result: Any, what: str) -> None:
    if result.status != 1:  # StatusResult.Success
        exception = result.exception
        detail = exception.message or "no message"
        if exception.stack_trace:
            detail += "\n" + exception.stack_trace
        raise StartupError(f"{what}: {detail}")


def build(root: Path = ROOT, settings_file: Path | None = None) -> Host:
    load_local_settings(root, settings_file)
    return Host(root, os.environ.get("AIPROXY_FUNCTION_KEY", ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Function app locally (no Core Tools).")
    parser.add_argument("--port", type=int, default=7071, help="0 picks a free port")
    parser.add_argument(
        "--settings",
        type=Path,
        help="settings file to read (default: local.settings.json, else the example)",
    )
    parser.add_argument("--log-level", default="info", help="the host's own log level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="host %(levelname)s %(name)s: %(message)s"
    )
    host = build(settings_file=args.settings)

    def ready(port: int) -> None:
        print(f"host: listening on http://127.0.0.1:{port}/{host.prefix}", flush=True)

    try:
        asyncio.run(host.serve(args.port, ready))
    except StartupError as error:
        print(f"host: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
