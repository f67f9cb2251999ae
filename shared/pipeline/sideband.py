"""Metering a realtime call through its sideband, for the call's whole life.

A call's setup (realtime.py) puts a ticket on the realtime queue and answers the caller only
once the queue-triggered function (function_app.py) has attached to the call's sideband: no
media flows before the metering sees it. The function holds the sideband while the call lasts:
every `response.done`'s usage becomes a usage record and counts against the attendee's token
caps and, priced, against the event's budgets; once a cap is crossed, a budget is spent, or the
event's `realtime_max_session_seconds` has passed, it
tells the caller why (a system message on the call) and hangs up. A sideband that drops is
joined again; a function whose instance died gets the ticket again (the queue delivers it once
its lease ends) and resumes. Each response is claimed once in `realtimecalls` (a row per call
and response id) before it is recorded, so no usage is counted twice, even by two deliveries
of one ticket holding the call at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from shared.directory.catalog import Resource
from shared.directory.events import Event
from shared.errors import ProxyError
from shared.governance import prices
from shared.governance.usage import UsageRecord
from shared.pipeline.forwarding import Forwarder
from shared.platform import clock
from shared.platform.settings import binding_setting
from shared.platform.tables import Conflict
from shared.runtime import Runtime
from shared.upstreams.client import Sideband, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger(__name__)

QUEUE_SETTING = "AIPROXY_REALTIME_QUEUE"
PROGRESS_TABLE = "realtimecalls"
KEEP_SETTLED = 64  # response ids remembered per call (they come in order)
RECONNECTS = 6  # tries in a row to join the sideband again (0.5 s doubling: about 30 s)
GONE = (400, 404, 410)  # the sideband's answer for a call that is over


@dataclass
class Ticket:
    """A call to meter: who made it, where it runs, and its bounds."""

    call_id: str
    event_id: str
    attendee_id: str
    resource_id: str
    deployment: str
    request_id: str
    started: float  # Unix seconds
    max_seconds: int

    @classmethod
    def parse(cls, body: bytes | str) -> Ticket | None:
        try:
            data = orjson.loads(body)
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None


@dataclass
class Progress:
    """A call's row in `realtimecalls` (partition: the event; row: the call id)."""

    settled: list[str] = field(default_factory=list)
    responses: int = 0
    tokens: int = 0
    attached: str = ""  # when the metering first joined the sideband
    ended: str = ""  # why the call ended, once it has

    def entity(self, ticket: Ticket) -> dict[str, Any]:
        data = asdict(self)
        data["settled"] = ",".join(self.settled[-KEEP_SETTLED:])
        return {"PartitionKey": ticket.event_id, "RowKey": ticket.call_id, **data}

    @classmethod
    def of(cls, entity: dict[str, Any] | None) -> Progress:
        if entity is None:
            return cls()
        return cls(
            settled=[i for i in str(entity.get("settled") or "").split(",") if i],
            responses=int(entity.get("responses") or 0),
            tokens=int(entity.get("tokens") or 0),
            attached=str(entity.get("attached") or ""),
            ended=str(entity.get("ended") or ""),
        )


async def progress(runtime: Runtime, event_id: str, call_id: str) -> Progress:
    return Progress.of(await runtime.tables.get(PROGRESS_TABLE, event_id, call_id))


async def enqueue(runtime: Runtime, ticket: Ticket) -> None:
    await runtime.queues.send(binding_setting(QUEUE_SETTING), asdict(ticket))


async def attached(runtime: Runtime, ticket: Ticket, within: float) -> bool:
    """Whether the metering joined the call's sideband within `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    wait = 0.05
    while True:
        row = await progress(runtime, ticket.event_id, ticket.call_id)
        if row.attached or row.ended:
            return bool(row.attached)
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(wait)
        wait = min(wait * 2, 0.5)


def usage_of(response: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """(input, output, total, cached, audio input, audio output) tokens of a realtime
    response."""
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return 0, 0, 0, 0, 0, 0

    def number(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    given = usage.get("input_token_details")
    taken = usage.get("output_token_details")
    given = given if isinstance(given, dict) else {}
    taken = taken if isinstance(taken, dict) else {}
    prompt, completion = number(usage.get("input_tokens")), number(usage.get("output_tokens"))
    total = number(usage.get("total_tokens")) or prompt + completion
    cached = number(given.get("cached_tokens"))
    return (
        prompt, completion, total, cached,
        number(given.get("audio_tokens")), number(taken.get("audio_tokens")),
    )  # fmt: skip


@dataclass(eq=False)
class CallMeter:
    """One call's metering: its sideband held, its responses recorded, its bounds kept."""

    runtime: Runtime
    ticket: Ticket
    event: Event
    resource: Resource
    row: Progress
    headers: dict[str, str] = field(default_factory=dict)  # the resource's credential

    @property
    def deadline(self) -> float:
        """When the session's length runs out (clock.time())."""
        return self.ticket.started + self.ticket.max_seconds

    @property
    def base(self) -> str:
        return f"{self.resource.endpoint.rstrip('/')}/openai/v1/realtime"

    async def run(self) -> None:
        forwarder = Forwarder(self.runtime)
        forwarder.callable([self.resource])  # refuses an endpoint no longer allowed
        self.headers = await forwarder.headers(self.resource)
        self.headers.pop("content-type", None)
        failures = 0
        while True:
            if clock.time() >= self.deadline:
                await self.end(None, "session_length")
                return
            url = self.base.replace("http", "ws", 1) + f"?call_id={self.ticket.call_id}"
            try:
                socket = await self.runtime.upstream.websocket(url, self.headers)
            except UpstreamUnreachable as error:
                if error.status in GONE:
                    await self.save(ended=self.row.ended or "call_over")
                    return
                failures += 1
                if failures > RECONNECTS:
                    raise  # the queue tries again later (its dequeue count tells how often)
                log.warning("realtime %s: sideband: %s", self.ticket.call_id, error)
                await asyncio.sleep(min(8.0, 0.25 * 2**failures))
                continue
            failures = 0
            if not self.row.attached:
                await self.save(attached=clock.now().isoformat())
            try:
                if await self.follow(socket):
                    return
            finally:
                await socket.close()

    async def follow(self, socket: Sideband) -> bool:
        """The sideband's events until the call ends (True) or the socket drops (False)."""
        while True:
            left = self.deadline - clock.time()
            if left <= 0:
                await self.end(socket, "session_length")
                return True
            text = await socket.receive(timeout=min(left, 30.0))
            if text is None:
                return False
            if not text:
                continue
            try:
                event = orjson.loads(text)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(event, dict) or event.get("type") != "response.done":
                continue
            response = event.get("response")
            if isinstance(response, dict):
                await self.settle(response)
            try:
                # The event as its organiser has it now (switched off, or its window over),
                # and the attendee (revoked).
                self.event = await self.runtime.directory.event(self.event.id) or self.event
                self.event.check_open()
                await self.check_attendee()
                self.runtime.caps.check_tokens(self.event, self.ticket.attendee_id, clock.now())
                await self.runtime.budgets.check(self.event, self.ticket.attendee_id, clock.now())
            except ProxyError as error:
                await self.end(socket, error.code, error.message)
                return True

    async def check_attendee(self) -> None:
        attendee = await self.runtime.attendees.get(self.event.id, self.ticket.attendee_id)
        if attendee is None or attendee.revoked_at:
            raise ProxyError(
                "key_revoked",
                "Your access to this event was revoked by the organiser. Ask them about it.",
            )

    async def settle(self, response: dict[str, Any]) -> None:
        """One response's usage, recorded once (its id keeps a record written again in place)."""
        response_id = str(response.get("id") or "")
        if not response_id or response_id in self.row.settled:
            return
        prompt, completion, total, cached, audio, audio_out = usage_of(response)
        now = clock.now()
        # Priced as the model that answered (the resource's own prices over the table's); a
        # realtime model the table does not price is recorded unpriced, never free.
        model = str(response.get("model") or "") or self.resource.upstream_deployment
        cost = prices.cost_of(
            prices.price_of(model, self.resource.prices), "openai-realtime", prompt=prompt,
            cached=cached, audio=audio, completion=completion, audio_output=audio_out,
        )  # fmt: skip
        ticket, event = self.ticket, self.event
        # Claimed once for all: another delivery of the ticket may hold the call too (a lease
        # lost while this one still ran) and see the same response.
        claim = {"PartitionKey": event.id, "RowKey": f"{ticket.call_id}|{response_id}"}
        try:
            await self.runtime.tables.insert(PROGRESS_TABLE, {**claim, "tokens": total})
        except Conflict:
            self.row.settled.append(response_id)
            return
        self.runtime.usage.append(
            UsageRecord(
                event_id=event.id,
                attendee_id=ticket.attendee_id,
                deployment=ticket.deployment,
                resource_id=ticket.resource_id,
                model_class="openai-realtime",
                status=200,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=total,
                streamed=True,
                estimated=False,
                latency_ms=0.0,
                time=now,
                local_date=event.local_date(now),
                request_id="rt" + hashlib.sha256(response_id.encode()).hexdigest()[:14],
                outcome="realtime_response",
                cached_tokens=cached,
                audio_tokens=audio,
                audio_output_tokens=audio_out,
                model=model,
                cost_nano=cost.nano,
                unpriced=not cost.priced,
                price_source=cost.source,
            )
        )
        self.runtime.caps.charge(event, ticket.attendee_id, now, total)
        self.runtime.budgets.charge(event, ticket.attendee_id, now, cost.nano)
        self.row.settled.append(response_id)
        await self.save(responses=self.row.responses + 1, tokens=self.row.tokens + total)

    async def end(self, socket: Sideband | None, reason: str, why: str = "") -> None:
        """Tell the caller why, then hang up the call."""
        if reason == "session_length":
            why = (
                f"This realtime session reached the event's limit of "
                f"{self.ticket.max_seconds} seconds. Start a new call to go on."
            )
        if socket is not None:
            notice = {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "system",
                    "content": [{"type": "input_text", "text": f"aiproxy: call ended. {why}"}],
                },
            }
            try:
                await socket.send(orjson.dumps(notice).decode())
            except UpstreamUnreachable:
                pass
        url = f"{self.base}/calls/{self.ticket.call_id}/hangup"
        try:
            answer = await self.runtime.upstream.send("POST", url, self.headers, b"")
            answer.close()
        except (UpstreamUnreachable, UpstreamTimeout) as error:
            log.warning("realtime %s: hangup: %s", self.ticket.call_id, error)
        log.info("realtime %s ended by the proxy: %s", self.ticket.call_id, reason)
        await self.save(ended=reason)

    async def save(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self.row, name, value)
        await self.runtime.tables.upsert(PROGRESS_TABLE, self.row.entity(self.ticket), replace=True)


async def meter(runtime: Runtime, body: bytes | str) -> None:
    """The queue function's work: meter the ticket's call until it ends (or resume it)."""
    ticket = Ticket.parse(body)
    if ticket is None:
        log.error("realtime queue: a message that is no ticket, dropped: %r", body[:200])
        return
    row = await progress(runtime, ticket.event_id, ticket.call_id)
    if row.ended:
        return
    event = await runtime.directory.event(ticket.event_id)
    resource = await runtime.catalog.resources.get(ticket.resource_id)
    if event is None or resource is None:
        log.error("realtime %s: its event or resource is gone", ticket.call_id)
        return
    await CallMeter(runtime, ticket, event, resource, row).run()


def ticket_of(
    call_id: str, event: Event, attendee_id: str, resource: Resource, deployment: str, rid: str
) -> Ticket:
    return Ticket(
        call_id=call_id,
        event_id=event.id,
        attendee_id=attendee_id,
        resource_id=resource.id,
        deployment=deployment,
        request_id=rid,
        started=clock.time(),
        max_seconds=event.realtime_max_session_seconds,
    )
