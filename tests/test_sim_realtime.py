"""The simulator's realtime calls: a real WebRTC peer that hears the caller's audio, and the
call's sideband WebSocket with Azure's events (session.created, response.done with usage)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import httpx

from tests.harness import SIM_KEY, Simulator
from tests.realtime_peer import Caller, eventually, form, sim_call


async def start_call(sim: Simulator, caller: Caller, session: dict[str, Any]) -> str:
    sdp = await caller.offer()
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{sim.url}/openai/v1/realtime/calls",
            files=form(sdp, session),
            headers={"api-key": SIM_KEY},
        )
    assert answer.status_code == 201, answer.text
    await caller.answer(answer.text)
    return answer.headers["location"].rpartition("/")[2]


async def next_of(socket: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next event of `kind` (others skipped), within 10 s."""
    async with asyncio.timeout(10):
        while True:
            message = await socket.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            event = json.loads(message.data)
            if event["type"] == kind:
                return event


async def test_the_sideband_sees_the_session_steers_it_and_gets_usage(sim: Simulator) -> None:
    sim.configure(realtime_turn_seconds=1000)  # responses only when asked
    caller = Caller()
    try:
        call_id = await start_call(
            sim, caller, {"type": "realtime", "model": "rt", "max_output_tokens": 30}
        )
        url = f"{sim.url.replace('http', 'ws')}/openai/v1/realtime?call_id={call_id}"
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url, headers={"api-key": SIM_KEY}) as socket,
        ):
            created = await next_of(socket, "session.created")
            assert created["session"]["max_output_tokens"] == 30
            await socket.send_str(
                json.dumps({"type": "session.update", "session": {"instructions": "x" * 40}})
            )
            updated = await next_of(socket, "session.updated")
            assert updated["session"]["instructions"] == "x" * 40
            await eventually(lambda: _heard(sim, call_id))
            await socket.send_str(json.dumps({"type": "response.create"}))
            done = (await next_of(socket, "response.done"))["response"]
            usage = done["usage"]
            assert done["status"] == "incomplete"  # 60 tokens wanted, 30 allowed
            assert done["status_details"]["reason"] == "max_output_tokens"
            assert usage["output_tokens"] == 30
            details = usage["input_token_details"]
            assert details["audio_tokens"] > 0 and details["text_tokens"] == 10
            assert usage["input_tokens"] == details["audio_tokens"] + details["text_tokens"]
            assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
            await socket.send_str(json.dumps({"type": "response.create"}))
            second = (await next_of(socket, "response.done"))["response"]["usage"]
            assert second["input_token_details"]["cached_tokens"] > 0  # the first turn
            await socket.send_str("not json")
            assert (await next_of(socket, "error"))["error"]["type"] == "invalid_request_error"
        seen = await sim_call(sim.url, call_id)
        assert seen is not None and [r["usage"] for r in seen["responses"]] == [usage, second]
        assert "response.done" in caller.types()  # the caller's data channel got them too
        async with httpx.AsyncClient() as client:
            hung = await client.post(
                f"{sim.url}/openai/v1/realtime/calls/{call_id}/hangup",
                headers={"api-key": SIM_KEY},
            )
            assert hung.status_code == 200
        ended = await sim_call(sim.url, call_id)
        assert ended is not None and ended["ended"] == "hangup"
    finally:
        sim.configure(realtime_turn_seconds=None)
        await caller.close()


async def _heard(sim: Simulator, call_id: str) -> bool:
    call = await sim_call(sim.url, call_id)
    return bool(call and call["audio_seconds"] > 0.3)


async def test_turns_of_audio_make_responses_and_a_dropped_sideband_can_come_back(
    sim: Simulator,
) -> None:
    sim.configure(realtime_turn_seconds=0.5)
    caller = Caller()
    try:
        call_id = await start_call(sim, caller, {"model": "rt"})
        url = f"{sim.url.replace('http', 'ws')}/openai/v1/realtime?call_id={call_id}"
        async with aiohttp.ClientSession() as http:
            socket = await http.ws_connect(url, headers={"api-key": SIM_KEY})
            await next_of(socket, "response.done")  # half a second of audio heard
            async with httpx.AsyncClient() as client:
                dropped = await client.post(f"{sim.url}/_sim/realtime/{call_id}/drop")
                assert dropped.status_code == 200
            async with asyncio.timeout(10):
                while (await socket.receive()).type == aiohttp.WSMsgType.TEXT:
                    pass
            assert socket.closed
            again = await http.ws_connect(url, headers={"api-key": SIM_KEY})
            await next_of(again, "session.created")
            await next_of(again, "response.done")
            await again.close()
            for headers, call in (({"api-key": "wrong"}, call_id), ({"api-key": SIM_KEY}, "x")):
                refused = await http.get(
                    f"{sim.url}/openai/v1/realtime?call_id={call}", headers=headers
                )
                assert refused.status in (401, 404)
    finally:
        sim.configure(realtime_turn_seconds=None)
        await caller.close()
