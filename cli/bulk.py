"""Keys for a whole list of users: a CSV in, a CSV of user,attendee_id,api_key out."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from cli.api import ApiError, Target, Unreachable, describe
from cli.output import Progress

# Statuses worth another try: throttled, or storage briefly away.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_ATTEMPTS = 4


class InputError(Exception):
    """The input file cannot be used (missing, empty, no such column)."""


@dataclass
class Issued:
    user: str
    attendee_id: str = ""
    api_key: str = ""
    created: bool = False
    error: str = ""


def read_users(text: str, column: str | None = None) -> list[str]:
    """The users of a CSV: column `column`, else `user`, else `email`, else the first one.

    A first row with none of those names is a header unless its first cell holds an email
    address (a list of addresses without a header). Blank cells and repeats (ignoring case)
    are skipped.
    """
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError("the input has no rows")
    header = [cell.strip().lower() for cell in rows[0]]
    if column is not None:
        if column.strip().lower() not in header:
            raise InputError(f"no column '{column}' in the header ({', '.join(rows[0])})")
        index, data = header.index(column.strip().lower()), rows[1:]
    elif "user" in header:
        index, data = header.index("user"), rows[1:]
    elif "email" in header:
        index, data = header.index("email"), rows[1:]
    elif "@" in rows[0][0]:
        index, data = 0, rows
    else:
        index, data = 0, rows[1:]
    users: list[str] = []
    seen: set[str] = set()
    for row in data:
        user = row[index].strip() if index < len(row) else ""
        if user and user.lower() not in seen:
            seen.add(user.lower())
            users.append(user)
    if not users:
        raise InputError("the input names no users")
    return users


async def _issue(
    client: httpx.AsyncClient, event_id: str, user: str, limit: asyncio.Semaphore
) -> Issued:
    async with limit:
        for attempt in range(_ATTEMPTS):
            try:
                response = await client.post(f"events/{event_id}/attendees", json={"user": user})
            except httpx.TransportError as exc:
                if attempt == _ATTEMPTS - 1:
                    return Issued(user, error=f"cannot reach the proxy: {describe(exc)}")
            else:
                if response.status_code < 400:
                    data = response.json()
                    return Issued(
                        user, data["id"], data["api_key"], created=response.status_code == 201
                    )
                if response.status_code not in _RETRY_STATUSES or attempt == _ATTEMPTS - 1:
                    return Issued(user, error=str(ApiError.from_response(response)))
            await asyncio.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


async def issue_keys(
    target: Target, event_id: str, users: list[str], *, concurrency: int, progress: bool = True
) -> list[Issued]:
    """One key per user, at most `concurrency` requests at a time, in the input's order."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=target.manage_url + "/",
        headers=target.headers,
        timeout=target.timeout,
        limits=httpx.Limits(max_connections=concurrency),
    ) as client:
        try:
            check = await client.get(f"events/{event_id}")
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach {target.endpoint}: {describe(exc)}") from exc
        if check.status_code >= 400:
            raise ApiError.from_response(check, target.credential)
        bar = Progress(len(users), "keys") if progress else None

        async def one(user: str) -> Issued:
            issued = await _issue(client, event_id, user, limit)
            if bar is not None:
                bar.advance()
            return issued

        try:
            return list(await asyncio.gather(*(one(u) for u in users)))
        finally:
            if bar is not None:
                bar.finish()


def write_keys(issued: list[Issued], output: str) -> None:
    """user,attendee_id,api_key for each issued key; a file is readable by its owner only."""
    rows = [i for i in issued if not i.error]
    if output == "-":
        _write_rows(sys.stdout, rows)
        return
    path = Path(output)
    handle, temporary = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as out:
            _write_rows(out, rows)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_rows(out: TextIO, rows: list[Issued]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["user", "attendee_id", "api_key"])
    for row in rows:
        writer.writerow([row.user, row.attendee_id, row.api_key])
