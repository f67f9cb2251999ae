"""What the timers do: record the calls of lost workers, roll usage up into daily totals,
and prune raw records."""

from __future__ import annotations

import logging
from datetime import datetime

from shared.governance import rollups
from shared.platform import clock
from shared.platform.tables import StorageUnavailable
from shared.runtime import Runtime

log = logging.getLogger(__name__)


async def record_lost_calls(runtime: Runtime) -> None:
    """Calls whose worker was lost, recorded at their worst case (shared/governance/journal.py):
    their tokens go to the daily counts, and their cost to the budgets' `spent` (what they held
    stays granted: the lost instance never handed it back)."""
    try:
        lost = await runtime.journal.recover(runtime.usage, runtime.caps)
    except StorageUnavailable as exc:
        log.warning("journal: calls in flight not checked: %s", str(exc)[:200])
        return
    for record in lost:
        cost = int(record.get("cost_nano") or 0)
        event = await runtime.directory.event(record["event_id"]) if cost else None
        if event is not None:
            when = datetime.fromisoformat(record["time"])
            runtime.budgets.count_lost(event, record["attendee_id"], when, cost)
    if lost:
        log.warning("journal: %d calls of lost workers recorded at their worst case", len(lost))


async def roll_up_usage(runtime: Runtime) -> rollups.RollupResult:
    """Calls whose worker was lost are recorded first (at their worst case), so the totals
    and the daily counts take them in."""
    await record_lost_calls(runtime)
    await runtime.usage.flush_quietly()
    result = await rollups.roll_up(runtime.tables)
    log.info("rollup: %d days, %d records, %d total rows", result.days, result.records, result.rows)
    return result


async def prune_usage(runtime: Runtime) -> int:
    deleted = await rollups.prune(
        runtime.tables, runtime.settings.usage_retention_days, clock.now()
    )
    log.info("retention: %d raw usage records deleted", deleted)
    return deleted
