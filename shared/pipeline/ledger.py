"""A call's account: the tokens it reserves when admitted, settled by its usage record or given
back when it fails first, and the refusals counted for the organiser's reports."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.directory.events import Event
from shared.errors import ProxyError
from shared.governance import prices
from shared.governance.caps import Counter
from shared.governance.journal import Entry
from shared.governance.ratelimits import Admission
from shared.governance.usage import UsageRecord
from shared.pipeline.forwarding import UpstreamRequest
from shared.pipeline.kinds import NO_DETAILS, TOKEN_CLASSES, Details
from shared.platform import clock, telemetry
from shared.runtime import Access, Runtime


@dataclass(frozen=True, slots=True)
class Ending:
    """What a call came to, as its usage record tells it."""

    status: int
    usage: tuple[int, int, int]  # prompt, completion, total tokens
    streamed: bool
    estimated: bool
    outcome: str
    units: int = 0
    reasoning: int = 0
    details: Details = NO_DETAILS


@dataclass(eq=False)
class Ledger:
    """One call's entries. `access` is set once the caller is known; `upstream` is the call's
    upstream request, whose deployment and answering member the record names."""

    runtime: Runtime
    request_id: str
    model_class: str
    upstream: UpstreamRequest
    started: float = field(default_factory=time.perf_counter)
    metered: bool = True  # calls that use no model (by id) neither take from the caps nor record
    access: Access | None = None
    worst_case_tokens: int = 0
    counter: Counter | None = None
    admission: Admission | None = None  # its place in the per-minute counts
    entry: Entry | None = None  # its entry among the calls in flight, until recorded
    tool: str = ""  # an MCP tool call's tool
    hold: Any = None  # its worst case taken from the event's budgets (a Hold)

    async def admit(
        self, event: Event, body_size: int, limit: Any, units: int = 0, *, streamed: bool = False
    ) -> None:
        """Take one request from today's cap and this minute's limits (and the pool's fair
        share near its quota), reserving the call's worst case in tokens; then start writing
        the call's entry among the calls in flight (`journaled` waits for it)."""
        assert self.access is not None
        if event.daily_token_cap or self.model_class in TOKEN_CLASSES:
            # A cheap worst case (about 4 bytes a token): no tokenizer on the request path.
            self.worst_case_tokens = body_size // 4 + (limit if isinstance(limit, int) else 0)
        attendee_id, upstream = self.access.attendee.id, self.upstream
        self.counter = await self.runtime.caps.admit(
            event, attendee_id, clock.now(), self.worst_case_tokens
        )
        self.admission = self.runtime.limits.admit(
            event, attendee_id, self.counter, upstream.deployment, upstream.members,
            self.worst_case_tokens,
        )  # fmt: skip
        if event.budget or event.attendee_budget or event.attendee_daily_budget:
            worst = self.worst_cost(body_size, limit if isinstance(limit, int) else 0, units)
            self.hold = await self.runtime.budgets.admit(event, attendee_id, clock.now(), worst)
        self.journal(body_size, limit, streamed)

    def worst_cost(self, body_size: int, limit: int, units: int) -> int:
        """The most the call may cost (billionths): every byte of its body a token, and all
        the output it may ask for, at the dearest member's prices; 1 when none is priced."""
        worst = 1  # every call needs some room: a budget spent is spent, priced or not
        prompt = body_size if self.model_class in TOKEN_CLASSES else 0
        for member in self.upstream.members:
            model = prices.ANSWERED.get(member.id) or member.upstream_deployment
            cost = prices.cost_of(
                prices.price_of(model, member.prices), self.model_class, prompt=prompt,
                completion=limit, units=units,
            )  # fmt: skip
            worst = max(worst, cost.nano)
        return worst

    def journal(self, body_size: int, limit: Any, streamed: bool) -> None:
        """The call's provisional record, at its worst case: its usage record if it never
        writes one (its worker is killed), made the way every record is."""
        if not self.runtime.journal.enabled:
            return
        prompt = min(body_size // 4, self.worst_case_tokens)
        # Its cost is what its budgets hold for it: the worst case at its pool's prices.
        held = self.hold.worst if self.hold is not None else 0
        usage = (prompt, self.worst_case_tokens - prompt, self.worst_case_tokens)
        provisional = self.usage_record(
            Ending(502, usage, streamed, estimated=True, outcome="worker_lost"), 0.0,
            prices.Cost(held, True, "worst case") if held else prices.FREE,
        )  # fmt: skip
        counter = self.counter
        whole = counter is not None and counter.whole is not None
        self.entry = self.runtime.journal.admit(provisional.to_entity(), {"whole": whole})

    async def journaled(self) -> None:
        """Before the caller gets the first byte of an answer: the call's entry is stored."""
        if self.entry is not None:
            await self.entry.landed()

    def unsent(self) -> None:
        """Nothing reached a deployment: the call uses none of this minute's quota."""
        if self.admission is not None:
            self.admission.cancel()
            self.admission = None

    def release(self) -> None:
        """Give back a token reservation no record will settle (the call failed before)."""
        self.unsent()
        self.settle_entry()
        if self.counter is not None:
            self.runtime.caps.settle(self.counter, self.worst_case_tokens, 0)
            self.counter = None
        self.runtime.budgets.settle(self.hold, 0)
        self.hold = None

    def refused(self, error: ProxyError) -> None:
        """A refusal, logged; one of 429 counted for the organiser's reports."""
        access = self.access
        telemetry.refused(error.code, self.request_id, access.event.id if access else "")
        if error.status == 429 and access is not None:
            self.runtime.caps.count_refusal(
                access.event, access.attendee.id, clock.now(), error.reason
            )

    def record_failure(self, status: int, outcome: str, *, streamed: bool) -> None:
        """A call that used no tokens: the upstream failed or never answered."""
        if self.metered:
            self.record(status, (0, 0, 0), streamed=streamed, estimated=False, outcome=outcome)

    def record_end(
        self,
        outcome: str,
        usage: tuple[int, int, int] = (0, 0, 0),
        *,
        estimated: bool = False,
        units: int = 0,
        reasoning: int = 0,
        details: Details = NO_DETAILS,
    ) -> None:
        """A relayed answer's record once it ended: ok, cut by the upstream, or client_gone."""
        status = 200 if outcome == "ok" else 502 if outcome == "cut" else 499
        self.record(
            status, usage, streamed=True, estimated=estimated, outcome=outcome, units=units,
            reasoning=reasoning, details=details,
        )  # fmt: skip

    def record(
        self,
        status: int,
        usage: tuple[int, int, int],
        *,
        streamed: bool,
        estimated: bool,
        outcome: str,
        units: int = 0,
        reasoning: int = 0,
        charge: int | None = None,
        details: Details = NO_DETAILS,
    ) -> None:
        """The call's usage record; its tokens (or `charge`) count against today's cap."""
        assert self.access is not None
        charged = usage[2] if charge is None else charge
        if self.counter is not None:
            self.runtime.caps.settle(self.counter, self.worst_case_tokens, charged)
            self.counter = None  # settled once
        if self.admission is not None:
            self.admission.settle(charged)
            self.admission = None
        event, attendee_id = self.access.event, self.access.attendee.id
        resource, deployment = self.upstream.member, self.upstream.deployment
        latency_ms = (time.perf_counter() - self.started) * 1000
        cost = self.cost(resource, usage, units, details)
        # A background response's tokens come with a later record, which any instance may
        # write: its budgets keep the call's worst case, as today's token cap does.
        spent = self.hold.worst if outcome == "background" and self.hold else cost.nano
        self.runtime.budgets.settle(self.hold, spent)
        self.hold = None
        telemetry.call_finished(
            {
                "request_id": self.request_id,
                "event_id": event.id,
                "attendee_id": attendee_id,
                "deployment": deployment,
                "resource_id": resource.id if resource else "",
                "status": status,
                "outcome": outcome,
                "streamed": streamed,
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
                "latency_ms": round(latency_ms, 1),
            }
        )
        ending = Ending(status, usage, streamed, estimated, outcome, units, reasoning, details)
        self.runtime.usage.append(self.usage_record(ending, latency_ms, cost))
        self.settle_entry()

    def settle_entry(self) -> None:
        """The call has its usage record (or needs none): its entry in flight goes."""
        if self.entry is not None:
            self.runtime.journal.settle(self.entry)
            self.entry = None

    def usage_record(
        self,
        ending: Ending,
        latency_ms: float,
        cost: prices.Cost = prices.FREE,
        *,
        when: datetime | None = None,
        request_id: str = "",
    ) -> UsageRecord:
        """The call's usage record, as of now or `when`: every record is made here (a
        background response's result with its own time and request id)."""
        assert self.access is not None
        event, attendee_id = self.access.event, self.access.attendee.id
        resource, deployment = self.upstream.member, self.upstream.deployment
        now = when or clock.now()
        usage, details = ending.usage, ending.details
        return UsageRecord(
            event_id=event.id,
            attendee_id=attendee_id,
            deployment=deployment,
            resource_id=resource.id if resource else "",
            model_class=self.model_class,
            status=ending.status,
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            total_tokens=usage[2],
            streamed=ending.streamed,
            estimated=ending.estimated,
            latency_ms=latency_ms,
            time=now,
            local_date=event.local_date(now),
            request_id=request_id or self.request_id,
            outcome=ending.outcome,
            units=ending.units,
            reasoning_tokens=details.reasoning or ending.reasoning,
            cached_tokens=details.cached,
            audio_tokens=details.audio,
            audio_output_tokens=details.audio_output,
            model=details.model,
            cost_nano=cost.nano,
            unpriced=not cost.priced,
            price_source=cost.source,
            tool=self.tool,
        )

    def budget_left(self) -> str | None:
        """What is left of the caller's own budget (None: the event gives them none)."""
        access = self.access
        if access is None:
            return None
        event = access.event
        if not (event.attendee_budget or event.attendee_daily_budget):
            return None
        return self.runtime.budgets.remaining(event, access.attendee.id, clock.now())

    def cost(
        self, resource: Any, usage: tuple[int, int, int], units: int, details: Details
    ) -> prices.Cost:
        """What the call cost at the prices of the model that answered (the resource's own
        over the table's), fixed now: a later change of prices leaves the record as it is."""
        if resource is not None and details.model:
            prices.ANSWERED[resource.id] = details.model
        model = details.model or (resource.upstream_deployment if resource else "")
        price = prices.price_of(model, resource.prices if resource else "")
        return prices.cost_of(
            price, self.model_class, prompt=usage[0], cached=details.cached,
            audio=details.audio, completion=usage[1], audio_output=details.audio_output,
            units=units,
        )  # fmt: skip

    def record_result(
        self, response_id: str, created: Any, usage: tuple[int, int, int], reasoning: int,
        details: Details = NO_DETAILS,
    ) -> None:  # fmt: skip
        """The tokens of a finished background response (by the member that answered).

        Its record's row key comes from the response (creation time, id), so the same result
        written by several instances is written over itself, not counted again. The daily cap
        already took the worst case when the response was created.
        """
        resource = self.upstream.member
        assert self.access is not None and resource is not None
        cost = self.cost(resource, usage, 0, details)
        when = (
            datetime.fromtimestamp(created, UTC)
            if isinstance(created, int | float)
            else clock.now()
        )
        ending = Ending(200, usage, False, False, "background_result", 0, reasoning, details)
        self.runtime.usage.append(
            self.usage_record(
                ending, 0.0, cost, when=when,
                request_id="bg" + hashlib.sha256(response_id.encode()).hexdigest()[:14],
            )
        )  # fmt: skip
