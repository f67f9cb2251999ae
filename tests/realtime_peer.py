"""A WebRTC caller for the realtime tests: an aiortc peer that offers audio and the
`oai-events` data channel, as a browser does, and hears the events the session sends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack


class Caller:
    """One peer: `offer()`, then `answer(sdp)`; `events` holds what the data channel heard."""

    def __init__(self) -> None:
        self.peer = RTCPeerConnection()
        self.events: list[dict[str, Any]] = []
        self.channel = self.peer.createDataChannel("oai-events")

        @self.channel.on("message")
        def _message(message: Any) -> None:
            self.events.append(json.loads(message))

        self.peer.addTrack(AudioStreamTrack())  # silence, 20 ms a frame

    async def offer(self) -> str:
        await self.peer.setLocalDescription(await self.peer.createOffer())
        return self.peer.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        await self.peer.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def connect(self, sdp: str) -> None:
        """`answer(sdp)`, then wait until the session has begun on the data channel: the call
        is up, so closing this peer ends it."""
        await self.answer(sdp)

        async def begun() -> bool:
            return "session.created" in self.types()

        await eventually(begun)

    def types(self) -> list[str]:
        return [e.get("type", "") for e in self.events]

    async def close(self) -> None:
        await self.peer.close()


def form(sdp: str, session: dict[str, Any] | None) -> dict[str, Any]:
    """The multipart fields of a call's setup, as the OpenAI SDKs send them."""
    files: dict[str, Any] = {"sdp": (None, sdp, "application/sdp")}
    if session is not None:
        files["session"] = (None, json.dumps(session), "application/json")
    return files


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.05
) -> Any:
    """The first truthy answer of `check`, without blocking the loop the peers run on."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"still {answer!r} after {timeout} s")
        await asyncio.sleep(interval)


async def sim_call(sim_url: str, call_id: str) -> dict[str, Any] | None:
    async with httpx.AsyncClient() as client:
        calls = (await client.get(f"{sim_url}/_sim/realtime")).json()["calls"]
    return next((c for c in calls if c["id"] == call_id), None)
