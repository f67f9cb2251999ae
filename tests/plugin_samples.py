"""Plugins for tests/test_plugins.py, loaded into the worker by `module:attribute`: they fail,
stall or change a body when a marker in the request asks them to."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from shared.plugins import Plugin, RequestContext


class OnDemand(Plugin):
    """A request hook doing what the body's markers say, and a usage hook that always raises."""

    async def on_request(self, context: RequestContext, body: dict[str, Any]) -> Any:
        text = orjson.dumps(body)
        if b"[raise]" in text:
            raise RuntimeError("asked to fail")
        if b"[stall]" in text:
            await asyncio.sleep(60)
        if b"[lift-cap]" in text:
            return {**body, "max_tokens": 1_000_000}
        if b"[pad]" in text:
            padding = {"role": "user", "content": "pad " * 2000}
            return {**body, "messages": [*body["messages"], padding]}
        if b"[context]" in text:
            seen = {name: getattr(context, name) for name in context.__slots__}
            note = {"role": "system", "content": orjson.dumps(seen).decode()}
            return {**body, "messages": [*body["messages"], note]}
        return None

    def on_usage(self, records: list[dict[str, Any]]) -> None:
        raise RuntimeError(f"refuses every batch ({len(records)} records)")


class Lenient(Plugin):
    """A fail_open request hook: on '[lenient]' it spoils the body in place, then raises."""

    fail_open = True

    def on_request(self, context: RequestContext, body: dict[str, Any]) -> Any:
        if b"[lenient]" in orjson.dumps(body):
            body["messages"] = "spoiled"
            raise ValueError("lenient plugin failed")
        return None


class Stalling(Plugin):
    """A usage hook that never finishes within its budget."""

    async def on_usage(self, records: list[dict[str, Any]]) -> None:
        await asyncio.sleep(60)


class Holding(Plugin):
    """A plain request hook that, on '[hold]', works until a file tells it to stop (at most
    20 s): it writes `started` in its folder, waits for `release`, then writes `done`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.folder = Path(config["dir"])

    def on_request(self, context: RequestContext, body: dict[str, Any]) -> Any:
        if b"[hold]" not in orjson.dumps(body):
            return None
        (self.folder / "started").write_text(context.request_id)
        deadline = time.monotonic() + 20
        while not (self.folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        (self.folder / "done").write_text(context.request_id)
        return None
