"""MCP servers behind the attendee's key: /api/mcp/{name}, MCP's streamable HTTP transport.

The attendee's MCP client talks to the proxy as to the server itself: POST of JSON-RPC messages
(answered as JSON or as an event stream), GET of the server's own stream, DELETE to end a
session. The proxy checks the key and the event's window on every message, then sends the
message to the catalog entry's server with the entry's credential (never the attendee's key)
and passes `MCP-Protocol-Version`, `Accept` and `Last-Event-ID` through.

What it governs:
- `tools/list` answers show only the entry's `allowed_tools` (JSON and event streams alike);
- a `tools/call` of another tool is a JSON-RPC error naming it, never sent upstream;
- each `tools/call` takes one request from the attendee's daily cap and per-minute limits and
  is one usage record (attendee, server, tool, duration, outcome);
- the server's session id (`Mcp-Session-Id`) is sealed to the attendee and the entry
  (shared/upstreams/affinity.py): any instance routes the session's next message to the server
  that holds it, and another attendee's id is 404 (as for an ended session: the client starts
  a new one).

Refusals are JSON-RPC errors whose `data` holds the contract's code, with the contract's HTTP
status (401 for a wrong key, 429 for the limits, …), which MCP clients surface as the error of
the request. Batches (allowed by the 2025-03-26 revision only) are refused: every message is
governed on its own.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from shared.directory.catalog import Resource
from shared.directory.endpoints import EndpointPolicy, mcp_endpoint_problem
from shared.errors import ProxyError
from shared.pipeline.answers import REQUEST_ID_HEADER
from shared.pipeline.bodies import read_body
from shared.pipeline.call import Exchange
from shared.pipeline.forwarding import UpstreamRequest
from shared.pipeline.relays import StreamTimes, read_whole, relay
from shared.pipeline.streaming import EventStreamResponse
from shared.platform.identity import upstream_token
from shared.runtime import Runtime, get_runtime
from shared.upstreams.client import UpstreamAnswer, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger(__name__)

MODEL_CLASS = "mcp"
SESSION_HEADER = "mcp-session-id"
# Request headers passed to the server as the client sent them; the credential is the entry's.
PASSED_REQUEST_HEADERS = ("accept", "mcp-protocol-version", "last-event-id", "content-type")
# Answer headers passed back (the session id sealed first).
PASSED_ANSWER_HEADERS = ("content-type", "mcp-protocol-version", "allow", "retry-after")
# One MCP message: tool arguments, not uploads.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# One event of a server's stream held at most while it is read (a tools/list answer is filtered
# whole): beyond, the stream is ended with an error for the request it answers.
MAX_EVENT_BYTES = 8 * 1024 * 1024
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")

# JSON-RPC error codes (the specification's, and the server range for the proxy's refusals).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
REFUSED = -32001


def rpc_error(message_id: Any, code: int, message: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "error": {"code": code, "message": message,
                                                          "data": data}}  # fmt: skip


def _event_of(message: dict[str, Any]) -> bytes:
    """One JSON-RPC message as an event of a server's stream."""
    return b"event: message\ndata: " + orjson.dumps(message) + b"\n\n"


def error_answer(error: ProxyError, message_id: Any, request_id: str) -> Response:
    """A refusal as a JSON-RPC error with the contract's code in `data`, at its HTTP status."""
    if error.code == "tool_not_allowed":
        code = INVALID_PARAMS
    elif error.status in (400, 413):
        code = INVALID_REQUEST
    else:
        code = REFUSED
    data: dict[str, Any] = {"code": error.code, "status": error.status}
    if error.param:
        data["param"] = error.param
    body = rpc_error(message_id, code, error.message, data)
    headers = {REQUEST_ID_HEADER: request_id, **error.headers}
    return Response(orjson.dumps(body), error.status, headers, media_type="application/json")


def _message_problem(message: Any) -> str | None:
    """Why a message is no JSON-RPC 2.0 message a client may send, or None."""
    if not isinstance(message, dict):
        return "The body must be one JSON-RPC message (an object); batches are not accepted."
    if message.get("jsonrpc") != "2.0":
        return 'A JSON-RPC message carries "jsonrpc": "2.0".'
    message_id = message.get("id")
    if message_id is not None and (
        isinstance(message_id, bool) or not isinstance(message_id, str | int)
    ):
        return "A JSON-RPC id is a string or a number."
    method = message.get("method")
    if method is not None:
        if not isinstance(method, str) or not method or len(method) > 200:
            return "A JSON-RPC method is a non-empty string."
        params = message.get("params")
        if params is not None and not isinstance(params, dict):
            return "MCP params are an object."
        return None
    if message_id is None or ("result" not in message and "error" not in message):
        return "A JSON-RPC message is a request, a notification or a response."
    return None


class ToolFilter:
    """The entry's allowed tools, applied to answers: None lets every tool through."""

    def __init__(self, allowed: list[str] | None) -> None:
        self.allowed = None if allowed is None else frozenset(allowed)

    def check_call(self, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ProxyError(
                "invalid_request", "A tools/call names its tool in params.name.", param="name"
            )
        if self.allowed is not None and name not in self.allowed:
            listing = ", ".join(sorted(self.allowed)) or "none"
            raise ProxyError(
                "tool_not_allowed",
                f"Tool '{name[:128]}' is not offered at this event. Tools you may call: {listing}.",
                param="name",
            )

    def listed(self, answer: dict[str, Any]) -> dict[str, Any]:
        """A tools/list answer with only the allowed tools."""
        result = answer.get("result")
        if self.allowed is None or not isinstance(result, dict):
            return answer
        tools = result.get("tools")
        if isinstance(tools, list):
            result["tools"] = [
                t for t in tools if isinstance(t, dict) and t.get("name") in self.allowed
            ]
        return answer


class McpMeter:
    """A server's event stream, event by event: answers to the request being watched are read
    (a tools/list answer filtered, a tools/call answer noted), every other event (progress,
    log messages, the server's own requests) passed on as it came."""

    def __init__(self, watched: Any, tools: ToolFilter, answered: Callable[[dict], None]) -> None:
        self.watched = watched  # the id of the POSTed request; None for a GET stream
        self.tools = tools
        self.answered = answered
        self.done = watched is None  # a request's stream ends once it is answered
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        out = bytearray()
        start = 0
        for match in _EVENT_END.finditer(self._buffer):
            out += self._event(bytes(self._buffer[start : match.start()]), match.group())
            start = match.end()
        del self._buffer[:start]
        if len(self._buffer) > MAX_EVENT_BYTES:
            self._buffer.clear()
            error = self._upstream_error("The MCP server sent an event larger than the proxy "
                                         "relays.")  # fmt: skip
            self.answered(error)
            out += _event_of(error)
        return bytes(out)

    def cut(self, why: str) -> bytes:
        """The last event of a stream the server cut before answering the watched request: a
        JSON-RPC error for it, so the client's call ends with a reason, not a broken stream."""
        if self.watched is None or self.done:
            return b""
        return _event_of(self._upstream_error(
            f"The MCP server stopped answering before its answer came ({why}); whether the "
            "tool finished is not known. Retry, or ask the organiser about the server."
        ))  # fmt: skip

    def _upstream_error(self, message: str) -> dict[str, Any]:
        """The proxy's answer to the watched request when the server's stream cannot give it
        (the stream ends here)."""
        self.done = True
        return rpc_error(self.watched, REFUSED, message, {"code": "upstream_error", "status": 502})

    def rest(self) -> bytes:
        """What came after the last complete event: read as one more event (a server may end
        without the blank line), so nothing leaves unread."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return self._event(rest, b"") if rest else b""

    def _event(self, raw: bytes, end: bytes) -> bytes:
        """One event: the watched request's answer noted, and every tools list in an answer
        (on any stream, a resumed one too) filtered to the allowed tools."""
        watching = self.watched is not None and not self.done
        filtering = self.tools.allowed is not None
        if not (watching or filtering) or b"data:" not in raw:
            return raw + end
        lines = re.split(rb"\r\n|\n|\r", raw)
        data = b"\n".join(
            line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")
        )
        if b'"result"' not in data and b'"error"' not in data:
            return raw + end
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return raw + end
        if not isinstance(message, dict) or "method" in message:
            return raw + end
        if watching and message.get("id") == self.watched:
            self.done = True
            self.answered(message)
        result = message.get("result")
        if (
            not filtering
            or not isinstance(result, dict)
            or not isinstance(result.get("tools"), list)
        ):
            return raw + end
        kept = [line for line in lines if not line.startswith(b"data:")]
        kept.append(b"data: " + orjson.dumps(self.tools.listed(message)))
        return b"\n".join(kept) + b"\n\n"


class McpCall(Exchange):
    """One HTTP request of an MCP client to /api/mcp/{name}."""

    def __init__(self, request: Request, name: str, runtime: Runtime) -> None:
        super().__init__(request, runtime, MODEL_CLASS, UpstreamRequest(deployment=name))
        self.name = name
        self.ledger.metered = False  # only tools/call is counted
        self.message_id: Any = None
        self.parse_error: dict[str, Any] = {}

    def refusal(self, error: ProxyError) -> Response:
        """A refusal as a JSON-RPC error answering the client's message."""
        log.debug("mcp %s refused after %.1f ms: %s", self.name,
                  (time.perf_counter() - self.started) * 1000, error.code)  # fmt: skip
        return error_answer(error, self.message_id, self.request_id)

    async def run(self) -> Response:
        method = self.request.method
        self.access = await self.runtime.gate.of_request(self.request.headers, self.request.client)
        self.ledger.access = self.access
        event = self.access.event
        event.check_open()
        pools = await self.runtime.directory.pools(event.id)
        members = [r for r in pools.get(self.name, ()) if r.model_class == MODEL_CLASS]
        if not members:
            offered = sorted(
                name for name, rs in pools.items() if any(r.model_class == MODEL_CLASS for r in rs)
            )
            raise ProxyError(
                "deployment_not_found",
                f"MCP server '{self.name[:100]}' is not in this event's catalog. MCP servers "
                f"you can use: {', '.join(offered) or 'none'}.",
            )
        if method == "POST":
            body = await read_body(
                self.request, min(self.runtime.settings.max_body_bytes, MAX_MESSAGE_BYTES)
            )
            message = self.parse(body)
            if message is None:
                return self.json(self.parse_error, 400)
            resource, session = self.session_of(members)
            return await self.post(resource, session, message, body)
        resource, session = self.session_of(members)
        tools = ToolFilter(resource.allowed_tools)
        if method == "DELETE" and session is None:
            raise ProxyError(
                "invalid_request", "DELETE ends a session: send its Mcp-Session-Id header."
            )
        answer = await self.send(resource, method, session, b"")
        if method == "GET" and _is_stream(answer):
            meter = McpMeter(None, tools, lambda message: None)
            return self.relayed(answer, resource, meter, lambda outcome: None)
        return await self.whole(answer, resource, None)

    def session_of(self, members: list[Resource]) -> tuple[Resource, str | None]:
        """The member that holds the caller's session (and the server's session id), or the
        member a new session goes to."""
        assert self.access is not None
        sealed_id = self.request.headers.get(SESSION_HEADER)
        if sealed_id is None:
            ordered = self.runtime.balancer.order(f"{self.access.event.id}|mcp|{self.name}",
                                                  members)  # fmt: skip
            if not ordered:
                raise ProxyError(
                    "upstream_error",
                    "No server for this MCP entry can take calls now. Retry shortly.",
                )
            return ordered[0], None
        sealed = self.runtime.affinity.open_session(sealed_id.strip())
        holder = None
        if sealed is not None and sealed.attendee_id == self.access.attendee.id:
            holder = next((m for m in members if m.id == sealed.resource_id), None)
        if holder is None or sealed is None:
            raise ProxyError(
                "session_not_found",
                "This MCP session is not known for your key (it ended, or it is not yours). "
                "Start a new session with initialize.",
            )
        return holder, sealed.upstream_id

    def parse(self, body: bytes) -> dict[str, Any] | None:
        """The one JSON-RPC message of a POST; None (and `parse_error`) when it is no JSON."""
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self.parse_error = rpc_error(None, PARSE_ERROR, f"The body is not JSON ({exc.msg}).",
                                         {"code": "invalid_request", "status": 400})  # fmt: skip
            return None
        problem = _message_problem(message)
        if problem is not None:
            error_id = message.get("id") if isinstance(message, dict) else None
            self.message_id = error_id if isinstance(error_id, str | int) else None
            raise ProxyError("invalid_request", problem)
        self.message_id = message.get("id")
        return message

    async def post(
        self, resource: Resource, session: str | None, message: dict[str, Any], body: bytes
    ) -> Response:
        tools = ToolFilter(resource.allowed_tools)
        method = message.get("method")
        watched = self.message_id if isinstance(method, str) else None
        if method == "tools/call":
            assert self.access is not None
            name = (message.get("params") or {}).get("name")
            tools.check_call(name)
            self.ledger.metered = True
            self.ledger.tool = name
            self.upstream.members = [resource]
            await self.ledger.admit(self.access.event, len(body), 0)
        answer = await self.send(resource, "POST", session, body)
        if method == "tools/call" and answer.status >= 400:
            self.ledger.record(
                answer.status, (0, 0, 0), streamed=False, estimated=False,
                outcome="upstream_status",
            )  # fmt: skip
        if watched is not None and _is_stream(answer) and answer.status == 200:
            answered: dict[str, Any] = {}
            meter = McpMeter(watched, tools, answered.update)

            def finish(outcome: str) -> None:
                # Once answered, the call's outcome is the answer's, however the stream ended
                # (a client may hang up as soon as it has its answer).
                if method == "tools/call" and self.ledger.counter is not None:
                    self.record_tool(answered or None, "ok" if answered else outcome,
                                     streamed=True)  # fmt: skip

            return self.relayed(answer, resource, meter, finish)
        return await self.whole(answer, resource, method if answer.status == 200 else None, tools)

    async def send(
        self, resource: Resource, method: str, session: str | None, body: bytes
    ) -> UpstreamAnswer:
        """The message sent to the entry's server, with its credential."""
        policy = EndpointPolicy.of(self.runtime.settings)
        found = mcp_endpoint_problem(resource.endpoint, policy)
        if found is not None:
            log.error("mcp resource %s: endpoint %s %s; not called", resource.id,
                      resource.endpoint, found)  # fmt: skip
            raise ProxyError(
                "upstream_error",
                "This MCP server's endpoint is not one this proxy may call, so the message was "
                "not sent. Tell the event's organiser to correct the resource.",
            )
        headers = await self.credential(resource)
        for name in PASSED_REQUEST_HEADERS:
            value = self.request.headers.get(name)
            if value is not None:
                headers[name] = value
        if method == "POST":
            headers.setdefault("content-type", "application/json")
            headers.setdefault("accept", "application/json, text/event-stream")
        if session is not None:
            headers[SESSION_HEADER] = session
        self.upstream.member = resource
        try:
            answer = await self.runtime.upstream.send(
                method, resource.endpoint, headers, body, public_only=True
            )
        except UpstreamTimeout:
            raise self.failed(
                "upstream_timeout", "The MCP server did not answer in time."
            ) from None
        except UpstreamUnreachable:
            raise self.failed("upstream_error", "The MCP server could not be reached.") from None
        if 300 <= answer.status < 400 or answer.status in (401, 403, 407):
            # Never followed nor passed on (the request carries the entry's credential); a
            # refusal of the proxy's credential is the organiser's to fix, not the attendee's.
            log.warning("mcp resource %s answered %d", resource.id, answer.status)
            answer.close()
            raise self.failed(
                "upstream_error",
                f"The MCP server refused the proxy ({answer.status}). Tell the event's organiser.",
            )
        return answer

    def failed(self, code: str, message: str) -> ProxyError:
        error = ProxyError(code, f"{message} Retry shortly.")
        if self.ledger.metered and self.ledger.counter is not None:
            self.ledger.record_failure(error.status, code, streamed=False)
        return error

    async def credential(self, resource: Resource) -> dict[str, str]:
        if resource.auth == "none":
            return {}
        if resource.auth == "managed_identity":
            if resource.owner:  # only the operator's resources may (as in forwarding.py)
                raise ProxyError(
                    "upstream_error",
                    "This MCP server is set to call with the proxy's own identity, which only "
                    "the operator's resources may. Tell the organiser to use its token.",
                )
            parts = urlsplit(resource.endpoint)
            scope = f"{parts.scheme}://{parts.netloc}/.default"
            return {"authorization": f"Bearer {await upstream_token(self.runtime.settings, scope)}"}
        key = await self.runtime.directory.upstream_key(resource)
        if key is None:
            raise ProxyError(
                "upstream_error", "The MCP server has no credential configured. Tell the organiser."
            )
        if resource.auth == "bearer":
            return {"authorization": f"Bearer {key}"}
        return {"api-key": key}

    async def whole(
        self,
        answer: UpstreamAnswer,
        resource: Resource,
        method: str | None,
        tools: ToolFilter | None = None,
    ) -> Response:
        """An answer read whole: a JSON answer to a request is read (filtered, recorded)."""
        deadline = self.ledger.started + self.runtime.settings.upstream_total_timeout
        try:
            content = await read_whole(answer, deadline)
        except ProxyError as error:
            if self.ledger.metered and self.ledger.counter is not None:
                self.ledger.record_failure(error.status, error.code, streamed=False)
            raise
        is_json = "json" in answer.headers.get("content-type", "")
        filtering = tools is not None and tools.allowed is not None
        if method is not None and (method == "tools/call" or filtering):
            # A request's answer: a tool call's is recorded, a tools list in it filtered; an
            # answer the proxy cannot read is not passed on unread.
            try:
                message = orjson.loads(content) if is_json else None
            except orjson.JSONDecodeError:
                message = None
            if not isinstance(message, dict):
                if method == "tools/call":
                    self.record_tool(None, "upstream_error", streamed=False)
                raise ProxyError("upstream_error", "The MCP server answered something not JSON.")
            if method == "tools/call":
                self.record_tool(message, "ok", streamed=False)
            if filtering and tools is not None:
                content = orjson.dumps(tools.listed(message))
        return Response(content, answer.status, self.answer_headers(answer, resource))

    def record_tool(self, message: dict[str, Any] | None, outcome: str, *, streamed: bool) -> None:
        """The tool call's usage record: ok, tool_error (the tool reported a failure),
        rpc_error (a JSON-RPC error), cut or client_gone."""
        if outcome == "ok":
            if message is None:
                outcome = "cut"
            elif "error" in message:
                outcome = "rpc_error"
            elif isinstance(message.get("result"), dict) and message["result"].get("isError"):
                outcome = "tool_error"
        status = {"ok": 200, "tool_error": 200, "rpc_error": 200, "client_gone": 499}.get(
            outcome, 502
        )
        self.ledger.record(status, (0, 0, 0), streamed=streamed, estimated=False, outcome=outcome,
                           units=1)  # fmt: skip

    def relayed(
        self,
        answer: UpstreamAnswer,
        resource: Resource,
        meter: McpMeter,
        finish: Callable[[str], None],
    ) -> Response:
        settings = self.runtime.settings
        total = settings.upstream_total_timeout
        times = StreamTimes(self.ledger.started + total, total, settings.stream_idle_timeout)
        events = relay(
            answer, meter, times, finish, cut_event=meter.cut, request_id=self.request_id
        )
        headers = self.answer_headers(answer, resource)
        headers.pop("content-type", None)
        headers["cache-control"] = "no-cache"
        return EventStreamResponse(
            events, status_code=200, headers=headers, media_type="text/event-stream"
        )

    def answer_headers(self, answer: UpstreamAnswer, resource: Resource) -> dict[str, str]:
        assert self.access is not None
        headers = {n: answer.headers[n] for n in PASSED_ANSWER_HEADERS if n in answer.headers}
        session = answer.headers.get(SESSION_HEADER)
        if session:
            headers[SESSION_HEADER] = self.runtime.affinity.seal_session(
                session, resource.id, self.access.attendee.id
            )
        headers[REQUEST_ID_HEADER] = self.request_id
        return headers

    def json(self, body: dict[str, Any], status: int) -> Response:
        headers = {REQUEST_ID_HEADER: self.request_id}
        return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _is_stream(answer: UpstreamAnswer) -> bool:
    return "text/event-stream" in answer.headers.get("content-type", "")


async def mcp_call(request: Request, name: str) -> Response:
    """Entry point of /api/mcp/{name} (POST, GET, DELETE)."""
    call = McpCall(request, name, get_runtime())
    return await call.answer(call.run)


class JsonRpcMessage(BaseModel):
    """One JSON-RPC 2.0 message of MCP: a request (method and id), a notification (method) or
    a response to the server's request (id and result or error)."""

    model_config = ConfigDict(extra="allow")

    jsonrpc: Literal["2.0"]
    id: str | int | None = Field(None, description="requests and responses")
    method: str | None = Field(None, description="requests and notifications, e.g. tools/call")
    params: dict[str, Any] | None = Field(None, description="the method's parameters")
    result: dict[str, Any] | None = Field(None, description="a response's result")
    error: dict[str, Any] | None = Field(
        None,
        description="a JSON-RPC error; the proxy's refusals carry the contract's code in "
        "error.data.code",
    )


class JsonRpcErrorObject(BaseModel):
    """A JSON-RPC error: the proxy's refusals carry the contract's code in data.code."""

    model_config = ConfigDict(extra="allow")

    code: int = Field(description="-32700, -32600, -32602 or -32001 (docs/api.md#mcp-servers)")
    message: str = Field(description="what happened, and what to do")
    data: dict[str, Any] | None = Field(
        None, description="{code: the contract's error code, status, param?}"
    )


class JsonRpcError(BaseModel):
    """A refusal of an MCP message, as MCP clients read it."""

    model_config = ConfigDict(extra="allow")

    jsonrpc: Literal["2.0"]
    id: str | int | None = Field(description="the refused request's id; null when not known")
    error: JsonRpcErrorObject
