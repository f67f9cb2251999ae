"""The seed's layout: the proxy routes under /api/v1, and keys made of event, shared code and email."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.harness import AppHost, EventSetup, Simulator, Storage

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_azure_client_on_the_seed_endpoint_works_unchanged(
    host: AppHost, event: EventSetup, storage: Storage
) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=f"{host.base}/v1", api_key=event.key, api_version="2024-10-21", max_retries=0
    )
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=4, stream=True
        )
    )
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4
    vectors = client.embeddings.create(model="text-embedding-3-small", input="seed")
    assert len(vectors.data[0].embedding) == 8
    rows = storage.usage(event.id, expect=3)
    assert [r["completion_tokens"] for r in rows] == [5, 4, 0]
    assert {r["attendee_id"] for r in rows} == {event.attendee["id"]}


def test_openai_client_and_eventinfo_under_the_seed_prefix(
    host: AppHost, event: EventSetup
) -> None:
    client = openai.OpenAI(base_url=f"{host.base}/v1/openai/v1", api_key=event.key, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    info = host.http.get("/v1/eventinfo", headers={"api-key": event.key})
    assert info.status_code == 200 and info.json()["id"] == event.id
    refused = host.http.get("/v1/eventinfo", headers={"api-key": "aip-" + "x" * 32})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"


CODE = "seed/26@x"  # a code may hold '/' and '@': the key splits on the first '@', the last '/'


@pytest.fixture
def coded(host: AppHost, sim: Simulator) -> EventSetup:
    return EventSetup(host, sim, name="Seed workshop", shared_code=CODE)


def code_key(event: EventSetup, email: str, code: str = CODE) -> str:
    return f"{event.id}@{code}/{email}"


def users(event: EventSetup) -> list[str]:
    listed = event.host.manage.get(f"/events/{event.id}/attendees")
    assert listed.status_code == 200, listed.text
    return sorted(a["user"] for a in listed.json())


def test_a_shared_code_key_works_without_registration_and_creates_the_attendee_once(
    host: AppHost, coded: EventSetup, storage: Storage
) -> None:
    key = code_key(coded, "Grace@Example.com")
    clients = [
        openai.AzureOpenAI(
            azure_endpoint=f"{host.base}/v1", api_key=key, api_version="2024-10-21", max_retries=0
        )
        for _ in range(6)
    ]
    with ThreadPoolExecutor(6) as pool:  # first use from six callers at once
        replies = list(
            pool.map(
                lambda c: c.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=2
                ),
                clients,
            )
        )
    assert all(r.usage is not None and r.usage.completion_tokens == 2 for r in replies)
    assert users(coded) == ["attendee@example.com", "code:grace@example.com"]
    rows = storage.usage(coded.id, expect=6)
    assert len({r["attendee_id"] for r in rows}) == 1
    (grace,) = {r["attendee_id"] for r in rows}
    assert grace != coded.attendee["id"]
    # A key made of the code is an attendee of its own, apart from an email's issued one.
    issued = host.manage.get(f"/events/{coded.id}/attendees/{grace}").json()["api_key"]
    info = host.http.get("/eventinfo", headers={"authorization": f"Bearer {issued}"}).json()
    assert info["attendee"] == {"id": grace, "user": "code:grace@example.com"}
    # The key is kept nowhere: no table row holds it.
    for table in ("attendees", "keys", "events", "usage", "counters"):
        assert not [r for r in storage.rows(table) if key.lower() in str(r).lower()], table


def test_a_wrong_code_is_an_invalid_key_and_guessing_is_slowed(
    host: AppHost, coded: EventSetup, event: EventSetup
) -> None:
    def status(key: str) -> tuple[int, str]:
        answer = host.http.get("/eventinfo", headers={"api-key": key})
        return answer.status_code, answer.json()["error"]["code"]

    assert status(code_key(coded, "ada@example.com", "seed/27@x")) == (401, "invalid_api_key")
    assert status(code_key(event, "ada@example.com", "anything")) == (401, "invalid_api_key")
    assert status(f"{coded.id}@{CODE}/not-an-email") == (401, "invalid_api_key")
    assert status(f"{coded.id}@{CODE}") == (401, "invalid_api_key")
    for n in range(9):
        assert status(code_key(coded, "eve@example.com", f"guess{n}")) == (401, "invalid_api_key")
    assert status(code_key(coded, "eve@example.com", "guess10")) == (429, "too_many_failed_keys")
    assert "code:eve@example.com" not in users(coded)
    assert "code:ada@example.com" not in users(coded)


def test_a_revoked_code_key_is_refused(host: AppHost, coded: EventSetup) -> None:
    key = code_key(coded, "mallory@example.com")
    assert host.http.get("/eventinfo", headers={"api-key": key}).status_code == 200
    (mallory,) = [
        a for a in host.manage.get(f"/events/{coded.id}/attendees").json()
        if a["user"] == "code:mallory@example.com"
    ]  # fmt: skip
    assert host.manage.delete(f"/events/{coded.id}/attendees/{mallory['id']}").status_code == 200
    refused = host.http.get("/eventinfo", headers={"api-key": key})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "key_revoked"
