"""Per-minute limits: an attendee's requests_per_minute and tokens_per_minute, and their fair
share of a deployment near its quota (shared/governance/fairshare.py).

Over either, a call is refused with 429 rate_limit_exceeded, a Retry-After of the seconds
until it would pass, and x-ratelimit-* headers in Azure's form, so the SDKs' own retries
pace the caller. A call counts from its admission, its tokens at their worst case (body bytes
/ 4 plus its token limit) until it answers and they are settled with the real count. The
counts cover the last 60 s: this instance's calls exactly, other instances' from the
attendee's daily counter row, which every instance already writes and reads each sync
interval (shared/governance/caps.py, shared/governance/minutes.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from shared.directory.catalog import Resource
from shared.directory.events import Event
from shared.errors import ProxyError
from shared.governance.caps import Caps, Counter
from shared.governance.fairshare import FairShare, Pool
from shared.governance.minutes import (
    WINDOW_SECONDS,
    Call,
    SharedSlots,
    Window,
    seconds_until,
    slot_of,
    whole_seconds,
)
from shared.platform import clock

SWEEP_SECONDS = WINDOW_SECONDS  # windows idle this long are forgotten, checked this often


class Admission:
    """What one admitted call holds in the minute's counts until it is settled or cancelled."""

    __slots__ = ("call", "pool", "pool_call", "shared", "window")

    def __init__(self) -> None:
        self.window: Window | None = None
        self.call: Call | None = None
        self.shared: SharedSlots | None = None
        self.pool: Pool | None = None
        self.pool_call: Call | None = None

    def settle(self, tokens: int) -> None:
        """The call answered: its worst case becomes what it used."""
        if self.call is not None and self.window is not None and self.shared is not None:
            self.shared.add(slot_of(self.call.time), 0, tokens - self.call.tokens)
            self.window.settle(self.call, tokens)
        if self.pool is not None and self.pool_call is not None:
            self.pool.settle(self.pool_call, tokens)
        self.call = self.pool_call = None

    def cancel(self) -> None:
        """The call was refused after it was admitted here: it never counted."""
        if self.call is not None and self.window is not None and self.shared is not None:
            if self.call.counted:
                self.shared.add(slot_of(self.call.time), -1, -self.call.tokens)
            self.window.cancel(self.call)
        if self.pool is not None and self.pool_call is not None:
            self.pool.cancel(self.pool_call)
        self.call = self.pool_call = None


class RateLimits:
    """Admits a call against its attendee's per-minute limits and its pool's fair share."""

    def __init__(self, caps: Caps, fairshare: FairShare) -> None:
        self._caps = caps
        self.fairshare = fairshare
        self._windows: dict[tuple[str, str], Window] = {}
        self._swept = time.monotonic()

    def admit(
        self,
        event: Event,
        attendee_id: str,
        counter: Counter,
        deployment: str,
        members: Sequence[Resource],
        worst_case_tokens: int,
    ) -> Admission | None:
        """Count a call the daily caps admitted (`counter`), or refuse it and hand its request
        back to the daily count. No await: concurrent calls see each other."""
        limited = event.requests_per_minute or event.tokens_per_minute
        pool = self.fairshare.pool(deployment, members)
        if not limited and pool is None:
            return None
        now = clock.time()
        window = None
        try:
            if limited:
                window = self._window(event.id, attendee_id, now)
                self._check(event, window, counter.minute, now, worst_case_tokens)
            if pool is not None:
                self.fairshare.check(pool, attendee_id, worst_case_tokens, now)
        except ProxyError:
            self._caps.give_back(counter)
            raise
        admission = Admission()
        if window is not None:
            admission.window = window
            admission.shared = counter.minute
            admission.call = window.add(now, worst_case_tokens)
            counter.minute.add(slot_of(now), 1, worst_case_tokens)
        if pool is not None:
            admission.pool = pool
            admission.pool_call = pool.take(attendee_id, worst_case_tokens, now)
        return admission

    def _window(self, event_id: str, attendee_id: str, now: float) -> Window:
        if time.monotonic() - self._swept > SWEEP_SECONDS:
            self._sweep(now)
        key = (event_id, attendee_id)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = Window()
        window.prune(now)
        return window

    def _sweep(self, now: float) -> None:
        self._swept = time.monotonic()
        for key, window in list(self._windows.items()):
            window.prune(now)
            if not window.calls:
                del self._windows[key]

    @staticmethod
    def _check(
        event: Event, window: Window, shared: SharedSlots, now: float, worst_case_tokens: int
    ) -> None:
        """Refuse a call that would pass the attendee's requests or tokens of the last minute."""
        others = shared.others(now)
        requests = window.requests + sum(r for _, r, _ in others)
        tokens = window.tokens + sum(t for _, _, t in others)
        limit_requests, limit_tokens = event.requests_per_minute, event.tokens_per_minute
        # A call whose worst case alone is above the limit still passes an empty minute.
        cost = min(worst_case_tokens, limit_tokens)
        over_requests = bool(limit_requests) and requests + 1 > limit_requests
        over_tokens = bool(limit_tokens) and tokens + cost > limit_tokens
        if not (over_requests or over_tokens):
            return
        leaving = window.leaving(now) + others
        wait_requests = (
            seconds_until(leaving, requests + 1 - limit_requests) if limit_requests else 0
        )
        wait_tokens = seconds_until(leaving, 0, tokens + cost - limit_tokens) if limit_tokens else 0
        headers: dict[str, str] = {}
        if limit_requests:
            headers["x-ratelimit-limit-requests"] = str(limit_requests)
            headers["x-ratelimit-remaining-requests"] = str(max(0, limit_requests - requests))
            headers["x-ratelimit-reset-requests"] = str(whole_seconds(wait_requests))
        if limit_tokens:
            headers["x-ratelimit-limit-tokens"] = str(limit_tokens)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, limit_tokens - tokens))
            headers["x-ratelimit-reset-tokens"] = str(whole_seconds(wait_tokens))
        wait = max(wait_requests if over_requests else 0.0, wait_tokens if over_tokens else 0.0)
        seconds = whole_seconds(wait)
        headers["Retry-After"] = str(seconds)
        headers["retry-after-ms"] = str(max(1, min(60_000, int(wait * 1000))))
        if over_requests:
            reason = "requests_per_minute"
            message = (
                f"You have made {requests} of your {limit_requests} requests per minute for "
                f"'{event.name}'. Retry after {seconds} seconds."
            )
        else:
            reason = "tokens_per_minute"
            message = (
                f"This call may use up to {worst_case_tokens} tokens and you have "
                f"{max(0, limit_tokens - tokens)} of your {limit_tokens} tokens per minute "
                f"left for '{event.name}'. Retry after {seconds} seconds, or ask for fewer "
                "tokens (max_tokens)."
            )
        raise ProxyError("rate_limit_exceeded", message, headers=headers, reason=reason)

    def observe(self, resource: Resource, headers: dict[str, str]) -> None:
        self.fairshare.observe(resource, headers)

    def sending(self, resource: Resource) -> None:
        self.fairshare.sending(resource)

    async def close(self) -> None:
        await self.fairshare.close()
