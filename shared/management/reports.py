"""Reports of what an event used, for its organiser (and the operator): usage totals, MCP
tool calls, and the attendee list with its totals. Each reads fresh: what this instance holds
is written first, and calls of lost workers are recorded first (as the rollup timer does)."""

from __future__ import annotations

from typing import Any

from shared.access.callers import Caller
from shared.errors import StorageUnavailable, invalid
from shared.governance import rollups
from shared.governance.toolcalls import tool_calls as grouped
from shared.management.maintenance import record_lost_calls
from shared.management.manage import event, list_attendees
from shared.runtime import Runtime


async def usage_report(
    runtime: Runtime, caller: Caller, event_id: str, group_by: str
) -> dict[str, Any]:
    """Totals of an event grouped by attendee, deployment, day or hour (fresh: rolls up
    first), with refusals by reason by attendee and by day."""
    if group_by not in rollups.GROUPS:
        raise invalid("group_by", f"must be one of {', '.join(rollups.GROUPS)}")
    found_event = await event(runtime, caller, event_id)
    # Calls of lost workers past their expiry, as the rollup timer records them.
    await record_lost_calls(runtime)
    await runtime.usage.flush_quietly()
    try:
        await runtime.caps.sync()  # this instance's refusals; others write theirs each second
    except StorageUnavailable:
        pass  # the report reads storage too: it answers 503 if storage stays away
    users = {a.id: a.user for a in await runtime.attendees.list(found_event.id)}
    return await rollups.report(runtime.tables, found_event.id, group_by, users)


async def tool_calls(runtime: Runtime, caller: Caller, event_id: str) -> list[dict[str, Any]]:
    """The event's MCP tool calls by attendee, server and tool."""
    found_event = await event(runtime, caller, event_id)
    await runtime.usage.flush_quietly()
    users = {a.id: a.user for a in await runtime.attendees.list(found_event.id)}
    return await grouped(runtime.tables, found_event.id, users)


async def attendees_with_totals(
    runtime: Runtime, caller: Caller, event_id: str
) -> list[dict[str, Any]]:
    """The attendee list, each with all-time request and token totals."""
    found = await list_attendees(runtime, caller, event_id)
    await runtime.usage.flush_quietly()
    totals = await rollups.attendee_totals(runtime.tables, event_id)
    empty = rollups.Totals().as_dict()
    return [{**a.to_json(), **totals.get(a.id, empty)} for a in found]
