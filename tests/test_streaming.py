"""Streams pass through chunk by chunk and are metered exactly."""

from __future__ import annotations

import time

import openai
import pytest

from tests.harness import AppHost, EventSetup, Simulator, Storage

pytestmark = pytest.mark.e2e  # streams through the host stand-in and the worker's HTTP server


def client(host: AppHost, key: str, api_version: str = "2024-10-21") -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=key, api_version=api_version, max_retries=0
    )


def test_first_chunk_arrives_while_the_upstream_is_still_producing(
    host: AppHost, event: EventSetup
) -> None:
    # 10 tokens at 150 ms each: the upstream needs about 1.5 s for the whole answer.
    messages = [{"role": "user", "content": "[sim:tokens=10 latency_ms_per_token=150] go"}]
    started = time.perf_counter()
    arrivals = []
    for chunk in client(host, event.key).chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
    assert len(arrivals) == 10
    assert arrivals[-1] > 1.3  # the upstream really took its time
    assert arrivals[0] < arrivals[-1] - 1.0  # and the first words came long before the last


def test_usage_chunk_is_hidden_from_a_client_that_did_not_ask(
    host: AppHost, event: EventSetup, sim: Simulator, storage: Storage
) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    chunks = list(
        client(host, event.key).chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True, max_tokens=9
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices or c.prompt_filter_results for c in chunks)  # no empty usage chunk
    upstream_body = sim.stats()["last_requests"][-1]["body"]
    assert upstream_body["stream_options"] == {"include_usage": True}  # asked on their behalf
    [record] = storage.usage(event.id, expect=1)
    assert record["completion_tokens"] == 9
    assert (
        record["prompt_tokens"] == 12
    )  # 3 + (3 + user + 5 content tokens) + 1... as counted upstream
    assert record["estimated"] is False
    assert record["streamed"] is True


def test_client_that_asked_for_usage_gets_the_usage_chunk(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    chunks = list(
        client(host, event.key).chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,
            stream=True,
            max_tokens=7,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    [record] = storage.usage(event.id, expect=1)
    assert record["completion_tokens"] == 7
    assert record["total_tokens"] == chunks[-1].usage.total_tokens


def test_old_api_version_is_not_sent_stream_options_and_the_record_is_estimated(
    host: AppHost, event: EventSetup, sim: Simulator, storage: Storage
) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client(host, event.key, api_version="2024-06-01").chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True, max_tokens=8
        )
        if c.choices
    )
    assert "stream_options" not in sim.stats()["last_requests"][-1]["body"]
    [record] = storage.usage(event.id, expect=1)
    assert record["estimated"] is True
    assert record["completion_tokens"] == 8  # tiktoken count of the streamed text
    assert text


def test_stream_cut_by_upstream_makes_the_sdk_raise_and_is_recorded(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    messages = [{"role": "user", "content": "[sim:cut_after=3 tokens=10] go"}]
    received = []
    try:
        for chunk in client(host, event.key).chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    except openai.APIError as exc:
        error = exc
    else:
        raise AssertionError("a cut stream ended cleanly")
    assert "cut the stream" in str(error)
    assert len(received) == 3
    [record] = storage.usage(event.id, expect=1)
    assert record["outcome"] == "cut"
    assert record["status"] == 502
    assert record["completion_tokens"] == 3  # estimated from what did arrive
    assert record["estimated"] is True


def test_client_that_goes_away_cancels_the_upstream_and_is_recorded(
    host: AppHost, event: EventSetup, sim: Simulator, storage: Storage
) -> None:
    closed_before = sim.stats()["by_status"].get("client_closed", 0)
    logged_before = len(host.log())
    body = {
        "messages": [{"role": "user", "content": "[sim:tokens=60 latency_ms_per_token=100] go"}],
        "stream": True,
    }
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    contents = 0
    with host.http.stream("POST", path, json=body, headers={"api-key": event.key}) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                contents += 1
            if contents == 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 5
    while sim.stats()["by_status"].get("client_closed", 0) == closed_before:
        assert time.monotonic() < deadline, "the upstream request was not cancelled"
        time.sleep(0.1)
    [record] = storage.usage(event.id, expect=1)
    assert record["outcome"] == "client_gone"
    assert 3 <= record["completion_tokens"] < 60  # what was streamed before the client left
    assert record["estimated"] is True
    assert "Traceback" not in host.log()[logged_before:]  # a client leaving is no server error


def test_stream_that_stalls_past_the_idle_timeout_is_ended_with_an_error(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    # The test dev host allows 3 s of silence; this upstream waits 4 s between tokens.
    messages = [{"role": "user", "content": "[sim:tokens=3 latency_ms_per_token=4000] go"}]
    started = time.perf_counter()
    try:
        for _ in client(host, event.key).chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True
        ):
            pass
    except openai.APIError as exc:
        assert "cut the stream" in str(exc)
    else:
        raise AssertionError("a stalled stream ended cleanly")
    assert time.perf_counter() - started < 8.5  # ended by the idle timeout, not by the upstream
    [record] = storage.usage(event.id, expect=1)
    assert record["outcome"] == "cut"


def test_estimate_without_upstream_usage_is_within_ten_percent_for_english(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    text = (
        "Plan a two day workshop for forty students who are new to machine learning. "
        "Include short lectures, hands-on exercises with notebooks, a small team project, "
        "and a final demo session where every team presents what it built."
    )
    exact = client(host, event.key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], max_tokens=30
    )
    assert exact.usage is not None
    messages = [{"role": "user", "content": text + " [sim:no_usage]"}]
    list(
        client(host, event.key).chat.completions.create(
            model="gpt-4o-mini", messages=messages, max_tokens=30, stream=True
        )
    )
    plain, streamed = storage.usage(event.id, expect=2)
    assert plain["estimated"] is False and streamed["estimated"] is True
    directive_tokens = 6  # " [sim:no_usage]" is in the streamed prompt only
    estimate = streamed["total_tokens"] - directive_tokens
    assert abs(estimate - exact.usage.total_tokens) <= 0.10 * exact.usage.total_tokens
