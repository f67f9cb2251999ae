"""How bytes move to and from an upstream deployment: one pooled HTTP client per process."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from shared.platform.settings import Settings

# Response headers of the upstream that the caller gets to see.
PASSED_HEADERS = (
    "content-type",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)


class UpstreamUnreachable(Exception):
    """Connection refused or reset, DNS failure, TLS failure: no answer at all."""


class UpstreamTimeout(Exception):
    """The upstream did not answer in time."""


@dataclass
class UpstreamAnswer:
    """An upstream response whose headers arrived; the body is read by the caller."""

    status: int
    headers: dict[str, str]
    response: aiohttp.ClientResponse

    def passed_headers(self) -> dict[str, str]:
        return {name: self.headers[name] for name in PASSED_HEADERS if name in self.headers}

    async def read(self) -> bytes:
        try:
            return await self.response.read()
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream body too slow") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        finally:
            self.response.release()

    def received_before_failure(self) -> bytes:
        """Bytes that arrived but were not read yet when the connection failed.

        aiohttp raises a connection failure before handing out data it already buffered; a
        stream cut by the upstream would otherwise lose its last events (and their tokens).
        """
        buffer = getattr(self.response.content, "_buffer", None)
        if not buffer:
            return b""
        data = b"".join(buffer)
        buffer.clear()
        return data

    def close(self) -> None:
        self.response.close()


class UpstreamClient:
    """Sends requests to upstreams over one pooled aiohttp session."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
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
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> UpstreamAnswer:
        """Send a request and wait for the response headers."""
        if self._session is None or self._session.closed:
            self._session = self._open_session()
        try:
            # Never to another place: the request carries the upstream's key or the app's token.
            response = await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"no answer within {self._settings.upstream_read_timeout}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(str(exc)) from exc
        return UpstreamAnswer(
            status=response.status,
            headers={k.lower(): v for k, v in response.headers.items()},
            response=response,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
