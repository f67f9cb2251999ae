"""Budget alerts: each of an event's thresholds (`budget_alerts`, percentages of its `budget`)
fires once, across every instance, as a webhook POST and a console banner.

Who fires is decided by storage: the instance whose insert of the row (event, `budget-<pct>`)
into `alerts` succeeds; the others get a conflict and stay quiet. The POST goes to the event's
`alert_webhook_url` with `x-aiproxy-signature: sha256=<hex HMAC-SHA256 of the body>`, keyed with
the event's alert secret (made and shown once by `POST /manage/events/{id}/alerts/secret`,
kept sealed). A receiver that does not answer 2xx is tried 3 times; the row says whether the
POST was delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
from pydantic import BaseModel, Field

from shared.directory.endpoints import EndpointPolicy, webhook_problem
from shared.directory.events import Event
from shared.directory.models import ANSWER, UTC_TIME
from shared.governance.prices import as_amount
from shared.platform import settings
from shared.platform.background import Background
from shared.platform.tables import Conflict, StorageUnavailable, Tables
from shared.platform.vault import Sealer

log = logging.getLogger(__name__)

ALERTS_TABLE = "alerts"
SECRET_ROW = "_secret"
SIGNATURE_HEADER = "x-aiproxy-signature"
# POSTs a body with headers to a URL and answers the status (the runtime's upstream client,
# connecting to public addresses only: shared/upstreams/client.py PublicResolver).
Post = Callable[[str, dict[str, str], bytes], Awaitable[int]]


class AlertView(BaseModel):
    """A budget threshold that fired (once, whichever instance saw it first)."""

    model_config = ANSWER

    threshold_percent: int = Field(description="the percentage of the event's budget")
    fired_at: str = Field(description="when it fired, UTC", json_schema_extra=UTC_TIME)
    delivered: bool = Field(description="the webhook answered 2xx (false: no webhook, or none)")
    spent: str = Field(description="what the event had spent when it fired")
    budget: str = Field(description="the budget then")
    currency: str = Field(description="of both amounts")


def signature(secret: str, body: bytes) -> str:
    """The signature header's value for a body: sha256=<hex HMAC-SHA256>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Alerts:
    """Fires budget thresholds once per event across instances."""

    def __init__(self, tables: Tables, sealer: Sealer, post: Post) -> None:
        self._tables = tables
        self._sealer = sealer
        self._post = post
        self._known: set[tuple[str, int]] = set()  # fired (by anyone), as seen here
        self._background = Background()

    def spent(self, event: Event, spent: int, budget: int, *, exhausted: bool = False) -> None:
        """The event's spending as last seen: any threshold it reached fires (once); an
        exhausted budget (a call refused for it) has reached every threshold up to 100%."""
        if not (budget and event.budget_alerts):
            return
        for pct in (int(p) for p in event.budget_alerts.split(",")):
            reached = spent * 100 >= pct * budget or (exhausted and pct <= 100)
            if reached and (event.id, pct) not in self._known:
                self._known.add((event.id, pct))
                self._background.spawn(self.fire(event, pct, spent, budget))

    async def fire(self, event: Event, pct: int, spent: int, budget: int) -> bool:
        """Fire one threshold if no instance did; True when this one did."""
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        row = {
            "PartitionKey": event.id,
            "RowKey": f"budget-{pct:04d}",
            "threshold": pct,
            "spent_nano": str(spent),  # 64-bit numbers, kept as text
            "budget_nano": str(budget),
            "currency": event.currency,
            "fired_at": now,
            "delivered": False,
        }
        try:
            await self._tables.insert(ALERTS_TABLE, row)
        except Conflict:
            return False  # another instance (or this one, earlier) fired it
        except StorageUnavailable as exc:
            self._known.discard((event.id, pct))  # tried again at the next sync
            log.warning("alerts: storage unavailable: %s", str(exc)[:200])
            return False
        log.warning("alerts: event %s reached %d%% of its budget", event.id, pct)
        if event.alert_webhook_url:
            body = orjson.dumps(
                {
                    "type": "budget_threshold",
                    "event_id": event.id,
                    "event_name": event.name,
                    "threshold_percent": pct,
                    "spent": as_amount(spent),
                    "budget": event.budget,
                    "currency": event.currency,
                    "fired_at": now,
                }
            )
            delivered = await self._deliver(event, body)
            row["delivered"] = delivered
            try:
                await self._tables.upsert(ALERTS_TABLE, row)
            except StorageUnavailable:
                pass
        return True

    async def _deliver(self, event: Event, body: bytes) -> bool:
        # Checked again at sending: the operator's policy may have changed since it was set.
        policy = EndpointPolicy.of(settings.get())
        problem = webhook_problem(event.alert_webhook_url, policy)
        if problem is not None:
            log.warning("alerts: webhook of event %s not called: it %s", event.id, problem)
            return False
        secret = await self.secret(event.id)
        headers = {"content-type": "application/json"}
        if secret:
            headers[SIGNATURE_HEADER] = signature(secret, body)
        for attempt in range(3):
            try:
                status = await self._post(event.alert_webhook_url, headers, body)
                if 200 <= status < 300:
                    return True
                log.warning("alerts: webhook of event %s answered %d", event.id, status)
            except Exception as exc:  # any failure of the receiver: tried again
                log.warning("alerts: webhook of event %s failed: %s", event.id, str(exc)[:200])
            await asyncio.sleep(0.5 * 2**attempt)
        return False

    async def secret(self, event_id: str) -> str:
        """The event's alert secret ('' until one was made)."""
        row = await self._tables.get(ALERTS_TABLE, event_id, SECRET_ROW)
        return self._sealer.unseal(row["sealed"]) if row else ""

    async def new_secret(self, event_id: str) -> str:
        """A new alert secret for the event (the old one stops signing); shown only now."""
        secret = "whsec_" + secrets.token_urlsafe(32)
        await self._tables.upsert(
            ALERTS_TABLE,
            {"PartitionKey": event_id, "RowKey": SECRET_ROW, "sealed": self._sealer.seal(secret)},
            replace=True,
        )
        return secret

    async def fired(self, event_id: str) -> list[AlertView]:
        """The thresholds fired for the event, lowest first."""
        rows = await self._tables.partition(ALERTS_TABLE, event_id)
        return [
            AlertView(
                threshold_percent=int(row["threshold"]),
                fired_at=row["fired_at"],
                delivered=bool(row.get("delivered")),
                spent=as_amount(int(row["spent_nano"])),
                budget=as_amount(int(row["budget_nano"])),
                currency=row.get("currency", "USD"),
            )
            for row in sorted(rows, key=lambda r: r["RowKey"])
            if row["RowKey"] != SECRET_ROW
        ]

    async def close(self) -> None:
        self._background.cancel()
