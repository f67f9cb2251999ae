"""Slows clients that keep sending wrong keys, codes or event ids, without hurting anyone else.

Attendees at a venue often share one public address, so only wrong attempts are counted and a
right one always passes:

- Keys: a key this instance found before is answered from the access cache (a stale entry is
  refreshed in the background, one storage read per key and cache TTL), so it never meets the
  guard. A key looked up and not found is remembered (`platform.cache.Misses`): sent again, it
  is refused without reading storage. Only a key this instance has never seen costs a lookup, and a client
  with more than `threshold` wrong keys in `window` seconds gets `lookups_per_second` of those;
  the rest get 429 `too_many_failed_keys`. Storage reads of unknown keys per client and instance:
  at most `threshold` + `window` x `lookups_per_second` a window (20 + 120 a minute). The price:
  a right key this instance has never seen (its first call here), sent from an address that is
  flooding wrong keys at that moment, can be told to retry in a second. Keys are 190 random
  bits, so guessing is hopeless anyway; this protects storage and makes noise visible.
- Event ids (public event routes, registration, keys made of an event's code, Entra tokens
  naming an event): the same, with a guard and `Misses` of their own; a known event is
  answered from the event cache and never refused.
- Shared codes are short and chosen by people: a wrong one (at registration, or in a key made
  of event, code and email) is counted per event and client, and once a client has
  `MAX_FAILED_CODES` wrong ones in a minute its wrong codes get 429 with a wait. A right code
  always passes: it is compared before anything is refused.
"""

from __future__ import annotations

import math
import time
from collections import deque

from shared.errors import ProxyError


class FailedKeyGuard:
    """Wrong attempts per client, and the lookups of unseen names a client over them may make."""

    def __init__(
        self,
        threshold: int = 20,
        window: float = 60.0,
        lookups_per_second: float = 2.0,
        max_clients: int = 10_000,
        wrong: str = "keys",
    ) -> None:
        self._wrong = wrong  # what the client keeps getting wrong, for the message
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
        """Before looking up a name this instance has never seen (neither cached nor a known
        miss): refuse when this client is over its budget."""
        now = time.monotonic()
        failures = self._recent(client, now)
        if failures is None or len(failures) < self._threshold:
            return
        allowed_at = self._next_lookup.get(client, 0.0)
        if now < allowed_at:
            # The next lookup is a fraction of a second away: a right key waits that long.
            wait = max(1, math.ceil(allowed_at - now))
            raise ProxyError(
                "too_many_failed_keys",
                f"Too many wrong {self._wrong} from your address. Check yours and retry in "
                f"{wait} second{'' if wait == 1 else 's'}.",
                retry_after=wait,
            )
        self._next_lookup[client] = now + self._interval

    def failed(self, client: str) -> None:
        """A wrong attempt: counted against the client's budget."""
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
                retry_after=wait,
            )

    def record(self, event_id: str, client: str) -> None:
        if len(self._failures) > 10_000:
            self._failures.clear()  # bounded memory; a flood only resets the counting
        self._recent((event_id, client), time.monotonic()).append(time.monotonic())
