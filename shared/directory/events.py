"""Events: what an organiser creates, its window in its own time zone, and where it is stored."""

from __future__ import annotations

from dataclasses import asdict, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from shared.directory.models import PUBLIC_FIELDS, EventCreate, EventView
from shared.directory.records import Rows, new_id, record
from shared.directory.validation import parse
from shared.errors import ProxyError
from shared.platform import clock
from shared.platform.tables import Tables

EVENTS_TABLE = "events"


@record(
    EventView,
    leave_out=("starts_at_utc", "ends_at_utc"),  # they follow from the window
    defaults={"owner": "", "created_at": ""},
)
class Event:
    """An event: a window in its own time zone, caps per attendee and per request.

    Its fields are EventView's (shared/directory/models.py): what its organiser sends
    (EventCreate), its id, owner and creation time. starts_at and ends_at are wall-clock times
    in time_zone, naive.
    """

    # Worked out on first use: the window in UTC, and (YYYYMMDD, its first instant, the next
    # day's first instant), all UTC: every call asks.
    _window: tuple[datetime, datetime] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _day: tuple[str, datetime, datetime] | None = field(
        default=None, init=False, repr=False, compare=False
    )

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
        """What anyone may see: the registration page's view (models.PUBLIC_FIELDS), times as
        text."""
        start, end = self.window_utc()
        shown = {
            "starts_at": self.starts_at.isoformat(),
            "ends_at": self.ends_at.isoformat(),
            "starts_at_utc": start.isoformat().replace("+00:00", "Z"),
            "ends_at_utc": end.isoformat().replace("+00:00", "Z"),
        }
        return {
            name: shown[name] if name in shown else getattr(self, name) for name in PUBLIC_FIELDS
        }

    def to_json(self) -> dict[str, Any]:
        """The organiser's view."""
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data.update(self.public())
        return data


def new_event(body: dict[str, Any], *, owner: str, now: datetime) -> Event:
    """Validate a create request; every problem names its field, all in one answer."""
    fields = parse(EventCreate, body)
    return Event(id=new_id(), **dict(fields), owner=owner, created_at=now.isoformat())


def patch_event(event: Event, body: dict[str, Any]) -> Event:
    """Validate a change: the body laid over the event's fields, checked as a whole. A new time
    zone alone keeps the wall-clock times."""
    current = {name: getattr(event, name) for name in EventCreate.model_fields}
    fields = parse(EventCreate, {**current, **body}, stored_code=event.shared_code)
    for name, value in fields:
        setattr(event, name, value)
    event._window = event._day = None
    return event


class EventStore(Rows[Event]):
    """Events in Table Storage (one partition)."""

    def __init__(self, tables: Tables) -> None:
        super().__init__(tables, EVENTS_TABLE, "event", Event)
