"""MCP tool calls of an event, by attendee, server and tool, from the usage records.

Each `tools/call` through /api/mcp/{name} is one usage record of model class `mcp` with its
`tool` (shared/pipeline/mcp.py). The daily rollups count them as requests of their server; this
report reads the records themselves (those the retention keeps) for what the rollups do not
keep: which tool, how often it failed and how long it took.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from shared.governance.usage import USAGE_TABLE
from shared.platform.tables import Tables

# The records of one event (every day's partition) that are tool calls.
_FILTER = "PartitionKey ge @low and PartitionKey lt @high and model_class eq 'mcp'"
_FAILED = frozenset({"tool_error", "rpc_error"})  # answered, but as a failure


class ToolCalls(BaseModel):
    """One attendee's calls of one tool of one MCP server."""

    attendee_id: str = Field(description="the attendee")
    user: str = Field(description="the attendee's user name")
    deployment: str = Field(description="the MCP server's name in the event's catalog")
    tool: str = Field(description="the tool")
    calls: int = Field(ge=0, description="tool calls")
    ok: int = Field(ge=0, description="calls the tool answered")
    failed: int = Field(ge=0, description="calls the tool or server answered with an error")
    unfinished: int = Field(ge=0, description="calls cut, left by the client or not answered")
    average_ms: float = Field(ge=0, description="mean duration, milliseconds")
    last: str = Field(description="the last call, UTC", json_schema_extra={"format": "date-time"})


async def tool_calls(tables: Tables, event_id: str, users: dict[str, str]) -> list[dict[str, Any]]:
    """The event's tool calls grouped by attendee, server and tool, busiest first."""
    rows = await tables.query(
        USAGE_TABLE, _FILTER, {"low": f"{event_id}_", "high": f"{event_id}_~"}
    )
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row.get("attendee_id", ""), row.get("deployment", ""), row.get("tool", ""))
        group = groups.setdefault(key, {
            "attendee_id": key[0], "user": users.get(key[0], ""), "deployment": key[1],
            "tool": key[2], "calls": 0, "ok": 0, "failed": 0, "unfinished": 0,
            "average_ms": 0.0, "last": "",
        })  # fmt: skip
        outcome = row.get("outcome", "")
        group["calls"] += 1
        if outcome == "ok":
            group["ok"] += 1
        elif outcome in _FAILED:
            group["failed"] += 1
        else:
            group["unfinished"] += 1
        group["average_ms"] += float(row.get("latency_ms", 0.0))
        group["last"] = max(group["last"], str(row.get("time", "")))
    for group in groups.values():
        group["average_ms"] = round(group["average_ms"] / group["calls"], 1)
    return sorted(groups.values(), key=lambda g: (-g["calls"], g["user"], g["tool"]))
