"""Choosing a deployment: weighted round-robin within the best priority, with cooldowns."""

from __future__ import annotations

import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime

from shared.catalog import Resource

DEFAULT_COOLDOWN_SECONDS = 10.0
MAX_COOLDOWN_SECONDS = 300.0


def _weighted_cycle(members: Sequence[Resource]) -> list[Resource]:
    """A smooth weighted round-robin cycle (weights 1:1:2 give a, c, b, c)."""
    current = {m.id: 0 for m in members}
    total = sum(m.weight for m in members)
    cycle = []
    for _ in range(total):
        for m in members:
            current[m.id] += m.weight
        best = max(members, key=lambda m: current[m.id])
        current[best.id] -= total
        cycle.append(best)
    return cycle


def cooldown_seconds(headers: dict[str, str]) -> float:
    """How long the upstream asked us to wait, from its retry headers; 10 s if it did not say."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return min(max(float(value) * scale, 0.0), MAX_COOLDOWN_SECONDS)
            except ValueError:
                if name == "retry-after":
                    try:
                        delay = parsedate_to_datetime(value).timestamp() - time.time()
                        return min(max(delay, 0.0), MAX_COOLDOWN_SECONDS)
                    except (TypeError, ValueError):
                        pass
    resets = []
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers.get(name)
        if value:
            try:
                resets.append(float(value.rstrip("s")))
            except ValueError:
                pass
    if resets:
        return min(max(resets), MAX_COOLDOWN_SECONDS)
    return DEFAULT_COOLDOWN_SECONDS


class Balancer:
    """Orders a pool's members for one request: who first, who to fail over to."""

    def __init__(self) -> None:
        self._positions: dict[str, int] = {}
        self._cycles: dict[str, tuple[tuple[tuple[str, int], ...], list[Resource]]] = {}
        self._cooling: dict[str, float] = {}

    def cool(self, resource_id: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        if until > self._cooling.get(resource_id, 0.0):
            self._cooling[resource_id] = until

    def cooling_for(self, resource_id: str) -> float:
        return max(0.0, self._cooling.get(resource_id, 0.0) - time.monotonic())

    def soonest(self, members: Sequence[Resource]) -> float:
        """Seconds until the first member of the pool is usable again."""
        return min((self.cooling_for(m.id) for m in members), default=0.0)

    def _cycle(self, pool: str, members: Sequence[Resource]) -> list[Resource]:
        signature = tuple((m.id, m.weight) for m in members)
        cached = self._cycles.get(pool)
        if cached is None or cached[0] != signature:
            cached = (signature, _weighted_cycle(members))
            self._cycles[pool] = cached
        return cached[1]

    def order(self, pool: str, members: Sequence[Resource]) -> list[Resource]:
        """Healthy members: the best priority in round-robin order first, then the others."""
        now = time.monotonic()
        healthy = [m for m in members if m.active and self._cooling.get(m.id, 0.0) <= now]
        if not healthy:
            return []
        by_priority: dict[int, list[Resource]] = {}
        for member in healthy:
            by_priority.setdefault(member.priority, []).append(member)
        ordered: list[Resource] = []
        for priority in sorted(by_priority):
            group = sorted(by_priority[priority], key=lambda m: m.id)
            key = f"{pool}#{priority}"
            cycle = self._cycle(key, group)
            position = self._positions.get(key, 0)
            self._positions[key] = position + 1
            first = cycle[position % len(cycle)]
            ordered.append(first)
            ordered.extend(m for m in group if m is not first)
        return ordered
