"""What the timers do: roll usage up into daily totals, and prune raw records."""

from __future__ import annotations

import logging

from shared.governance import rollups
from shared.platform import clock
from shared.runtime import Runtime

log = logging.getLogger(__name__)


async def roll_up_usage(runtime: Runtime) -> rollups.RollupResult:
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
