"""A conversation stays on the pool member that holds it, from any instance, at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.harness import AppHost, EventSetup, Simulator

pytestmark = pytest.mark.e2e  # two app instances


@pytest.fixture(scope="module")
def sims(log_dir: Path) -> Iterator[tuple[Simulator, Simulator]]:
    east, west = Simulator(log_dir, name="east"), Simulator(log_dir, name="west")
    yield east, west
    east.stop()
    west.stop()


@pytest.fixture
def pool(host: AppHost, sims: tuple[Simulator, Simulator]) -> EventSetup:
    """gpt-4o-mini on two separate simulated Azure OpenAI resources."""
    east, west = sims
    east.reset()
    west.reset()
    event = EventSetup(host, east, name="Affinity")
    event.add_resource(west.url, "gpt-4o-mini", "openai-chat")
    return event


def responses_on(sim: Simulator) -> int:
    return sim.stats()["by_deployment"].get("gpt-4o-mini", {}).get("responses", 0)


def clients(hosts: list[AppHost], key: str) -> list[openai.OpenAI]:
    return [
        openai.OpenAI(base_url=f"{hosts[0].base}/openai/v1", api_key=key, max_retries=0),
        openai.AzureOpenAI(
            azure_endpoint=hosts[1].base,
            api_key=key,
            api_version="2025-04-01-preview",
            max_retries=0,
        ),
    ]


def test_a_chain_of_eight_over_two_members_and_two_instances_all_succeeds(
    host: AppHost,
    second_host: AppHost,
    pool: EventSetup,
    sims: tuple[Simulator, Simulator],
) -> None:
    instances = clients([host, second_host], pool.key)
    # Without affinity the pool's round-robin spreads fresh conversations over both resources.
    for n in range(8):
        instances[n % 2].responses.create(model="gpt-4o-mini", input=f"Fresh {n}")
    before = [responses_on(s) for s in sims]
    assert sum(before) == 8 and min(before) >= 1, before
    previous: Any = None
    for n in range(8):
        reply = instances[n % 2].responses.create(
            model="gpt-4o-mini",
            input=f"Step {n}",
            previous_response_id=previous.id if previous else openai.omit,
        )
        assert reply.status == "completed"
        if previous is not None:
            assert reply.previous_response_id == previous.id
            assert (
                reply.usage is not None and reply.usage.input_tokens > previous.usage.total_tokens
            )
        previous = reply
    grown = [responses_on(s) - b for s, b in zip(sims, before, strict=True)]
    assert sorted(grown) == [0, 8], grown  # the whole chain on the member of its first call
    # Every call by id goes there too, from either instance.
    for client in instances:
        assert client.responses.retrieve(previous.id).output_text == previous.output_text


def test_reasoning_items_go_back_to_the_member_that_encrypted_them(
    host: AppHost,
    second_host: AppHost,
    pool: EventSetup,
    sims: tuple[Simulator, Simulator],
) -> None:
    instances = clients([host, second_host], pool.key)
    context: list[Any] = []
    for n in range(4):  # stateless: store off, encrypted reasoning carried by the client
        context.append({"role": "user", "content": f"Turn {n}"})
        reply = instances[n % 2].responses.create(
            model="gpt-4o-mini",
            input=context,
            store=False,
            reasoning={"effort": "low"},
            include=["reasoning.encrypted_content"],
        )
        reasoning = [item for item in reply.output if item.type == "reasoning"]
        assert reasoning and reasoning[0].encrypted_content
        context += [item.model_dump(exclude_none=True) for item in reply.output]
    assert sorted(responses_on(s) for s in sims) == [0, 4]
    forged = [dict(context[1], encrypted_content="aip1.bm90IG91cnM.eyJzaW0iOiAid2VzdCJ9")]
    with pytest.raises(openai.BadRequestError) as refused:
        instances[0].responses.create(model="gpt-4o-mini", input=forged, store=False)
    assert refused.value.code == "invalid_request"


def test_a_cooling_member_is_reported_and_never_replaced(
    host: AppHost, pool: EventSetup, sims: tuple[Simulator, Simulator]
) -> None:
    client = clients([host, host], pool.key)[0]
    first = client.responses.create(model="gpt-4o-mini", input="Start")
    holder, other = sorted(sims, key=responses_on, reverse=True)
    before = responses_on(other)
    holder.configure(status=429, retry_after=7)
    try:
        answer = httpx.post(
            f"{host.base}/openai/v1/responses",
            json={"model": "gpt-4o-mini", "input": "Go on", "previous_response_id": first.id},
            headers={"api-key": pool.key},
            timeout=30,
        )
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "no_capacity"
        assert 1 <= int(answer.headers["retry-after"]) <= 7
        # While it cools down nothing more is sent to it, and nothing to the other member.
        again = httpx.get(
            f"{host.base}/openai/v1/responses/{first.id}",
            headers={"api-key": pool.key},
            timeout=30,
        )
        assert again.status_code == 429 and again.json()["error"]["code"] == "no_capacity"
        assert responses_on(other) == before
        # A fresh conversation is not pinned: it goes to the other member.
        assert client.responses.create(model="gpt-4o-mini", input="New").status == "completed"
        assert responses_on(other) == before + 1
    finally:
        holder.configure(status=None, retry_after=None)


def test_sealed_ids_open_only_with_the_apps_key_and_never_change() -> None:
    from shared.upstreams.affinity import AffinitySeal

    seal, other = AffinitySeal("key one"), AffinitySeal("key two")
    upstream = "resp_68af4030592c81938ec0a5fbab4a3e9f05438e46b5f69a3b"
    proxy_id = seal.seal_id(upstream, "0123456789abcdef", "fedcba9876543210")
    assert proxy_id.startswith("resp_") and upstream[5:] not in proxy_id
    assert seal.seal_id(upstream, "0123456789abcdef", "fedcba9876543210") == proxy_id
    opened = seal.open_id(proxy_id)
    assert opened is not None
    assert (opened.resource_id, opened.attendee_id, opened.upstream_id) == (
        "0123456789abcdef",
        "fedcba9876543210",
        upstream,
    )
    assert other.open_id(proxy_id) is None
    assert seal.open_id(proxy_id[:-2] + ("AA" if proxy_id[-2:] != "AA" else "BB")) is None
    assert seal.open_id(upstream) is None and seal.open_id("resp_") is None
    odd = seal.seal_id("resp-Not_Hex.42", "r1", "a1")
    assert seal.open_id(odd) == type(opened)("r1", "a1", "resp-Not_Hex.42")
    tagged = seal.tag_content("gAAAAB-upstream-ciphertext", "0123456789abcdef", "a1")
    found = seal.open_content(tagged)
    assert found is not None and found[1] == "gAAAAB-upstream-ciphertext"
    assert found[0].resource_id == "0123456789abcdef"
    assert seal.open_content("gAAAAB-upstream-ciphertext") is None
    assert other.open_content(tagged) is None
