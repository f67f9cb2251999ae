"""A realtime call is metered through its sideband for its whole life: every response's usage
recorded exactly once, the attendee's token cap and the event's session length enforced by
ending the call (with a last message to the caller), a dropped sideband joined again, and a
metering function that died resumed by the queue's redelivery without counting twice."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

from local.azurite import Azurite, free_port
from tests.harness import AppHost, EventSetup, Simulator, Storage, unique_prefix
from tests.realtime_peer import Caller, eventually, form, sim_call

pytestmark = pytest.mark.e2e

REALTIME = "gpt-realtime"


# Per 1M tokens, the resource's own: realtime models are not in the shipped price table.
PRICES = "input=5,cached_input=2.5,output=20,audio_input=40,audio_output=80"


def realtime_event(host: AppHost, sim: Simulator, prices: str = "", **fields: Any) -> EventSetup:
    setup = EventSetup(host, sim, **fields)
    setup.add_resource(sim.url, REALTIME, "openai-realtime", prices=prices)
    return setup


def priced(record: dict[str, Any]) -> int:
    """A response's cost at PRICES, in billionths (a figure per 1M tokens is 1000 a token)."""
    prompt, cached = record["prompt_tokens"], record["cached_tokens"]
    audio = min(record["audio_tokens"], prompt - cached)
    out_audio = record["audio_output_tokens"]
    text_in, text_out = prompt - cached - audio, record["completion_tokens"] - out_audio
    return (
        5_000 * text_in + 2_500 * cached + 40_000 * audio + 20_000 * text_out + 80_000 * out_audio
    )


async def call(host: AppHost, key: str, caller: Caller) -> str:
    sdp = await caller.offer()
    async with httpx.AsyncClient(base_url=host.base, timeout=60) as client:
        answer = await client.post(
            "/openai/v1/realtime/calls",
            files=form(sdp, {"type": "realtime", "model": REALTIME}),
            headers={"api-key": key},
        )
    assert answer.status_code == 201, answer.text
    await caller.answer(answer.text)
    return answer.headers["location"].rpartition("/")[2]


async def responses_at_least(sim: Simulator, call_id: str, count: int) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]]:
        seen = await sim_call(sim.url, call_id)
        return seen["responses"] if seen and len(seen["responses"]) >= count else []

    return await eventually(enough, timeout=30)


async def hang_up(sim: Simulator, call_id: str) -> None:
    from tests.harness import SIM_KEY

    async with httpx.AsyncClient() as client:
        hung = await client.post(
            f"{sim.url}/openai/v1/realtime/calls/{call_id}/hangup", headers={"api-key": SIM_KEY}
        )
    assert hung.status_code == 200


async def last_notice(caller: Caller) -> str:
    """The last conversation item the call's data channel brought the caller (the proxy's
    notice when it ends a call), once one came: it arrives on its own time."""

    async def notices() -> list[dict[str, Any]]:
        return [e for e in caller.events if e.get("type") == "conversation.item.created"]

    return str((await eventually(notices, timeout=10))[-1])


def realtime_records(storage: Storage, event_id: str, count: int) -> list[dict[str, Any]]:
    rows = storage.usage(event_id, expect=count + 1, timeout=15)  # and the setup's
    return [r for r in rows if r["outcome"] == "realtime_response"]


def totals(responses: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    usage = [r["usage"] for r in responses]
    return (
        sum(u["input_tokens"] for u in usage),
        sum(u["output_tokens"] for u in usage),
        sum(u["total_tokens"] for u in usage),
        sum(u["input_token_details"]["cached_tokens"] for u in usage),
    )


def recorded(records: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    return (
        sum(r["prompt_tokens"] for r in records),
        sum(r["completion_tokens"] for r in records),
        sum(r["total_tokens"] for r in records),
        sum(r["cached_tokens"] for r in records),
    )


async def test_every_response_of_a_call_is_recorded_exactly_once(
    app_host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = realtime_event(app_host, sim, prices=PRICES)
    sim.configure(realtime_turn_seconds=0.4)
    caller = Caller()
    try:
        call_id = await call(app_host, setup.key, caller)
        await responses_at_least(sim, call_id, 3)
        await hang_up(sim, call_id)
    finally:
        sim.configure(realtime_turn_seconds=None)
        await caller.close()
    responses = (await sim_call(sim.url, call_id))["responses"]
    records = realtime_records(storage, setup.id, len(responses))
    assert len(records) == len(responses)
    assert recorded(records) == totals(responses)
    assert all(
        r["audio_tokens"] > 0
        and r["audio_output_tokens"] > 0
        and r["attendee_id"] == setup.attendee["id"]
        for r in records
    )
    # Each response priced at the resource's own figures, output audio apart from text.
    assert all(not r["unpriced"] and int(r["cost_nano"]) == priced(r) > 0 for r in records)
    row = storage.rows("realtimecalls", f"RowKey eq '{call_id}'")[0]
    assert row["responses"] == len(responses) and row["ended"] == "call_over"
    # The organiser's report: one request (the call), every token of its responses.
    report = app_host.manage.get(f"/events/{setup.id}/usage", params={"group_by": "deployment"})
    assert report.status_code == 200, report.text
    [line] = [r for r in report.json()["rows"] if r["deployment"] == REALTIME]
    assert (line["requests"], line["units"]) == (1, 1)
    assert line["total_tokens"] == totals(responses)[2]


async def test_two_deliveries_of_one_call_count_each_response_once(
    app_host: AppHost, sim: Simulator, storage: Storage, azurite: Azurite, prefix: str
) -> None:
    setup = realtime_event(app_host, sim)
    sim.configure(realtime_turn_seconds=1000)
    caller = Caller()
    try:
        call_id = await call(app_host, setup.key, caller)
        # The same ticket again, as a lost lease would deliver it while the first still runs.
        [resource] = [r for r in setup.resources.values() if r["deployment"] == REALTIME]
        ticket = {
            "call_id": call_id, "event_id": setup.id, "attendee_id": setup.attendee["id"],
            "resource_id": resource["id"], "deployment": REALTIME, "request_id": "again",
            "started": time.time(), "max_seconds": 600,
        }  # fmt: skip
        queue = QueueClient.from_connection_string(
            azurite.connection_string,
            f"{prefix[:50]}-realtime",
            message_encode_policy=TextBase64EncodePolicy(),
        )
        with queue:
            queue.send_message(json.dumps(ticket))

        async def sidebands() -> bool:
            seen = await sim_call(sim.url, call_id)
            return bool(seen and seen["sidebands"] == 2)

        await eventually(sidebands, timeout=30)
        sim.configure(realtime_turn_seconds=0.4)
        await responses_at_least(sim, call_id, 4)
        await hang_up(sim, call_id)
    finally:
        sim.configure(realtime_turn_seconds=None)
        await caller.close()
    responses = (await sim_call(sim.url, call_id))["responses"]
    records = realtime_records(storage, setup.id, len(responses))
    assert len(records) == len(responses)  # seen twice, counted once
    assert recorded(records) == totals(responses)


async def ended_by_the_proxy(
    host: AppHost,
    sim: Simulator,
    storage: Storage,
    setup: EventSetup,
    notice: str,
    *,
    turn: float = 0.4,
    meanwhile: Callable[[], None] | None = None,
    timeout: float = 30,
) -> tuple[str, list[dict[str, Any]]]:
    """A call that runs (a response every `turn` seconds of audio; none until `meanwhile`, if
    given, has run once the call is up) until the proxy ends it: the caller's last message says
    `notice`, the call was hung up, and every response has its exact record. Returns the call's
    id and those records, in order."""
    sim.configure(realtime_turn_seconds=turn if meanwhile is None else 1000)
    caller = Caller()
    try:
        call_id = await call(host, setup.key, caller)
        if meanwhile is not None:
            meanwhile()
            sim.configure(realtime_turn_seconds=turn)

        async def ended() -> bool:
            seen = await sim_call(sim.url, call_id)
            return bool(seen and seen["ended"])

        await eventually(ended, timeout=timeout)

        assert notice in await last_notice(caller)
    finally:
        sim.configure(realtime_turn_seconds=None)
        await caller.close()
    seen = await sim_call(sim.url, call_id)
    assert seen["ended"] == "hangup"
    records = realtime_records(storage, setup.id, len(seen["responses"]))
    assert recorded(records) == totals(seen["responses"])
    return call_id, records


async def test_a_crossed_token_cap_ends_the_call_with_a_last_message(
    app_host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = realtime_event(app_host, sim, daily_token_cap=250)
    _, records = await ended_by_the_proxy(app_host, sim, storage, setup, "used today's 250 tokens")
    used = sum(r["total_tokens"] for r in records)
    assert used >= 250  # crossed: at most one response beyond (its max_output_tokens)
    assert used - records[-1]["total_tokens"] < 250
    refused = await _offer(app_host, setup.key)
    assert refused.status_code == 429  # and no new call today


async def test_a_spent_budget_ends_the_call_with_a_last_message(
    app_host: AppHost, sim: Simulator, storage: Storage
) -> None:
    budget = 50_000_000  # billionths: 0.05 USD, a few responses at PRICES
    setup = realtime_event(app_host, sim, prices=PRICES, attendee_budget="0.05")
    notice = "spent your budget of 0.05 USD"
    call_id, records = await ended_by_the_proxy(app_host, sim, storage, setup, notice)
    costs = [int(r["cost_nano"]) for r in records]
    assert len(costs) >= 2 and all(c == priced(r) > 0 for c, r in zip(costs, records, strict=True))
    assert sum(costs) >= budget  # spent: passed by at most the response that crossed it
    assert sum(costs) - costs[-1] < budget
    [row] = storage.rows("realtimecalls", f"RowKey eq '{call_id}'")
    assert row["ended"] == "attendee_budget_exhausted"
    refused = await _offer(app_host, setup.key)
    assert refused.status_code == 429  # and no new call
    assert refused.json()["error"]["code"] == "attendee_budget_exhausted"


async def _offer(host: AppHost, key: str) -> httpx.Response:
    caller = Caller()
    try:
        sdp = await caller.offer()
        async with httpx.AsyncClient(base_url=host.base, timeout=60) as client:
            return await client.post(
                "/openai/v1/realtime/calls",
                files=form(sdp, {"model": REALTIME}),
                headers={"api-key": key},
            )
    finally:
        await caller.close()


async def test_a_revoked_attendee_s_call_ends_at_its_next_response(
    app_host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = realtime_event(app_host, sim)

    def revoke() -> None:
        revoked = app_host.manage.delete(f"/events/{setup.id}/attendees/{setup.attendee['id']}")
        assert revoked.status_code == 200

    notice = "revoked by the organiser"
    call_id, _ = await ended_by_the_proxy(app_host, sim, storage, setup, notice, meanwhile=revoke)
    [row] = storage.rows("realtimecalls", f"RowKey eq '{call_id}'")
    assert row["ended"] == "key_revoked"


@pytest.mark.slow
async def test_the_session_length_limit_ends_the_call(
    app_host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = realtime_event(app_host, sim, realtime_max_session_seconds=10)
    # No response at all (one per 1000 s of audio): only the session's length ends it.
    call_id, _ = await ended_by_the_proxy(
        app_host, sim, storage, setup, "10 seconds", turn=1000, timeout=25
    )
    row = storage.rows("realtimecalls", f"RowKey eq '{call_id}'")[0]
    assert row["ended"] == "session_length"


async def test_a_dropped_sideband_is_joined_again_and_a_dead_worker_resumes(
    app_host: AppHost, sim: Simulator, storage: Storage
) -> None:
    setup = realtime_event(app_host, sim)
    sim.configure(realtime_turn_seconds=1000)  # responses only while the metering is there
    caller = Caller()
    try:
        call_id = await call(app_host, setup.key, caller)

        async def sidebands(count: int) -> bool:
            seen = await sim_call(sim.url, call_id)
            return bool(seen and seen["sidebands"] == count)

        async with httpx.AsyncClient() as client:
            dropped = await client.post(f"{sim.url}/_sim/realtime/{call_id}/drop")
            assert dropped.status_code == 200
        await eventually(lambda: sidebands(1), timeout=20)  # joined again
        sim.configure(realtime_turn_seconds=0.4)
        first = len(await responses_at_least(sim, call_id, 2))
        sim.configure(realtime_turn_seconds=1000)
        restarts = app_host.status()["worker"]["restarts"]
        os.kill(app_host.status()["worker"]["pid"], signal.SIGKILL)
        await eventually(lambda: sidebands(0), timeout=20)
        await eventually(lambda: _restarted(app_host, restarts), timeout=60)
        await eventually(lambda: sidebands(1), timeout=60)  # the ticket came again
        sim.configure(realtime_turn_seconds=0.4)
        await responses_at_least(sim, call_id, first + 2)
        await hang_up(sim, call_id)
    finally:
        sim.configure(realtime_turn_seconds=None)
        await caller.close()
    responses = (await sim_call(sim.url, call_id))["responses"]
    records = realtime_records(storage, setup.id, len(responses))
    assert len(records) == len(responses)  # each once, none twice
    assert recorded(records) == totals(responses)


async def _restarted(host: AppHost, before: int) -> bool:
    try:
        status = host.status()
    except httpx.HTTPError:
        return False
    return status["worker"]["restarts"] > before and status["state"] == "Running"


@pytest.mark.slow
async def test_a_call_the_metering_cannot_join_is_hung_up_and_refused(
    app_hosts: Callable[..., AppHost], sim: Simulator, azurite: Azurite
) -> None:
    # The queue trigger's storage is away (the app's own tables and queue are not): the ticket
    # is written, nothing takes it, so the metering never joins the call. Tables and queue of
    # its own, so that no other host of the run takes the ticket.
    prefix = unique_prefix("unmetered")
    unmetered = app_hosts(
        "unmetered",
        prefix=prefix,
        AzureWebJobsStorage=Azurite(free_port()).connection_string,
        AIPROXY_REALTIME_ATTACH_SECONDS="3",
    )
    storage = Storage(azurite.connection_string, prefix)
    setup = realtime_event(unmetered, sim)
    before = {c["id"] for c in await _calls(sim)}
    refused = await _offer(unmetered, setup.key)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "storage_unavailable"
    assert refused.headers["retry-after"] == "5"
    [call] = [c for c in await _calls(sim) if c["id"] not in before]
    assert call["ended"] == "hangup"  # set up upstream, then ended before any media
    records = storage.usage(setup.id, expect=1, timeout=3)  # none comes
    assert [r for r in records if r["units"]] == []  # not counted as a session


async def _calls(sim: Simulator) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{sim.url}/_sim/realtime")).json()["calls"]


def test_usage_is_read_from_what_the_sideband_sends_whatever_it_is() -> None:
    from shared.pipeline.sideband import Ticket, usage_of

    usage = {
        "input_tokens": 120,
        "output_tokens": 30,
        "total_tokens": 150,
        "input_token_details": {"cached_tokens": 64, "audio_tokens": 100, "text_tokens": 20},
        "output_token_details": {"audio_tokens": 24, "text_tokens": 6},
    }
    assert usage_of({"usage": usage}) == (120, 30, 150, 64, 100, 24)
    for hostile in (None, "lots", [], {"input_tokens": True, "output_tokens": -5},
                    {"input_tokens": "9", "input_token_details": "x"}):  # fmt: skip
        assert usage_of({"usage": hostile}) == (0, 0, 0, 0, 0, 0)
    assert usage_of({"usage": {"input_tokens": 7, "output_tokens": 3}}) == (7, 3, 10, 0, 0, 0)
    assert Ticket.parse(b"not json") is None
    assert Ticket.parse(b'{"call_id": "rtc_1"}') is None
