"""Slows clients that keep sending wrong keys, without hurting anyone else.

Attendees at a venue often share one public address, so a client is never refused as such:
keys already known (cached) always pass. A client with more than `threshold` failed keys in
`window` seconds may only have `lookups_per_second` unknown keys looked up in storage; the rest
get 429 `too_many_failed_keys`. Keys are 190 random bits, so guessing is hopeless anyway; this
protects storage from lookup floods and makes noise visible.

Shared codes are short and chosen by people, so they can be guessed: wrong codes (at
registration, or in a key made of event, code and email) are counted per event and client, and
a client with `MAX_FAILED_CODES` wrong ones in a minute waits before trying another.
"""

from __future__ import annotations

import time
from collections import deque

from shared.errors import ProxyError


class FailedKeyGuard:
    def __init__(
        self,
        threshold: int = 20,
        window: float = 60.0,
        lookups_per_second: float = 2.0,
        max_clients: int = 10_000,
    ) -> None:
        self._threshold = threshold
        self._window = window
        self._interval = 1.0 / lookups_per_second
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}
        self._next_lookup: dict[str, float] = {}

    def _recent(self, client: str, now: float) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        while failures and failures[0] < now - self._window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            self._next_lookup.pop(client, None)
            return None
        return failures

    def check_lookup(self, client: str) -> None:
        """Before looking up an unknown key: refuse when this client is over its budget."""
        now = time.monotonic()
        failures = self._recent(client, now)
        if failures is None or len(failures) < self._threshold:
            return
        allowed_at = self._next_lookup.get(client, 0.0)
        if now < allowed_at:
            wait = max(1, int(self._window - (now - failures[0]) + 0.999))
            raise ProxyError(
                "too_many_failed_keys",
                f"Too many wrong keys from your address. Check your key; retry in {wait} seconds.",
                headers={"Retry-After": str(wait)},
            )
        self._next_lookup[client] = now + self._interval

    def failed(self, client: str) -> None:
        now = time.monotonic()
        if client not in self._failures and len(self._failures) >= self._max_clients:
            for stale in list(self._failures)[: self._max_clients // 10]:
                self._failures.pop(stale, None)
                self._next_lookup.pop(stale, None)
        self._failures.setdefault(client, deque(maxlen=self._threshold * 4)).append(now)


def client_address(headers: object, peer: tuple[str, int] | None) -> str:
    """The caller's address: the last X-Forwarded-For hop (the one Azure's front end added)."""
    forwarded = headers.get("x-forwarded-for") if hasattr(headers, "get") else None  # type: ignore[attr-defined]
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()[:64]
    return peer[0] if peer else "unknown"


# Wrong shared codes per event and client address before that client has to wait: for
# registrations and for keys made of event, shared code and email alike.
MAX_FAILED_CODES = 10
FAILED_CODE_WINDOW_SECONDS = 60.0


class FailedCodes:
    """Wrong shared codes per (event, client) in a sliding window, so codes cannot be guessed."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def check(self, event_id: str, client: str) -> None:
        now = time.monotonic()
        failures = self._recent((event_id, client), now)
        if len(failures) >= self.limit:
            wait = max(1, int(failures[0] + self.window - now + 0.999))
            raise ProxyError(
                "too_many_failed_keys",
                f"Too many wrong event codes from your address. Wait {wait} seconds, "
                "then try again with the code from the organiser.",
                headers={"Retry-After": str(wait)},
            )

    def record(self, event_id: str, client: str) -> None:
        if len(self._failures) > 10_000:
            self._failures.clear()  # bounded memory; a flood only resets the counting
        self._recent((event_id, client), time.monotonic()).append(time.monotonic())


failed_codes = FailedCodes(MAX_FAILED_CODES, FAILED_CODE_WINDOW_SECONDS)
