"""The Responses API: create a response, then get, delete, list its input items or cancel it.

A stored response, and the reasoning an upstream encrypted for it, live only on the Azure
OpenAI resource that produced it. So a call that names one (`previous_response_id`, an id in
the path, reasoning items with `encrypted_content`) goes to that pool member and to no other;
while it cools down the answer is 429 `no_capacity` with its Retry-After. Which member, and
whose response it is, travels sealed in the ids the proxy hands out (shared/upstreams/affinity.py): no
storage, the same on every instance from the first call on. Another attendee's key gets 404.

Calls by id use no model: they take nothing from the caps and write no usage record, except
the first one on an instance that sees a background response finished, which records its
tokens (see `record_background_result`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from shared.directory.catalog import Resource
from shared.errors import NoCapacity, ProxyError
from shared.governance import tokens
from shared.pipeline.bodies import read_body
from shared.pipeline.call import ProxyCall
from shared.pipeline.kinds import RESPONSES, apply_token_cap, details_of, reasoning_of
from shared.pipeline.relays import RESPONSE_CUT_EVENT, is_event_stream
from shared.pipeline.streaming import ResponseStreamMeter
from shared.runtime import Runtime, get_runtime
from shared.upstreams.affinity import Sealed
from shared.upstreams.client import UpstreamAnswer

# For an AzureOpenAI-style call that names none (the SDK always does).
RESPONSES_API_VERSION = "2025-04-01-preview"
FINISHED = frozenset({"completed", "incomplete", "failed", "cancelled"})
# Background responses whose result this instance has recorded (repeated polls write nothing).
_SEEN_LIMIT = 10_000
_results_seen: OrderedDict[str, None] = OrderedDict()


def _not_found(response_id: str) -> ProxyError:
    return ProxyError(
        "not_found",
        f"No response with id '{response_id[:200]}' for this key. Responses belong to the key "
        "that created them, in its event.",
    )


class ResponsesCall(ProxyCall):
    """One Responses API call, on the AzureOpenAI path (`openai/responses?api-version=`) or the
    OpenAI v1 path (`openai/v1/responses`); the upstream is called the same way."""

    def __init__(self, request: Request, runtime: Runtime, v1: bool) -> None:
        super().__init__(request, RESPONSES, runtime)
        version = request.query_params.get("api-version")
        self.upstream.path = "openai/v1/responses" if v1 else "openai/responses"
        self.upstream.query = self.upstream_query(
            version if v1 else version or RESPONSES_API_VERSION
        )
        self.pinned = False  # only the member that holds a stored response can serve the call
        self.shown: dict[str, str] = {}  # upstream ids named in the request -> the caller's ids

    # --- ids --------------------------------------------------------------------------------

    @property
    def attendee_id(self) -> str:
        assert self.access is not None
        return self.access.attendee.id

    def open_id(self, response_id: Any, param: str | None = None) -> Sealed:
        """The member and upstream id behind a caller's response id; 404 unless it is theirs."""
        if not isinstance(response_id, str) or not response_id:
            raise ProxyError(
                "invalid_request", f"'{param}' must be a response id (a string).", param=param
            )
        sealed = self.runtime.affinity.open_id(response_id)
        if sealed is None or sealed.attendee_id != self.attendee_id:
            raise _not_found(response_id)
        self.shown[sealed.upstream_id] = response_id
        return sealed

    def seal(self, resource: Resource, value: dict[str, Any]) -> None:
        """Rewrite, in place, what an answer or event holds for the caller's eyes: response ids
        sealed with their member and attendee, encrypted reasoning tagged with the member."""
        affinity, attendee = self.runtime.affinity, self.attendee_id
        response = value.get("response") if isinstance(value.get("response"), dict) else value
        if response.get("object") == "response" and isinstance(response.get("id"), str):
            response["id"] = affinity.seal_id(response["id"], resource.id, attendee)
            previous = response.get("previous_response_id")
            if isinstance(previous, str):
                response["previous_response_id"] = affinity.seal_id(previous, resource.id, attendee)
        items = [value.get("item")]
        for field in ("output", "data"):
            if isinstance(response.get(field), list):
                items += response[field]
        for item in items:
            if (
                isinstance(item, dict)
                and item.get("type") == "reasoning"
                and isinstance(item.get("encrypted_content"), str)
            ):
                item["encrypted_content"] = affinity.tag_content(
                    item["encrypted_content"], resource.id, attendee
                )

    def hide_upstream_ids(self, content: bytes) -> bytes:
        """An upstream error may quote the ids it was sent: show the caller's own instead."""
        for upstream, shown in self.shown.items():
            content = content.replace(upstream.encode(), shown.encode())
        return content

    # --- which member ---------------------------------------------------------------------------

    def holder(self, resource_id: str, what: str) -> Resource:
        """The catalog's resource a sealed id names (404 once it left the catalog)."""
        for members in self.pools.values():
            for member in members:
                if member.id == resource_id and member.model_class == "openai-chat":
                    return member
        raise ProxyError(
            "not_found",
            f"The deployment that holds {what} is no longer in this event's catalog, so it "
            "cannot be reached. Start a new conversation.",
        )

    def pin(self, payload: dict[str, Any]) -> Resource | None:
        """The member a create must go to: the holder of its previous response or reasoning
        items (on the same Azure resource, for another deployment), or None for any member."""
        wanted: Sealed | None = None
        if payload.get("previous_response_id") is not None:
            wanted = self.open_id(payload["previous_response_id"], "previous_response_id")
            payload["previous_response_id"] = wanted.upstream_id
        items = payload.get("input")
        for item in items if isinstance(items, list) else ():
            content = item.get("encrypted_content") if isinstance(item, dict) else None
            if not isinstance(content, str):
                continue
            opened = self.runtime.affinity.open_content(content)
            if opened is None or opened[0].attendee_id != self.attendee_id:
                raise ProxyError(
                    "invalid_request",
                    "An input item's 'encrypted_content' was not made for this key through "
                    "this proxy. Send back reasoning items as you received them.",
                    param="input",
                )
            item["encrypted_content"] = opened[1]
            wanted = wanted or opened[0]
        if wanted is None:
            return None
        what = (
            f"response '{self.shown[wanted.upstream_id][:200]}'"
            if wanted.upstream_id
            else "these reasoning items"
        )
        holder = self.holder(wanted.resource_id, what)
        deployment = self.upstream.deployment
        members = self.pools.get(deployment, [])
        for member in members:
            if member.id == holder.id:
                return member
        for member in members:  # another deployment on the same Azure OpenAI resource
            if member.endpoint == holder.endpoint and member.model_class == "openai-chat":
                return member
        raise ProxyError(
            "invalid_request",
            f"Deployment '{deployment}' does not run on the Azure OpenAI resource that "
            f"holds this conversation; continue it with '{holder.deployment}'.",
            param="model",
        )

    async def dispatch(self, streamed: bool) -> UpstreamAnswer:
        try:
            return await super().dispatch(streamed)
        except NoCapacity as error:
            if not self.pinned:
                raise
            wait = error.headers.get("Retry-After", "1")
            raise ProxyError(
                "no_capacity",
                "The deployment that holds this response is busy, and no other can continue "
                f"it. Retry after {wait} seconds.",
                headers=error.headers,
            ) from None

    # --- create -------------------------------------------------------------------------------

    async def create(self) -> Response:
        """POST …/responses: the call's steps, the member pinned where the input names a
        stored response or reasoning items; ids sealed on the way back."""
        event = await self.arrive()
        payload, body = await self.parse(None)
        pinned = self.pin(payload)
        for field in ("stream", "background"):
            if payload.get(field) is not None and not isinstance(payload[field], bool):
                raise ProxyError(
                    "invalid_request", f"Field '{field}' must be true or false.", param=field
                )
        stream = payload.get("stream") is True
        background = payload.get("background") is True
        apply_token_cap(payload, event.max_token_cap, "max_output_tokens", ("max_output_tokens",))
        await self.ledger.admit(event, len(body), payload["max_output_tokens"], streamed=stream)
        upstream = self.upstream
        upstream.payload = payload  # each member's body names its own deployment
        if pinned is not None:
            upstream.members, self.pinned = [pinned], True
        answer = await self.dispatch(stream)
        if stream and is_event_stream(answer):

            def finish(meter: ResponseStreamMeter, outcome: str) -> None:
                if background and outcome == "ok" and meter.response is not None:
                    self.record_background(meter.response, streamed=True)
                    return
                self.record_created(
                    meter.usage, payload, outcome, stream=True,
                    estimate=meter.estimate_output_tokens,
                    model=(meter.response or {}).get("model"),
                )  # fmt: skip

            return self.relay_events(answer, finish)

        def record(parsed: dict[str, Any] | None) -> None:
            if parsed is None:
                self.record_created(None, payload, "upstream_status", status=answer.status)
            elif background:
                self.record_background(parsed, streamed=False)
            else:
                usage = parsed.get("usage") if isinstance(parsed.get("usage"), dict) else None
                self.record_created(usage, payload, "ok", model=parsed.get("model"))

        return await self.answer_read(answer, stream, record)

    def record_background(self, response: dict[str, Any], *, streamed: bool) -> None:
        """The create call of a background response: a record without tokens, which come with
        the record of its result (the same one, whoever sees it first). Until the result is
        known, today's cap takes the call's worst case, since nobody may ever ask for it."""
        usage = response.get("usage")
        finished = response.get("status") in FINISHED and isinstance(usage, dict)
        self.ledger.record(
            200,
            (0, 0, 0),
            streamed=streamed,
            estimated=False,
            outcome="background",
            charge=int(usage.get("total_tokens") or 0)
            if finished
            else self.ledger.worst_case_tokens,
        )
        self.record_background_result(response)

    def relay_events(
        self, answer: UpstreamAnswer, finish: Callable[[ResponseStreamMeter, str], None]
    ) -> Response:
        """A Responses stream passed on with its ids sealed; `finish(meter, outcome)` records."""
        resource = self.upstream.member
        assert resource is not None
        meter = ResponseStreamMeter(lambda value: self.seal(resource, value))
        return self.relayed(
            answer, meter, lambda outcome: finish(meter, outcome), RESPONSE_CUT_EVENT
        )

    async def answer_read(
        self,
        answer: UpstreamAnswer,
        stream: bool,
        record: Callable[[dict[str, Any] | None], None],
    ) -> Response:
        """The upstream's answer read whole: a 200's JSON object sealed, anything else with the
        caller's own ids in it; `record(the sealed object, or None)` before it goes."""
        content = await self.read_answer(answer, stream)
        headers = self.answer_headers(answer)
        parsed = self.parse_answer(answer, content)
        if parsed is None:
            record(None)
            return Response(self.hide_upstream_ids(content), answer.status, headers)
        assert self.upstream.member is not None
        self.seal(self.upstream.member, parsed)
        record(parsed)  # with the ids the caller sees: the same record whoever writes it
        return Response(orjson.dumps(parsed), 200, headers)

    def parse_answer(self, answer: UpstreamAnswer, content: bytes) -> dict[str, Any] | None:
        """A 200 answer's JSON object; None for the upstream's other answers."""
        if answer.status != 200:
            return None
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            self.ledger.record_failure(502, "upstream_error", streamed=False)
            raise ProxyError(
                "upstream_error", "The deployment answered with something that is not JSON."
            )
        return parsed

    def record_created(
        self,
        usage: dict[str, Any] | None,
        payload: dict[str, Any],
        outcome: str,
        *,
        stream: bool = False,
        status: int = 200,
        estimate: Any = None,
        model: Any = None,
    ) -> None:
        estimated = usage is None and outcome != "upstream_status"
        if usage is not None:
            prompt = int(usage.get("input_tokens") or 0)
            completion = int(usage.get("output_tokens") or 0)
            total = int(usage.get("total_tokens") or prompt + completion)
        elif estimated:
            prompt = tokens.response_prompt_tokens(payload)
            completion = estimate() if estimate is not None else 0
            total = prompt + completion
        else:
            prompt = completion = total = 0
        if outcome != "ok":
            status = 502 if outcome == "cut" else 499 if outcome == "client_gone" else status
        self.ledger.record(
            status,
            (prompt, completion, total),
            streamed=stream,
            estimated=estimated,
            outcome=outcome,
            details=details_of(usage, model),
        )

    # --- by id --------------------------------------------------------------------------------

    async def by_id(self, response_id: str, action: str) -> Response:
        """GET or DELETE a response, GET its input items or POST its cancel (action: "",
        "input_items", "cancel"), on the member that holds it."""
        self.ledger.metered = False
        event = await self.arrive()
        sealed = self.open_id(response_id)
        await read_body(self.request, self.runtime.settings.max_body_bytes)  # none expected
        self.pools = await self.runtime.directory.pools(event.id)
        resource = self.holder(sealed.resource_id, f"response '{response_id[:200]}'")
        upstream, method = self.upstream, self.request.method
        upstream.deployment, upstream.members, self.pinned = resource.deployment, [resource], True
        upstream.method = method
        upstream.path += f"/{sealed.upstream_id}" + (f"/{action}" if action else "")
        stream = (
            method == "GET" and not action and self.request.query_params.get("stream") == "true"
        )
        answer = await self.dispatch(False)
        if stream and is_event_stream(answer):

            def finish(meter: ResponseStreamMeter, outcome: str) -> None:
                if outcome == "ok" and meter.response is not None:
                    self.record_background_result(meter.response)

            return self.relay_events(answer, finish)

        def record(parsed: dict[str, Any] | None) -> None:
            if parsed is not None:
                self.record_background_result(parsed)

        return await self.answer_read(answer, False, record)

    def record_background_result(self, response: dict[str, Any]) -> None:
        """The tokens of a finished background response, recorded once per instance (the
        record is the same whichever instance writes it: see Ledger.record_result)."""
        usage = response.get("usage")
        if (
            response.get("background") is not True
            or response.get("status") not in FINISHED
            or not isinstance(usage, dict)
        ):
            return
        response_id = str(response.get("id"))
        if response_id in _results_seen:
            return
        _results_seen[response_id] = None
        while len(_results_seen) > _SEEN_LIMIT:
            _results_seen.popitem(last=False)
        prompt = int(usage.get("input_tokens") or 0)
        completion = int(usage.get("output_tokens") or 0)
        total = int(usage.get("total_tokens") or prompt + completion)
        self.ledger.record_result(
            response_id, response.get("created_at"), (prompt, completion, total),
            reasoning_of(usage), details_of(usage, response.get("model")),
        )  # fmt: skip


async def create(request: Request, v1: bool) -> Response:
    """POST …/responses."""
    call = ResponsesCall(request, get_runtime(), v1)
    return await call.answer(call.create)


async def by_id(request: Request, v1: bool, action: str = "") -> Response:
    """GET/DELETE …/responses/{response_id}, GET …/input_items, POST …/cancel."""
    call = ResponsesCall(request, get_runtime(), v1)
    return await call.answer(lambda: call.by_id(request.path_params["response_id"], action))
