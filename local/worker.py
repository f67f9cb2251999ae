"""The Python language worker: our gRPC shell around the Functions runtime from PyPI.

Azure starts its Python worker as `python worker.py --host H --port P --workerId W --requestId R
--grpcMaxMessageLength M` (newer hosts add `--functions-uri` and friends). The worker dials the
host's gRPC server, opens the bidirectional `EventStream`, and hands each message to
`azure_functions_runtime`, the library Azure loads for Python 3.13 apps, which indexes
function_app.py, serves HTTP streams from its own uvicorn server and runs the functions.
This shell does what Azure's (unpublished) gRPC shell does around that library: parse the
arguments, open the stream, dispatch messages, send the answers, and forward every log record
as an `RpcLog`. Like Azure's, it does not offer `HandlesWorkerTerminateMessage`: the host
stops it by killing the process (see docs/local.md, "When a worker stops").
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import queue
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, as the host does
    sys.path.insert(0, str(ROOT))

from local import protos as protocol  # noqa: E402

log = logging.getLogger("aiproxy.worker")

# The runtime's own records; the rest are the app's ("User" in the host's log).
_SYSTEM_LOGGERS = ("azure.functions", "azure_functions_runtime", "aiproxy.worker")


@dataclass
class WorkerRequest:
    """What the runtime's entry points take: the host's message and the shell's properties."""

    name: str
    request: Any
    properties: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Python worker for the Functions host.")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--workerId", dest="worker_id")
    parser.add_argument("--requestId", dest="request_id")
    parser.add_argument("--grpcMaxMessageLength", dest="max_message", type=int, default=0)
    parser.add_argument("--functions-uri", dest="functions_uri")
    parser.add_argument("--functions-worker-id", dest="worker_id2")
    parser.add_argument("--functions-request-id", dest="request_id2")
    parser.add_argument("--functions-grpc-max-message-length", dest="max_message2", type=int)
    args, _ = parser.parse_known_args(argv)
    if args.functions_uri:
        uri = urlparse(args.functions_uri)
        args.host, args.port = uri.hostname, uri.port
    args.worker_id = args.worker_id2 or args.worker_id
    args.request_id = args.request_id2 or args.request_id
    args.max_message = args.max_message2 or args.max_message
    missing = [n for n in ("host", "port", "worker_id", "request_id") if not getattr(args, n)]
    if missing:
        parser.error("missing " + ", ".join(missing))
    return args


def _loopback_port() -> int:
    """A free port on 127.0.0.1 (the runtime's own probe binds every interface)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RpcLogHandler(logging.Handler):
    """Every log record of the process, sent to the host as an RpcLog."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker
        self.protos = worker.protos
        self.levels = (
            (logging.CRITICAL, self.protos.RpcLog.Critical),
            (logging.ERROR, self.protos.RpcLog.Error),
            (logging.WARNING, self.protos.RpcLog.Warning),
            (logging.INFO, self.protos.RpcLog.Information),
            (logging.DEBUG, self.protos.RpcLog.Debug),
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = next((rpc for py, rpc in self.levels if record.levelno >= py), 0)
            system = record.name.startswith(_SYSTEM_LOGGERS)
            message = self.protos.RpcLog(
                level=level,
                message=self.format(record),
                category=record.name,
                log_category=self.protos.RpcLog.System if system else self.protos.RpcLog.User,
                invocation_id=self.worker.invocation_of_context() or "",
            )
            self.worker.send(rpc_log=message)
        except Exception:
            self.handleError(record)


class Worker:
    """One gRPC stream to the host, read and written on a thread of its own (as Azure's shell
    does); each message is handled in a task on the event loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.protos = protocol.load()
        self.loop = asyncio.get_running_loop()
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        import azure_functions_runtime as runtime
        import azure_functions_runtime.http_v2 as http_v2

        http_v2.get_unused_tcp_port = _loopback_port
        self.runtime = runtime
        self.properties = {"protos": self.protos, "host": args.host}

    def invocation_of_context(self) -> str | None:
        return self.runtime.invocation_id_cv.get()

    def send(self, **content: Any) -> None:
        """Queue a message for the host; safe from any thread."""
        self.outbox.put(self.protos.StreamingMessage(request_id=self.args.request_id, **content))

    def _outgoing(self) -> Any:
        while (message := self.outbox.get()) is not _STOP:
            yield message

    async def run(self) -> None:
        connected: asyncio.Future[None] = self.loop.create_future()
        thread = threading.Thread(target=self._stream, args=(connected,), name="grpc", daemon=True)
        thread.start()
        await connected
        self.send(start_stream=self.protos.StartStream(worker_id=self.args.worker_id))
        self._forward_logs()
        await self.closed
        self.outbox.put(_STOP)
        log.warning("the host closed the stream; the worker stops")

    def _stream(self, connected: asyncio.Future[None]) -> None:
        """The gRPC thread: dial the host, then hand each message over to the loop."""
        import grpc

        options = []
        if self.args.max_message:
            options = [
                ("grpc.max_receive_message_length", self.args.max_message),
                ("grpc.max_send_message_length", self.args.max_message),
            ]
        channel = grpc.insecure_channel(f"{self.args.host}:{self.args.port}", options)
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        except Exception as error:
            self.loop.call_soon_threadsafe(connected.set_exception, error)
            return
        self.loop.call_soon_threadsafe(connected.set_result, None)
        stream = self.protos.FunctionRpcStub(channel).EventStream(self._outgoing())
        try:
            for message in stream:
                self.loop.call_soon_threadsafe(self._start, message)
        except grpc.RpcError:
            pass  # the host went away: the stream ends
        finally:
            self.loop.call_soon_threadsafe(_resolve, self.closed)

    def _start(self, message: Any) -> None:
        task = self.loop.create_task(self.dispatch(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _forward_logs(self) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):  # from now on the host shows the logs
            root.removeHandler(handler)
        handler = RpcLogHandler(self)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if _truthy("PYTHON_ENABLE_DEBUG_LOGGING") else logging.INFO)

    async def dispatch(self, message: Any) -> None:
        kind = message.WhichOneof("content")
        try:
            answer = await self._answer(kind, message)
        except Exception:
            log.exception("the worker failed on %s", kind)
            return
        if answer is not None:
            self.send(**answer)

    async def _answer(self, kind: str | None, message: Any) -> dict[str, Any] | None:
        runtime, request = self.runtime, WorkerRequest(kind or "", message, self.properties)
        if kind == "worker_init_request":
            directory = message.worker_init_request.function_app_directory
            if directory and directory not in sys.path:
                sys.path.insert(0, directory)
            for name in filter(None, os.environ.get("AIPROXY_WORKER_PRELOAD", "").split(",")):
                importlib.import_module(name)  # the tests' stand-ins (tests/standins.py)
            runtime.start_threadpool_executor()
            return {"worker_init_response": await runtime.worker_init_request(request)}
        if kind == "functions_metadata_request":
            return {"function_metadata_response": await runtime.functions_metadata_request(request)}
        if kind == "function_load_request":
            return {"function_load_response": await runtime.function_load_request(request)}
        if kind == "invocation_request":
            return {"invocation_response": await runtime.invocation_request(request)}
        if kind == "function_environment_reload_request":
            reload = message.function_environment_reload_request
            if reload.function_app_directory and reload.function_app_directory not in sys.path:
                sys.path.insert(0, reload.function_app_directory)
            runtime.start_threadpool_executor()
            answer = await runtime.function_environment_reload_request(request)
            return {"function_environment_reload_response": answer}
        if kind == "worker_status_request":
            return {"worker_status_response": self.protos.WorkerStatusResponse()}
        log.debug("the worker ignores %s messages", kind)
        return None


_STOP = object()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


async def _main(args: argparse.Namespace) -> None:
    await Worker(args).run()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="worker %(levelname)s %(name)s: %(message)s")
    factory = None
    try:  # Azure's shell runs uvloop when it is there, and so the runtime's uvicorn does too
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    asyncio.run(_main(args), loop_factory=factory)


if __name__ == "__main__":
    main()
