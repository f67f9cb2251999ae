"""The shape of the route table (shared/management/routes.py): what one HTTP route of the app is.

A `Route` is one path, as a Functions route template, with who may call it and one `Endpoint`
per HTTP method: the handler, the body and answer models, the summary. Everything else about
routes is derived from the table: the Functions registrations (function_app.py), the seed
layout's copies under /v1 (`with_seed_copies`), the dispatch of a method to its handler
(`Route.handle`) and the OpenAPI document (shared/management/openapi.py).

A test, or any other host, may serve the app from the table: for each route of `ROUTES`, its
`path`, `methods`, `auth_level` and `handle(request)`, where the request is a Starlette request
whose `path_params` hold the template's parameters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Awaitable[Response]]

# Who may call a route; the app itself decides (the host asks no function key of any route).
MANAGER = "manager"  # manage/*: the operator key, or an organiser's Entra token or sign-in
ATTENDEE = "attendee"  # the proxy routes: an event key, or an Entra token the event takes
ANONYMOUS = "anonymous"

JSON = ("application/json",)

# The seed layout is the route layout of the AI Proxy this one replaces (docs/api.md#the-seed-layout):
# its proxy routes sat under /api/v1, so every route that takes an event key is served there too.
PREDECESSOR_PREFIX = "v1/"


@dataclass(frozen=True)
class Answer:
    """One success answer: its status, what it means and, for JSON, its model (a pydantic model
    or `list[Model]`; None: no body, or one that is not JSON)."""

    status: int
    description: str
    model: Any = None
    types: tuple[str, ...] = JSON


@dataclass(frozen=True)
class Query:
    """A query parameter: its type (for its JSON schema) and what it does."""

    name: str
    type: Any
    description: str
    default: Any = None


@dataclass(frozen=True)
class Endpoint:
    """One method of a route: what handles it and what it takes and gives."""

    method: str
    handler: Handler
    operation_id: str
    summary: str
    answers: tuple[Answer, ...]  # success answers, the main one first
    errors: tuple[int, ...] = ()  # the error statuses it can answer (docs/api.md#errors)
    body: Any = None  # the body's pydantic model
    body_type: str = "application/json"
    body_required: bool = True
    query: tuple[Query, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Route:
    """One path of the app with its methods; one Functions HTTP function."""

    name: str  # the Functions function name
    path: str  # the Functions route template, without the /api prefix
    access: str  # MANAGER, ATTENDEE or ANONYMOUS
    tag: str  # the OpenAPI tag
    endpoints: tuple[Endpoint, ...]
    auth_level: str = "anonymous"  # what the host asks: nothing; the app decides (access)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(e.method for e in self.endpoints)

    async def handle(self, request: Request) -> Response:
        """The endpoint of the request's method (the host routes only the route's methods)."""
        for endpoint in self.endpoints:
            if endpoint.method == request.method:
                return await endpoint.handler(request)
        return Response(status_code=405, headers={"allow": ", ".join(self.methods)})


def seed_copy(route: Route) -> Route:
    """The route in the seed layout: under /v1, with names of its own."""
    endpoints = tuple(
        replace(
            e,
            operation_id="seed" + e.operation_id[0].upper() + e.operation_id[1:],
            summary=f"{e.summary}; under /v1",
        )
        for e in route.endpoints
    )
    return replace(
        route,
        name="seed_" + route.name,
        path=PREDECESSOR_PREFIX + route.path,
        tag="seed",
        endpoints=endpoints,
    )


def with_seed_copies(routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """Every route, and again in the seed layout each one that takes an event key."""
    return routes + tuple(seed_copy(r) for r in routes if r.access == ATTENDEE)
