"""webhook_usage: usage records POSTed as JSON batches to a URL, retried with backoff.

Config (AIPROXY_PLUGIN_WEBHOOK_USAGE), a JSON object:

    url            where to POST (http or https; required)
    headers        extra request headers, such as {"Authorization": "Bearer ..."} (never logged)
    attempts       tries per batch before its records are counted as undelivered (default 5)
    retry_seconds  the first backoff, doubling up to 30 s (default 1)
    buffer         records held for the receiver at most; beyond, new ones are skipped and
                   counted (default 10000)
    batch          most records in one POST (default 100)
    batch_seconds  how long a record waits for others to join its POST (default 1)

The body is `{"records": [...]}`, each record the usage record's fields (docs/plugins.md);
any 2xx answer takes the batch. A batch can arrive twice (its answer lost, then retried):
`request_id` tells records apart. Each attempt is stopped at the usage budget.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from shared.plugins import Plugin

KEYS = frozenset(
    {"url", "headers", "attempts", "retry_seconds", "buffer", "batch", "batch_seconds"}
)


class DeliveryFailed(Exception):
    """The receiver answered, but not with a 2xx."""


class WebhookUsage(Plugin):
    """POSTs usage records to a receiver."""

    keys = KEYS

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        url = config.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("'url' is the http(s) address to POST usage records to")
        headers = config.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ValueError("'headers' is an object of header names and string values")
        self.url = url
        self.host = urlsplit(url).netloc  # what logs show: a URL may carry a secret
        self.headers = {**headers, "Content-Type": "application/json"}
        self.attempts = _number(config, "attempts", 5, int)
        self.retry_seconds = _number(config, "retry_seconds", 1.0, float)
        self.queue_size = _number(config, "buffer", 10_000, int)
        self.batch_size = _number(config, "batch", 100, int)
        self.batch_seconds = _number(config, "batch_seconds", 1.0, float)
        self._session: aiohttp.ClientSession | None = None

    async def on_usage(self, records: list[dict[str, Any]]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        body = orjson.dumps({"records": records})
        # A redirect is not followed (its headers may hold a credential): it is a failure.
        async with self._session.post(
            self.url, data=body, headers=self.headers, allow_redirects=False
        ) as answer:
            if not 200 <= answer.status < 300:
                text = (await answer.text(errors="replace"))[:200]
                raise DeliveryFailed(f"{self.host} answered {answer.status}: {text}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _number(config: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"'{key}' is a number of 0 or more")
    if kind is int and (not isinstance(value, int) or value < 1):
        raise ValueError(f"'{key}' is a whole number above 0")
    return kind(value)
