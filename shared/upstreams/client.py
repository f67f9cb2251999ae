"""How bytes move to and from an upstream deployment: one pooled HTTP client per process.

aiohttp stays in this module. The rest of the app reads an upstream's answer through
`UpstreamAnswer` (status, headers, `read()`, `chunks()`, `close()`), and sends through
`UpstreamClient.send`. The client's `transport` argument is the seam for tests: any async
callable `(method, url, headers, body) -> UpstreamAnswer`, for example one that answers
`CannedAnswer`s, replaces the network.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

import aiohttp
from aiohttp.abc import AbstractResolver

from shared.platform.settings import Settings


class UpstreamUnreachable(Exception):
    """Connection refused or reset, DNS failure, TLS failure: no answer at all, or the
    connection failed midway through the body (`status`: a WebSocket the upstream refused)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTimeout(Exception):
    """The upstream did not answer in time."""


class UpstreamAnswer(Protocol):
    """An upstream response whose headers arrived; the body is read by the caller, either
    whole (`read`) or as it arrives (`chunks`), and the answer closed once done with."""

    status: int
    headers: dict[str, str]  # names in lower case

    async def read(self) -> bytes:
        """The whole body; raises UpstreamTimeout or UpstreamUnreachable."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. A connection that fails midway first gives the bytes
        that did arrive, then raises UpstreamUnreachable (or UpstreamTimeout)."""
        ...

    def close(self) -> None: ...


Transport = Callable[[str, str, dict[str, str], bytes], Awaitable[UpstreamAnswer]]


class CannedAnswer:
    """An answer made of bytes already at hand (a test's fake upstream): `chunks` gives them
    one by one, then raises `fail` if set, as a connection cut midway would."""

    def __init__(
        self,
        status: int = 200,
        headers: dict[str, str] | None = None,
        body: bytes | Iterable[bytes] = b"",
        *,
        fail: Exception | None = None,
    ) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self._parts = [body] if isinstance(body, bytes) else list(body)
        self._fail = fail
        self.closed = False

    async def read(self) -> bytes:
        if self._fail is not None:
            raise self._fail
        return b"".join(self._parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            yield part
        if self._fail is not None:
            raise self._fail

    def close(self) -> None:
        self.closed = True


class _AiohttpAnswer:
    """An `UpstreamAnswer` over an aiohttp response."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.headers.items()}
        self._response = response

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream body too slow") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        finally:
            self._response.release()

    def chunks(self) -> AsyncIterator[bytes]:
        # The read timeout is the wait for the first byte; a relayed body's silences are the
        # relay's to time (its idle timeout), so the socket's timer is no longer set again on
        # every read. Each request sets its own again on the pooled connection.
        connection = self._response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = None
        return _Chunks(self._response.content)

    def close(self) -> None:
        self._response.close()


class _Chunks:
    """An aiohttp body as it arrives. A plain iterator, not a generator: the relay cancels a
    wait for the next chunk (its idle timeout) without ending the iterator."""

    __slots__ = ("_content", "_failure")

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self._content = content
        self._failure: Exception | None = None

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self._failure is not None:
            raise self._failure
        try:
            chunk = await self._content.readany()
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream body too slow") from exc
        except aiohttp.ClientError as exc:
            failure = UpstreamUnreachable(str(exc) or type(exc).__name__)
            failure.__cause__ = exc
            rest = self._received_before_failure()
            if not rest:
                raise failure from exc
            self._failure = failure  # raised at the next call, once these bytes are passed on
            return rest
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def _received_before_failure(self) -> bytes:
        """Bytes that arrived but were not read yet when the connection failed.

        aiohttp raises a connection failure before handing out data it already buffered; a
        stream cut by the upstream would otherwise lose its last events (and their tokens).
        """
        buffer = getattr(self._content, "_buffer", None)
        if not buffer:
            return b""
        data = b"".join(buffer)
        buffer.clear()
        return data


class PublicResolver(AbstractResolver):
    """Resolves names to globally routable addresses only (the MCP servers' session): a public
    name that resolves to a private, loopback, link-local or reserved address is not connected
    to, and the check holds for the address the connection uses. Loopback names pass only when
    loopback upstreams are allowed (local runs and tests)."""

    def __init__(self, allow_loopback: bool) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_loopback = allow_loopback

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[dict[str, Any]]:
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if self._may_connect(r["host"])]
        if not allowed:
            # With an errno, so that aiohttp's connection error says why.
            raise OSError(errno.EADDRNOTAVAIL, f"{host} resolves to no public address")
        return allowed  # type: ignore[return-value]

    def _may_connect(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return ip.is_global or (self._allow_loopback and ip.is_loopback)

    async def close(self) -> None:
        await self._inner.close()


class Sideband:
    """A WebSocket of JSON text events (a realtime call's sideband)."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket

    async def receive(self, timeout: float | None = None) -> str | None:
        """The next text event; None once the socket closed (or `timeout` passed: "")."""
        try:
            message = await self._socket.receive(timeout=timeout)
        except TimeoutError:
            return ""
        if message.type == aiohttp.WSMsgType.TEXT:
            return str(message.data)
        if message.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.PING):
            return ""
        return None

    async def send(self, text: str) -> None:
        try:
            await self._socket.send_str(text)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise UpstreamUnreachable(str(exc)) from exc

    async def close(self) -> None:
        await self._socket.close()


class UpstreamClient:
    """Sends requests to upstreams over one pooled aiohttp session, or through `transport`
    when one is given (tests: canned answers instead of the network). MCP servers, which may be
    anywhere, are called over a session of their own that connects to public addresses only."""

    def __init__(self, settings: Settings, transport: Transport | None = None) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._public: aiohttp.ClientSession | None = None
        self._transport = transport

    def _open_session(self, public_only: bool = False) -> aiohttp.ClientSession:
        resolver = PublicResolver(self._settings.allow_loopback_upstreams) if public_only else None
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, ttl_dns_cache=300, resolver=resolver
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._settings.upstream_connect_timeout,
            sock_read=self._settings.upstream_read_timeout,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            skip_auto_headers=("User-Agent",),
        )

    async def send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        *,
        public_only: bool = False,
    ) -> UpstreamAnswer:
        """Send a request and wait for the response headers; `public_only` connects to
        globally routable addresses only (see PublicResolver)."""
        if self._transport is not None:
            return await self._transport(method, url, headers, body)
        if public_only:
            if self._public is None or self._public.closed:
                self._public = self._open_session(public_only=True)
            session = self._public
        else:
            if self._session is None or self._session.closed:
                self._session = self._open_session()
            session = self._session
        try:
            # Never to another place: the request carries the upstream's key or the app's token.
            response = await session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"no answer within {self._settings.upstream_read_timeout}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        return _AiohttpAnswer(response)

    async def websocket(self, url: str, headers: dict[str, str]) -> Sideband:
        """A WebSocket to an upstream (a realtime call's sideband); raises UpstreamUnreachable
        (with the status when the upstream answered, e.g. 404 for a call that is over)."""
        if self._session is None or self._session.closed:
            self._session = self._open_session()
        try:
            socket = await self._session.ws_connect(
                url, headers=headers, heartbeat=20, autoping=True, max_msg_size=16 * 2**20
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamUnreachable(f"{exc.status} {exc.message}", status=exc.status) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        return Sideband(socket)

    async def close(self) -> None:
        for session in (self._session, self._public):
            if session is not None:
                await session.close()
