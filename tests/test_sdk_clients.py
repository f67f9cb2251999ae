"""The official openai SDK works through the proxy with only endpoint and key changed."""

from __future__ import annotations

import openai
import pytest

from tests.harness import API_VERSION, AppHost, EventSetup, Storage

pytestmark = pytest.mark.e2e  # the official SDKs through the host stand-in and the worker

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


def azure_client(host: AppHost, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=key, api_version=API_VERSION, max_retries=0
    )


def openai_client(host: AppHost, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{host.base}/openai/v1", api_key=key, max_retries=0)


@pytest.fixture(params=["AzureOpenAI", "OpenAI"])
def client(request: pytest.FixtureRequest, host: AppHost, event: EventSetup) -> openai.OpenAI:
    make = azure_client if request.param == "AzureOpenAI" else openai_client
    return make(host, event.key)


def test_chat_completion_answers_with_content_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=12)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streamed_chat_yields_chunks_that_join_into_the_answer(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=12, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 12
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_answer_text(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="gpt-35-turbo-instruct", prompt="Once upon a time", max_tokens=8
    )
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_streamed_completions_yield_text(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="gpt-35-turbo-instruct", prompt="Once upon a time", max_tokens=6, stream=True
        )
    )
    assert len([c for c in chunks if c.choices and c.choices[0].text]) == 6


def test_embeddings_return_one_vector_per_input(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(
        model="text-embedding-3-small", input=["first text", "second text"]
    )
    assert [d.index for d in reply.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in reply.data)
    assert reply.data[0].embedding != reply.data[1].embedding
    assert reply.usage.prompt_tokens == 4


def test_proxy_adds_a_request_id_and_passes_rate_limit_headers(
    host: AppHost, event: EventSetup
) -> None:
    raw = azure_client(host, event.key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=4
    )
    assert len(raw.headers["x-aiproxy-request-id"]) == 16
    assert raw.headers["x-ratelimit-remaining-requests"].isdigit()
    assert "x-sim-name" not in raw.headers  # upstream internals stay upstream
    assert raw.parse().usage.completion_tokens == 4


def test_both_sdk_styles_are_recorded_against_the_same_attendee(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    azure_client(host, event.key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=3
    )
    openai_client(host, event.key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
    )
    rows = storage.usage(event.id, expect=2)
    assert [r["completion_tokens"] for r in rows] == [3, 5]
    assert {r["attendee_id"] for r in rows} == {event.attendee["id"]}
