"""The Responses API through the proxy with the official SDK: both path forms, streams, caps,
ids that keep a conversation on the pool member that holds it, privacy, background mode."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests.harness import AppHost, EventSetup, Simulator, Storage

AZURE_VERSION = "2025-04-01-preview"


def azure(base: str, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=base, api_key=key, api_version=AZURE_VERSION, max_retries=0
    )


def v1(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/openai/v1", api_key=key, max_retries=0)


@pytest.fixture(params=["AzureOpenAI", "OpenAI"])
def client(request: pytest.FixtureRequest, host: AppHost, event: EventSetup) -> openai.OpenAI:
    return (azure if request.param == "AzureOpenAI" else v1)(host.base, event.key)


def last_upstream(sim: Simulator, kind: str = "responses") -> dict[str, Any]:
    return [r for r in sim.stats()["last_requests"] if kind in r["path"]][-1]


def wait_for(condition: Any, timeout: float = 10.0) -> Any:
    """Poll `condition` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_plain_response_records_exact_usage(
    client: openai.OpenAI, event: EventSetup, storage: Storage
) -> None:
    reply = client.responses.create(
        model="gpt-4o-mini", input="Name three colours.", max_output_tokens=7
    )
    assert reply.status == "incomplete" and reply.output_text
    assert reply.usage is not None and reply.usage.output_tokens == 7
    thought = client.responses.create(
        model="gpt-4o-mini", input="Think first.", reasoning={"effort": "low"}
    )
    assert thought.usage is not None and thought.usage.output_tokens_details.reasoning_tokens == 8
    first, second = storage.usage(event.id, expect=2)
    for record, usage in ((first, reply.usage), (second, thought.usage)):
        assert record["prompt_tokens"] == usage.input_tokens
        assert record["completion_tokens"] == usage.output_tokens
        assert record["total_tokens"] == usage.total_tokens
        assert record["reasoning_tokens"] == usage.output_tokens_details.reasoning_tokens
        assert record["estimated"] is False and record["streamed"] is False
        assert record["deployment"] == "gpt-4o-mini" and record["outcome"] == "ok"
        assert record["attendee_id"] == event.attendee["id"]


def test_streamed_response_passes_events_and_records_the_final_usage(
    client: openai.OpenAI, event: EventSetup, storage: Storage
) -> None:
    events = list(
        client.responses.create(model="gpt-4o-mini", input="Stream [sim:tokens=5]", stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_text.delta") == 5
    assert kinds[-1] == "response.completed"
    final = events[-1].response
    assert final.id == events[0].response.id and final.id.startswith("resp_")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text
    [record] = storage.usage(event.id, expect=1)
    assert final.usage is not None
    assert (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
        final.usage.total_tokens,
    )
    assert record["streamed"] is True and record["estimated"] is False


def test_stream_events_arrive_as_the_upstream_sends_them(host: AppHost, event: EventSetup) -> None:
    body = {
        "model": "gpt-4o-mini",
        "input": "Slowly [sim:tokens=8 latency_ms_per_token=80]",
        "stream": True,
    }
    arrivals: list[float] = []
    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{host.base}/openai/v1/responses", json=body,
        headers={"authorization": f"Bearer {event.key}"}, timeout=30,
    ) as answer:  # fmt: skip
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line == "event: response.output_text.delta":
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) == 8
    # 7 gaps of 80 ms upstream: the first delta is here long before the last one.
    assert arrivals[-1] - arrivals[0] > 0.4, arrivals


def test_max_output_tokens_is_capped_like_max_tokens(
    client: openai.OpenAI, event: EventSetup, sim: Simulator
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-4o-mini", input="Long", max_output_tokens=513)
    assert refused.value.code == "max_tokens_exceeds_cap"
    assert "512" in refused.value.message
    client.responses.create(model="gpt-4o-mini", input="Unbounded")
    assert last_upstream(sim)["body"]["max_output_tokens"] == 512
    client.responses.create(model="gpt-4o-mini", input="Bounded", max_output_tokens=20)
    sent = last_upstream(sim)["body"]
    assert sent["max_output_tokens"] == 20
    assert sent["model"] == "gpt-4o-mini"  # the member's upstream deployment


def test_calls_by_id_reach_the_response_and_hide_the_upstream_id(
    client: openai.OpenAI, sim: Simulator
) -> None:
    created = client.responses.create(model="gpt-4o-mini", input="Remember this.")
    fetched = client.responses.retrieve(created.id)
    upstream_id = last_upstream(sim)["path"].rsplit("/", 1)[1]
    assert upstream_id.startswith("resp_") and upstream_id != created.id
    assert fetched.id == created.id and fetched.output_text == created.output_text
    assert upstream_id not in fetched.model_dump_json()
    items = list(client.responses.input_items.list(created.id))
    assert [i.content[0].text for i in items] == ["Remember this."]
    follow = client.responses.create(
        model="gpt-4o-mini", input="And now?", previous_response_id=created.id
    )
    assert follow.previous_response_id == created.id
    assert follow.usage is not None and follow.usage.input_tokens > created.usage.total_tokens
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(created.id)
    assert created.id in gone.value.message and upstream_id not in gone.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.create(model="gpt-4o-mini", input="Again", previous_response_id=created.id)
    assert upstream_id not in str(unknown.value.body)


def test_another_attendee_gets_404_for_a_response(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    mine = v1(host.base, event.key)
    created = mine.responses.create(model="gpt-4o-mini", input="Private.")
    other = v1(host.base, event.add_attendee("other@example.com")["api_key"])
    for attempt in (
        lambda: other.responses.retrieve(created.id),
        lambda: other.responses.delete(created.id),
        lambda: list(other.responses.input_items.list(created.id)),
        lambda: other.responses.cancel(created.id),
        lambda: other.responses.create(
            model="gpt-4o-mini", input="Peek", previous_response_id=created.id
        ),
        lambda: mine.responses.retrieve("resp_" + "A" * 40),  # not an id this proxy made
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert refused.value.code == "not_found"
    assert mine.responses.retrieve(created.id).id == created.id
    assert len(storage.usage(event.id, expect=2, timeout=1)) == 1  # refusals are not calls


def test_background_response_is_created_then_polled_and_recorded_once(
    client: openai.OpenAI, event: EventSetup, storage: Storage
) -> None:
    started = client.responses.create(
        model="gpt-4o-mini", input="Later [sim:background_ms=300]", background=True
    )
    assert started.status == "queued" and started.usage is None
    done = wait_for(
        lambda: (r := client.responses.retrieve(started.id)).status == "completed" and r
    )
    assert done and done.id == started.id and done.usage is not None
    again = client.responses.retrieve(started.id)
    assert again.usage == done.usage
    create, result = sorted(storage.usage(event.id, expect=2), key=lambda r: r["outcome"])
    assert create["outcome"] == "background" and create["total_tokens"] == 0
    assert result["outcome"] == "background_result"
    assert result["prompt_tokens"] == done.usage.input_tokens
    assert result["completion_tokens"] == done.usage.output_tokens
    assert len(storage.usage(event.id, expect=3, timeout=1)) == 2  # polls add nothing
    slow = client.responses.create(
        model="gpt-4o-mini", input="Never mind [sim:background_ms=60000]", background=True
    )
    assert client.responses.cancel(slow.id).status == "cancelled"


def test_a_background_response_can_be_streamed_again_by_id(
    client: openai.OpenAI, event: EventSetup, storage: Storage
) -> None:
    started = client.responses.create(
        model="gpt-4o-mini", input="Replay [sim:background_ms=50 tokens=4]", background=True
    )
    wait_for(lambda: client.responses.retrieve(started.id).status == "completed")
    events = list(client.responses.retrieve(started.id, stream=True))
    assert [e.type for e in events].count("response.output_text.delta") == 4
    assert events[0].response.id == events[-1].response.id == started.id
    outcomes = sorted(r["outcome"] for r in storage.usage(event.id, expect=2))
    assert outcomes == ["background", "background_result"]


def test_a_cut_stream_ends_with_an_error_event_and_a_cut_record(
    client: openai.OpenAI, event: EventSetup, storage: Storage
) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIError) as cut:
        for item in client.responses.create(
            model="gpt-4o-mini", input="Cut [sim:tokens=9 cut_after=3]", stream=True
        ):
            received.append(item.type)
    assert "cut the stream" in cut.value.message
    assert received.count("response.output_text.delta") == 3
    [record] = storage.usage(event.id, expect=1)
    assert record["outcome"] == "cut" and record["status"] == 502
    assert record["estimated"] is True and record["completion_tokens"] == 3


def test_bad_requests_get_the_contracts_error_shape(host: AppHost, event: EventSetup) -> None:
    def post(body: object) -> dict[str, Any]:
        answer = host.http.post("/openai/v1/responses", json=body, headers={"api-key": event.key})
        assert answer.status_code in (400, 404), answer.text
        return answer.json()["error"]

    assert post({"input": "no model"})["param"] == "model"
    assert post({"model": "nope", "input": "x"})["code"] == "deployment_not_found"
    assert post({"model": "gpt-4o-mini", "input": "x", "stream": "yes"})["param"] == "stream"
    assert post({"model": "gpt-4o-mini", "input": "x", "max_output_tokens": 0})["code"] == (
        "invalid_request"
    )
    assert post({"model": "gpt-4o-mini", "input": "x", "previous_response_id": 7})["param"] == (
        "previous_response_id"
    )
    assert post([1, 2])["code"] == "invalid_request"


def test_a_streamed_background_response_is_recorded_once_however_often_it_is_fetched(
    client: openai.OpenAI, event: EventSetup, storage: Storage
) -> None:
    events = list(
        client.responses.create(
            model="gpt-4o-mini", input="Both [sim:tokens=5]", background=True, stream=True
        )
    )
    final = events[-1].response
    assert final.status == "completed" and final.usage is not None
    for _ in range(3):
        assert client.responses.retrieve(final.id).usage == final.usage
    records = storage.usage(event.id, expect=3, timeout=1.5)
    assert sorted(r["outcome"] for r in records) == ["background", "background_result"]
    assert sum(r["total_tokens"] for r in records) == final.usage.total_tokens
