"""A small MCP server for local runs, the tests and the benchmark: the MCP Python SDK's server
over streamable HTTP on 127.0.0.1, behind a bearer token.

Tools: `add` (a plain answer), `slow` (progress notifications while it works), `spell` (log
messages, one per letter, before its answer: a tool that streams), `ask` (an elicitation, the
server's own request to the client), `hold` (progress, then waits for POST /_release), `fail` (a tool error),
`secret` (for allow-list tests). GET /_stats counts the requests it was sent and those that
carried anything looking like an attendee's key (which must never reach it). The token is taken
as `Authorization: Bearer` or as `api-key`.

    python -m local.mcpserver --port 8765 --token TOKEN [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

# The `hold` tool's release, set by POST /_release (one server process, one event loop).
RELEASE: dict[str, asyncio.Event] = {}


class Name(BaseModel):
    name: str


def build_server() -> MCPServer:
    server = MCPServer("aiproxy-test-tools")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @server.tool()
    async def slow(steps: int, ctx: Context) -> str:
        """Work in steps, reporting progress after each."""
        for step in range(1, max(1, min(steps, 50)) + 1):
            await anyio.sleep(0.05)  # the work
            await ctx.report_progress(step, steps, f"step {step}")
        return f"done in {steps} steps"

    @server.tool()
    async def spell(word: str, ctx: Context) -> str:
        """Log each letter of the word, then answer it."""
        for letter in word[:40]:
            await ctx.info(letter)
        return word.upper()

    @server.tool()
    async def hold(ctx: Context) -> str:
        """Report progress, then wait until POST /_release (at most 20 s): a client that sees
        the progress while the tool still runs can release it."""
        release = RELEASE.setdefault("event", asyncio.Event())
        release.clear()
        await ctx.report_progress(1, 2, "waiting for release")
        try:
            await asyncio.wait_for(release.wait(), 20)
        except TimeoutError:
            return "timed out"
        return "released"

    @server.tool()
    async def ask(question: str, ctx: Context) -> str:
        """Ask the client's user (an elicitation: a request of the server to the client)."""
        answer = await ctx.elicit(question, Name)
        return f"hello {answer.data.name}" if answer.action == "accept" else answer.action

    @server.tool()
    def fail() -> str:
        """Always fails."""
        raise ValueError("this tool always fails")

    @server.tool()
    def secret() -> str:
        """A tool an event may keep from its attendees."""
        return "the secret"

    return server


class Guard:
    """Bearer-token check in front of the MCP app, and the counts /_stats answers."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        self.stats: dict[str, Any] = {
            "requests": 0, "attendee_keys": 0, "methods": {}, "bearer": 0, "api-key": 0,
        }  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if request.url.path == "/_stats":
            await JSONResponse(self.stats)(scope, receive, send)
            return
        if request.url.path == "/_release":
            RELEASE.setdefault("event", asyncio.Event()).set()
            await JSONResponse({"released": True})(scope, receive, send)
            return
        self.stats["requests"] += 1
        methods = self.stats["methods"]
        methods[request.method] = methods.get(request.method, 0) + 1
        if any("aip-" in value for _, value in request.headers.items()):
            self.stats["attendee_keys"] += 1
        if request.headers.get("authorization") == f"Bearer {self.token}":
            self.stats["bearer"] += 1
        elif request.headers.get("api-key") == self.token:
            self.stats["api-key"] += 1
        else:
            await Response("wrong token", 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def app(token: str, json_response: bool = False) -> Guard:
    server = build_server()
    inner = server.streamable_http_app(json_response=json_response)
    return Guard(inner, token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--token", default="mcp-test-token")
    parser.add_argument("--json", action="store_true", help="answer requests as JSON, not SSE")
    args = parser.parse_args()
    # Bound and listening here, so the port it names is this server's (0: one the system
    # picks) and takes connections from then on (they wait in the backlog until uvicorn serves
    # them). Reusable as uvicorn's own are: `make run` restarted binds its port again while the
    # last run's connections to it linger.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(2048)  # uvicorn's backlog
    print(f"mcp server on http://127.0.0.1:{sock.getsockname()[1]}/mcp", flush=True)
    config = uvicorn.Config(app(args.token, args.json), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
