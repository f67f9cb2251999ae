"""GET /api/eventinfo: what an attendee's key gives."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, create_model
from starlette.requests import Request
from starlette.responses import Response

from shared.directory.models import PublicEventFields, event_fields
from shared.errors import ProxyError
from shared.pipeline.answers import REQUEST_ID_HEADER, error_response, new_request_id
from shared.platform import clock
from shared.runtime import get_runtime

CAPS = (
    "max_token_cap",
    "daily_request_cap",
    "daily_token_cap",
    "event_daily_request_cap",
    "event_daily_token_cap",
    "requests_per_minute",
    "tokens_per_minute",
)


class Today(BaseModel):
    """This key's use of today's caps."""

    date: str = Field(description="today in the event's time zone, YYYYMMDD")
    requests_used: int = Field(ge=0, description="requests made today")
    requests_left: int = Field(ge=0, description="requests left today")
    tokens_used: int = Field(ge=0, description="tokens used today")
    tokens_left: int | None = Field(ge=0, description="tokens left today; null without a token cap")
    resets_in_seconds: int = Field(ge=0, description="seconds to the next local midnight")


class Budget(BaseModel):
    """This key's budgets, in the event's currency (amounts as decimal strings)."""

    currency: str = Field(description="ISO 4217 code of the amounts")
    attendee_budget: str = Field(description="this key's budget over the event; empty: none")
    attendee_daily_budget: str = Field(description="this key's budget per day; empty: none")
    left: str | None = Field(description="what is left of the tighter of the two; null: no budget")


class AttendeeName(BaseModel):
    """Who the key is."""

    id: str = Field(description="attendee id")
    user: str = Field(description="name")


EventInfo = create_model(
    "EventInfo",
    __base__=PublicEventFields,
    __doc__="The event of a key: its window, caps and the deployments the key may use",
    status=(Literal["upcoming", "live", "ended", "inactive"], Field(description="the event now")),
    today=(Today, Field(description="this key's use of today's caps")),
    budget=(Budget, Field(description="this key's budgets and what is left")),
    attendee=(AttendeeName, Field(description="who the key is")),
    **event_fields(*CAPS),
    deployments=(
        dict[str, list[str]],
        Field(description="model class -> deployment names this key may use"),
    ),
)
# Built as a plain dict per call (the proxy's hot path); tests check it against this model.


async def event_info(request: Request) -> Response:
    """What an attendee's key gives: the event, its caps and window, deployments by class."""
    runtime = get_runtime()
    request_id = new_request_id()
    try:
        access = await runtime.gate.of_request(request.headers, request.client)
        event = access.event
        by_class: dict[str, list[str]] = {}
        for name, members in sorted((await runtime.directory.pools(event.id)).items()):
            for model_class in sorted({m.model_class for m in members}):
                by_class.setdefault(model_class, []).append(name)
        now = clock.now()
        start, end = event.window_utc()
        status = (
            "inactive"
            if not event.active
            else ("upcoming" if now < start else "ended" if now >= end else "live")
        )
        used_requests, used_tokens = await runtime.caps.today(event, access.attendee.id, now)
        today: dict[str, Any] = {
            "date": event.local_date(now),
            "requests_used": used_requests,
            "requests_left": max(0, event.daily_request_cap - used_requests),
            "tokens_used": used_tokens,
            "tokens_left": (
                max(0, event.daily_token_cap - used_tokens) if event.daily_token_cap else None
            ),
            "resets_in_seconds": event.seconds_to_local_midnight(now),
        }
        if event.attendee_budget or event.attendee_daily_budget:
            await runtime.budgets.refresh(event, access.attendee.id, now)
        budget = {
            "currency": event.currency,
            "attendee_budget": event.attendee_budget,
            "attendee_daily_budget": event.attendee_daily_budget,
            "left": runtime.budgets.remaining(event, access.attendee.id, now),
        }
        info = {
            **event.public(),
            "status": status,
            "today": today,
            "budget": budget,
            "attendee": {"id": access.attendee.id, "user": access.attendee.user},
            **{cap: getattr(event, cap) for cap in CAPS},
            "deployments": by_class,
        }
        return Response(
            orjson.dumps(info), 200, {REQUEST_ID_HEADER: request_id}, media_type="application/json"
        )
    except ProxyError as error:
        return error_response(error, request_id)
