"""Table Storage requests of the request path, without azure-core's pipeline.

The journal's inserts and deletes and the usage records' upsert batches are a few requests per
call; through the SDK each went through azure-core's async pipeline (a dozen policies, its own
aiohttp transport wrapped in its request and response objects), which cost more of the worker's
CPU than the rest of the call's storage work together. Here one aiohttp session sends them,
signed here: with the account key of the connection string (Shared Key, as the Table service
documents it) or with a bearer token of the app's identity (cached by `TokenSource` and
refreshed before it expires). Everything else (queries, tables, conditional updates) stays with
the SDK (shared/platform/tables.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from email.utils import formatdate
from typing import Any, Protocol

import aiohttp
from yarl import URL

from shared.errors import StorageUnavailable

STORAGE_SCOPE = "https://storage.azure.com/.default"
CONNECT_SECONDS, READ_SECONDS = 5.0, 20.0  # as the SDK's clients of the app (tables.py)
# Answers worth asking again: the service was briefly unable, the request itself was fine.
_RETRIED = frozenset({408, 429, 500, 502, 503, 504})
RETRY_SECONDS = 0.2  # before the one retry of an answer storage was unable to give


class Tokens(Protocol):
    async def token(self) -> str: ...


class Wire:
    """Sends requests to one account's table endpoint, signed with its key or a token."""

    def __init__(
        self,
        base: str,
        api_version: str,
        *,
        account: str = "",
        key: str = "",
        tokens: Tokens | None = None,
    ) -> None:
        if not (account and key) and tokens is None:
            raise ValueError("a Wire needs an account key or a token source")
        self._base = base.rstrip("/")
        self._path = URL(self._base).raw_path.rstrip("/")  # "/devstoreaccount1" on Azurite
        self._version = api_version
        self._account = account
        self._key = base64.b64decode(key) if key else b""
        self._tokens = tokens
        self._session: aiohttp.ClientSession | None = None
        self._closed = False  # after close(): each request on a session of its own
        self._date = (0, "")

    @classmethod
    def of(cls, base: str, api_version: str, credential: Any, tokens: Any = None) -> Wire | None:
        """The wire for an SDK client's credential: a named key (connection string) or, with
        `tokens` (a token source for the same credential), a token credential; None for
        anything else (a SAS), which stays with the SDK."""
        named = getattr(credential, "named_key", None)
        if named is not None:
            return cls(base, api_version, account=named.name, key=named.key)
        if tokens is not None and hasattr(credential, "get_token"):
            return cls(base, api_version, tokens=tokens)
        return None

    def _now(self) -> str:
        """The x-ms-date header (RFC 1123), made once a second."""
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, formatdate(second, usegmt=True))
        return self._date[1]

    async def _authorization(self, method: str, content_type: str, date: str, path: str) -> str:
        if self._tokens is not None:
            return "Bearer " + await self._tokens.token()
        # Shared Key for the Table service: verb, Content-MD5, Content-Type, date and the
        # canonicalized resource (the account, then the URL's path).
        signed = f"{method}\n\n{content_type}\n{date}\n/{self._account}{self._path}{path}"
        digest = hmac.new(self._key, signed.encode(), hashlib.sha256).digest()
        return f"SharedKey {self._account}:{base64.b64encode(digest).decode()}"

    @staticmethod
    def _new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_SECONDS, sock_read=READ_SECONDS),
            skip_auto_headers=("User-Agent",),
        )

    async def send(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """One request to `path` (under the account's endpoint, already encoded); its status
        and body. StorageUnavailable when no answer came (asked twice) or storage was unable
        twice; other statuses are the caller's to read."""
        if self._closed:
            # A writer flushing after the app closed storage (shutdown): the write still goes,
            # on a session of its own that it leaves closed.
            async with self._new_session() as session:
                return await self._exchange(session, method, path, body, headers)
        if self._session is None or self._session.closed:
            self._session = self._new_session()
        return await self._exchange(self._session, method, path, body, headers)

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
    ) -> tuple[int, bytes]:
        url = URL(self._base + path, encoded=True)
        content_type = headers.get("Content-Type", "")
        for attempt in (1, 2):
            date = self._now()
            sent = {
                **headers,
                "x-ms-date": date,
                "x-ms-version": self._version,
                "Authorization": await self._authorization(method, content_type, date, path),
            }
            try:
                async with session.request(method, url, data=body, headers=sent) as response:
                    status, answer = response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == 2:
                    raise StorageUnavailable(
                        f"{method} {path}: {type(exc).__name__}: {exc}"
                    ) from exc
                # Most often a kept-alive connection storage had closed: again at once, on a
                # new one (an outage refuses that one as fast).
                continue
            if status in _RETRIED and attempt == 1:
                await asyncio.sleep(RETRY_SECONDS)
                continue
            return status, answer
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
