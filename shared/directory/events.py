"""Events: what an organiser creates, its window in its own time zone, and where it is stored."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from shared.directory.models import EventCreate
from shared.directory.validation import parse
from shared.errors import ProxyError
from shared.platform import clock
from shared.platform.tables import Conflict, Tables

EVENTS_TABLE = "events"
_PARTITION = "event"


def _ids(stored: Any) -> list[str]:
    return [part for part in str(stored or "").split(",") if part]


@dataclass
class Event:
    """An event: a window in its own time zone, caps per attendee and per request."""

    id: str
    name: str
    starts_at: datetime  # wall clock in time_zone, naive
    ends_at: datetime
    time_zone: str
    max_token_cap: int
    daily_request_cap: int
    daily_token_cap: int = 0  # 0: no daily token cap
    event_daily_request_cap: int = 0  # all attendees together; 0: none
    event_daily_token_cap: int = 0  # all attendees together; 0: none
    requests_per_minute: int = 0  # per attendee; 0: no limit
    tokens_per_minute: int = 0  # per attendee; 0: no limit
    realtime_max_session_seconds: int = 600  # longest realtime voice call
    description_markdown: str = ""
    organizer_name: str = ""
    organizer_email: str = ""
    image_url: str = ""
    shared_code: str = ""
    self_registration: str = "auto"  # models.SelfRegistration
    # Entra ID callers (shared/access/entra.py): the tenants whose access tokens this event
    # takes and, when any are named, only these users, apps or groups (object ids) of them.
    entra_tenants: list[str] = field(default_factory=list)
    entra_allowed: list[str] = field(default_factory=list)
    active: bool = True
    owner: str = ""
    created_at: str = ""
    _window: tuple[datetime, datetime] | None = field(default=None, repr=False, compare=False)
    # (YYYYMMDD, its first instant, the next day's first instant), all UTC: every call asks
    _day: tuple[str, datetime, datetime] | None = field(default=None, repr=False, compare=False)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def window_utc(self) -> tuple[datetime, datetime]:
        if self._window is None:
            zone = self.zone
            self._window = (
                self.starts_at.replace(tzinfo=zone).astimezone(UTC),
                self.ends_at.replace(tzinfo=zone).astimezone(UTC),
            )
        return self._window

    def local_date(self, now: datetime) -> str:
        """Today's date in the event's time zone, as YYYYMMDD (`now` is aware)."""
        day = self._day
        if day is not None and day[1] <= now < day[2]:
            return day[0]
        zone = self.zone
        local = now.astimezone(zone)
        following = local.date() + timedelta(days=1)
        first = datetime(local.year, local.month, local.day, tzinfo=zone).astimezone(UTC)
        last = datetime(following.year, following.month, following.day, tzinfo=zone)
        self._day = (local.strftime("%Y%m%d"), min(first, now), last.astimezone(UTC))
        return self._day[0]

    def seconds_to_local_midnight(self, now: datetime) -> int:
        zone = self.zone
        local = now.astimezone(zone)
        next_day = (local + timedelta(days=1)).date()
        midnight = datetime(next_day.year, next_day.month, next_day.day, tzinfo=zone)
        return max(1, int((midnight.astimezone(UTC) - now).total_seconds() + 0.999))

    def describe_window(self) -> str:
        start, end = self.window_utc()
        return (
            f"{self.starts_at.isoformat()} to {self.ends_at.isoformat()} {self.time_zone} "
            f"({start.strftime('%Y-%m-%dT%H:%M:%SZ')} to {end.strftime('%Y-%m-%dT%H:%M:%SZ')} UTC)"
        )

    def check_open(self, now: datetime | None = None) -> None:
        """Refuse with the specific reason when the event does not take requests now (or at
        `now`)."""
        now = now or clock.now()
        if not self.active:
            raise ProxyError(
                "event_inactive",
                f"Event '{self.name}' is switched off by its organiser. Ask them to activate it.",
            )
        start, end = self.window_utc()
        if now < start:
            raise ProxyError(
                "event_not_started",
                f"Event '{self.name}' has not started yet. It runs {self.describe_window()}.",
            )
        if now >= end:
            raise ProxyError(
                "event_ended",
                f"Event '{self.name}' has ended. It ran {self.describe_window()}.",
            )

    @property
    def takes_code(self) -> bool:
        """Attendees may register, or call with a key made of the code, by the shared code."""
        policy = self.self_registration
        return bool(self.shared_code) and policy in ("auto", "code", "both")

    @property
    def takes_sign_in(self) -> bool:
        """A signed-in (EasyAuth) user may register itself. Never by default: any account of
        any identity provider would do, so the organiser has to ask for it."""
        return self.self_registration in ("sign_in", "both")

    def public(self) -> dict[str, Any]:
        """What anyone may see: the registration page's view."""
        start, end = self.window_utc()
        return {
            "id": self.id,
            "name": self.name,
            "starts_at": self.starts_at.isoformat(),
            "ends_at": self.ends_at.isoformat(),
            "time_zone": self.time_zone,
            "starts_at_utc": start.isoformat().replace("+00:00", "Z"),
            "ends_at_utc": end.isoformat().replace("+00:00", "Z"),
            "organizer_name": self.organizer_name,
            "description_markdown": self.description_markdown,
            "image_url": self.image_url,
            "self_registration": self.self_registration,
            "active": self.active,
        }

    def to_json(self) -> dict[str, Any]:
        """The organiser's view."""
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data.update(self.public())
        return data

    def to_entity(self) -> dict[str, Any]:
        data = self.to_json()
        for computed in ("id", "starts_at_utc", "ends_at_utc"):
            data.pop(computed)
        for ids in ("entra_tenants", "entra_allowed"):  # tables hold no lists
            data[ids] = ",".join(data[ids])
        return {"PartitionKey": _PARTITION, "RowKey": self.id, **data}

    @classmethod
    def from_entity(cls, entity: dict[str, Any]) -> Event:
        return cls(
            id=entity["RowKey"],
            name=entity["name"],
            starts_at=datetime.fromisoformat(entity["starts_at"]),
            ends_at=datetime.fromisoformat(entity["ends_at"]),
            time_zone=entity["time_zone"],
            max_token_cap=int(entity["max_token_cap"]),
            daily_request_cap=int(entity["daily_request_cap"]),
            daily_token_cap=int(entity.get("daily_token_cap", 0)),
            event_daily_request_cap=int(entity.get("event_daily_request_cap", 0)),
            event_daily_token_cap=int(entity.get("event_daily_token_cap", 0)),
            requests_per_minute=int(entity.get("requests_per_minute", 0)),
            tokens_per_minute=int(entity.get("tokens_per_minute", 0)),
            realtime_max_session_seconds=int(entity.get("realtime_max_session_seconds", 600)),
            description_markdown=entity.get("description_markdown", ""),
            organizer_name=entity.get("organizer_name", ""),
            organizer_email=entity.get("organizer_email", ""),
            image_url=entity.get("image_url", ""),
            shared_code=entity.get("shared_code", ""),
            self_registration=entity.get("self_registration") or "auto",
            entra_tenants=_ids(entity.get("entra_tenants")),
            entra_allowed=_ids(entity.get("entra_allowed")),
            active=bool(entity.get("active", True)),
            owner=entity.get("owner", ""),
            created_at=entity.get("created_at", ""),
        )


def new_event(body: dict[str, Any], *, owner: str, now: datetime) -> Event:
    """Validate a create request; every problem names its field, all in one answer."""
    fields = parse(EventCreate, body)
    return Event(id=secrets.token_hex(8), **dict(fields), owner=owner, created_at=now.isoformat())


def patch_event(event: Event, body: dict[str, Any]) -> Event:
    """Validate a change: the body laid over the event's fields, checked as a whole. A new time
    zone alone keeps the wall-clock times."""
    current = {name: getattr(event, name) for name in EventCreate.model_fields}
    fields = parse(EventCreate, {**current, **body}, stored_code=event.shared_code)
    for name, value in fields:
        setattr(event, name, value)
    event._window = event._day = None
    return event


class EventStore:
    """Events in Table Storage."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def create(self, event: Event) -> None:
        try:
            await self._tables.insert(EVENTS_TABLE, event.to_entity())
        except Conflict:
            # 64 random bits collided: pick another id once.
            event.id = secrets.token_hex(8)
            await self._tables.insert(EVENTS_TABLE, event.to_entity())

    async def save(self, event: Event) -> None:
        await self._tables.upsert(EVENTS_TABLE, event.to_entity(), replace=True)

    async def get(self, event_id: str) -> Event | None:
        entity = await self._tables.get(EVENTS_TABLE, _PARTITION, event_id)
        return None if entity is None else Event.from_entity(entity)

    async def list(self) -> list[Event]:
        return [
            Event.from_entity(e) for e in await self._tables.partition(EVENTS_TABLE, _PARTITION)
        ]

    async def delete(self, event_id: str) -> None:
        await self._tables.delete(EVENTS_TABLE, _PARTITION, event_id)
