"""Deployment pools: weighted round-robin, priorities, failover with cooldowns, shared state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local.azurite import free_port
from tests.harness import HELLO, AppHost, EventSetup, Simulator, Storage, chat, wait_until

POOL = "/openai/deployments/pool/chat/completions?api-version=2024-10-21"


@pytest.fixture(scope="module")
def sims(log_dir: Path) -> Iterator[list[Simulator]]:
    servers = [Simulator(log_dir, name=f"pool{i}") for i in range(3)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def fresh(sims: list[Simulator]) -> list[Simulator]:
    for sim in sims:
        sim.reset()
    return sims


def pool_event(host: AppHost, sims: list[Simulator], members: list[dict[str, Any]]) -> EventSetup:
    """An event whose deployment 'pool' has one resource per entry, on sims[i]."""
    setup = EventSetup(host, sims[0], daily_request_cap=100_000)
    for member in members:
        index = member.pop("sim")
        setup.add_resource(sims[index].url, "pool", "openai-chat", **member)
    return setup


def served(sims: list[Simulator]) -> list[int]:
    return [sim.stats()["by_status"].get("200", 0) for sim in sims]


def test_weights_split_requests_proportionally(host: AppHost, fresh: list[Simulator]) -> None:
    setup = pool_event(
        host, fresh, [{"sim": 0, "weight": 1}, {"sim": 1, "weight": 1}, {"sim": 2, "weight": 2}]
    )
    for _ in range(400):
        assert chat(host, setup.key, HELLO, path=POOL).status_code == 200
    counts = served(fresh)
    assert sum(counts) == 400
    for count, expected in zip(counts, (100, 100, 200), strict=True):
        assert abs(count - expected) <= expected * 0.10, counts


def test_lower_priority_serves_only_while_the_higher_one_cools(
    host: AppHost, fresh: list[Simulator]
) -> None:
    setup = pool_event(host, fresh, [{"sim": 0, "priority": 1}, {"sim": 1, "priority": 2}])
    for _ in range(20):
        assert chat(host, setup.key, HELLO, path=POOL).status_code == 200
    assert served(fresh)[:2] == [20, 0]
    fresh[0].configure(status=429, retry_after_ms=1500)
    for _ in range(10):
        assert (
            chat(host, setup.key, HELLO, path=POOL).status_code == 200
        )  # failed over, the caller never knew
    fresh[0].configure(status=None, retry_after_ms=None)
    assert fresh[0].stats()["by_status"]["429"] == 1
    assert served(fresh)[1] == 10
    time.sleep(1.7)  # past the 1.5 s cooldown (a sleep is never shorter than asked)
    for _ in range(10):
        assert chat(host, setup.key, HELLO, path=POOL).status_code == 200
    assert served(fresh)[:2] == [30, 10]  # back on the provisioned deployment


def test_retry_after_ms_cools_a_member_for_exactly_that_long(
    host: AppHost, fresh: list[Simulator]
) -> None:
    setup = pool_event(host, fresh, [{"sim": 0}, {"sim": 1}])
    fresh[0].configure(status=429, retry_after_ms=2000)
    while fresh[0].stats()["by_status"].get("429", 0) == 0:
        # The member cools from when the proxy got its 429: after this call started, before
        # it ended (however long a busy machine makes that).
        sent_at = time.monotonic()
        assert chat(host, setup.key, HELLO, path=POOL).status_code == 200
        answered_at = time.monotonic()
    fresh[0].configure(status=None, retry_after_ms=None)
    before = fresh[0].stats()["total_requests"]
    sent = 0
    while time.monotonic() - sent_at < 1.8 and sent < 500:
        assert chat(host, setup.key, HELLO, path=POOL).status_code == 200
        sent += 1
        time.sleep(0.01)  # paced: the loop is bounded in requests as well as time
    assert sent >= 5
    assert fresh[0].stats()["total_requests"] == before  # nothing reached the cooled member
    time.sleep(max(0.0, 2.2 - (time.monotonic() - answered_at)))
    for _ in range(10):
        assert chat(host, setup.key, HELLO, path=POOL).status_code == 200
    assert fresh[0].stats()["total_requests"] - before >= 4  # used again after 2 s


@pytest.mark.e2e
def test_two_instances_continue_one_round_robin_sequence(
    host: AppHost, second_host: AppHost, fresh: list[Simulator], storage: Storage
) -> None:
    setup = pool_event(host, fresh, [{"sim": 0}, {"sim": 1}, {"sim": 2}])
    for i in range(300):
        assert chat(host if i % 2 else second_host, setup.key, HELLO, path=POOL).status_code == 200
    counts = served(fresh)
    assert all(abs(c - 100) <= 10 for c in counts), counts
    cursors = storage.rows(
        "cursors", f"PartitionKey ge '{setup.id}' and PartitionKey lt '{setup.id}~'"
    )
    assert len(cursors) == 1
    # Each instance leased whole cycles of 3, at least 256 positions (258), from one counter.
    assert cursors[0]["next"] % 258 == 0 and cursors[0]["next"] >= 2 * 258


@pytest.mark.e2e
def test_cooldown_reaches_the_other_instance_within_two_seconds(
    host: AppHost, second_host: AppHost, fresh: list[Simulator]
) -> None:
    setup = pool_event(host, fresh, [{"sim": 0}, {"sim": 1}])
    assert (
        chat(second_host, setup.key, HELLO, path=POOL).status_code == 200
    )  # second_host knows the pool
    fresh[0].configure(status=429, retry_after_ms=6000)
    while fresh[0].stats()["by_status"].get("429", 0) == 0:
        assert chat(host, setup.key, HELLO, path=POOL).status_code == 200
    fresh[0].configure(status=None, retry_after_ms=None)

    def host2_avoids_the_cooled_member() -> bool:  # round robin would send it every other call
        before = fresh[0].stats()["total_requests"]
        for _ in range(12):
            assert chat(second_host, setup.key, HELLO, path=POOL).status_code == 200
        return fresh[0].stats()["total_requests"] == before

    # Two syncs (about 2 s) bring second_host the cooldown; it must come well before its 6 s end.
    wait_until(host2_avoids_the_cooled_member, timeout=4)


def test_all_members_throttled_gives_no_capacity_with_the_soonest_retry_after(
    host: AppHost, fresh: list[Simulator]
) -> None:
    setup = pool_event(host, fresh, [{"sim": 0}, {"sim": 1}])
    fresh[0].configure(status=429, retry_after=5)
    fresh[1].configure(status=429, retry_after=9)
    response = chat(host, setup.key, HELLO, path=POOL)
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "no_capacity"
    assert response.headers["retry-after"] == "5"
    assert response.headers["x-aiproxy-request-id"]


def test_all_members_down_gives_upstream_error(host: AppHost, fresh: list[Simulator]) -> None:
    setup = EventSetup(host, fresh[0])
    for _ in range(2):
        setup.add_resource(f"http://127.0.0.1:{free_port()}", "pool", "openai-chat")
    response = chat(host, setup.key, HELLO, path=POOL)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


def test_all_members_failing_with_5xx_gives_upstream_error(
    host: AppHost, fresh: list[Simulator]
) -> None:
    setup = pool_event(host, fresh, [{"sim": 0}, {"sim": 1}])
    fresh[0].configure(status=500)
    fresh[1].configure(status=503)
    response = chat(host, setup.key, HELLO, path=POOL)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert [s.stats()["total_requests"] for s in fresh[:2]] == [1, 1]  # each tried once


@pytest.mark.slow
def test_all_members_slow_gives_upstream_timeout(host: AppHost, fresh: list[Simulator]) -> None:
    setup = pool_event(host, fresh, [{"sim": 0}, {"sim": 1}])
    body = {"messages": [{"role": "user", "content": "[sim:hang]"}]}
    response = chat(host, setup.key, body, path=POOL)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"

    def both_hung() -> bool:  # the simulator records a hang once it sees the proxy give up
        return [s.stats()["by_status"].get("hang", 0) for s in fresh[:2]] == [1, 1]

    wait_until(both_hung, timeout=10)


def test_failover_happens_before_any_byte_reaches_a_streaming_client(
    host: AppHost, fresh: list[Simulator]
) -> None:
    setup = pool_event(host, fresh, [{"sim": 0}, {"sim": 1}])
    fresh[0].configure(status=503, retry_after=3)
    fresh[1].configure(status=503, retry_after=3)
    fresh[2].reset()
    setup.add_resource(fresh[2].url, "pool", "openai-chat", priority=5)
    body = {**HELLO, "stream": True}
    with host.http.stream("POST", POOL, json=body, headers={"api-key": setup.key}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    assert text.rstrip().endswith("data: [DONE]")
    assert served(fresh)[2] == 1
