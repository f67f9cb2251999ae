"""Every proxied request appends one usage record with the upstream's token counts."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest

from shared.platform.tables import Tables
from tests.harness import CHAT, AppHost, EventSetup, Storage, wait_until


def test_plain_chat_record_matches_the_reply_usage(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=event.key, api_version="2024-10-21", max_retries=0
    )
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Count to five."}], max_tokens=6
    )
    [record] = storage.usage(event.id, expect=1)
    chat_resource = next(i for i, r in event.resources.items() if r["model_class"] == "openai-chat")
    assert reply.usage is not None
    assert record["prompt_tokens"] == reply.usage.prompt_tokens
    assert record["completion_tokens"] == reply.usage.completion_tokens == 6
    assert record["total_tokens"] == reply.usage.total_tokens
    assert record["deployment"] == "gpt-4o-mini"
    assert record["resource_id"] == chat_resource
    assert record["model_class"] == "openai-chat"
    assert record["attendee_id"] == event.attendee["id"]
    assert record["status"] == 200
    assert record["outcome"] == "ok"
    assert record["streamed"] is False and record["estimated"] is False
    assert record["latency_ms"] > 0
    assert record["PartitionKey"] == f"{event.id}_{record['local_date']}"


def test_embeddings_record_counts_input_tokens(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    client = openai.OpenAI(base_url=f"{host.base}/openai/v1", api_key=event.key, max_retries=0)
    reply = client.embeddings.create(model="text-embedding-3-small", input="the quick brown fox")
    [record] = storage.usage(event.id, expect=1)
    assert record["prompt_tokens"] == reply.usage.prompt_tokens == 4
    assert record["completion_tokens"] == 0
    assert record["model_class"] == "openai-embeddings"


def test_upstream_refusal_is_recorded_with_its_status(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "[sim:content_filter]"}]}
    assert host.http.post(path, json=body, headers={"api-key": event.key}).status_code == 400
    [record] = storage.usage(event.id, expect=1)
    assert record["status"] == 400
    assert record["outcome"] == "upstream_status"
    assert record["total_tokens"] == 0


def test_refused_requests_write_no_record(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}
    assert host.http.post(path, json=body, headers={"api-key": event.key}).status_code == 400
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert host.http.post(path, json=ok, headers={"api-key": event.key}).status_code == 200
    [record] = storage.usage(event.id, expect=1)
    assert record["completion_tokens"] == 2
    # The refusal came first, so a record of it would be there by now; none comes in 2 s more.
    assert len(storage.usage(event.id, expect=2, timeout=2)) == 1


def test_no_byte_of_an_answer_leaves_before_the_calls_entry_is_stored(
    host: AppHost, event: EventSetup, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage slower than the upstream: the answer waits for the call's entry in flight (its
    provisional record), which is then deleted once the call has its one record."""
    insert_batch = Tables.insert_batch

    async def slow(self: Tables, table: str, entities: list[dict[str, Any]]) -> None:
        if table == "inflight":
            await asyncio.sleep(0.5)
        await insert_batch(self, table, entities)

    monkeypatch.setattr(Tables, "insert_batch", slow)
    body = {
        "messages": [{"role": "user", "content": "hi [sim:latency_ms_per_token=100]"}],
        "max_tokens": 5,
        "stream": True,
    }
    with host.http.stream("POST", CHAT, json=body, headers={"api-key": event.key}) as answer:
        request_id = answer.headers["x-aiproxy-request-id"]  # its first bytes are here
        [entry] = storage.rows("inflight", f"RowKey eq '{request_id}'")
        for _ in answer.iter_bytes():
            pass
    provisional = orjson.loads(entry["record"])
    assert provisional["estimated"] is True and provisional["outcome"] == "worker_lost"
    assert provisional["completion_tokens"] == 5 and provisional["request_id"] == request_id
    [record] = storage.usage(event.id, expect=1)
    assert record["request_id"] == request_id
    assert record["estimated"] is False and record["completion_tokens"] == 5
    wait_until(lambda: not storage.rows("inflight", f"RowKey eq '{request_id}'"))
