"""A deployment near its quota is shared fairly: an attendee looping from six threads is held
to their share, and one calling once a second keeps getting through (before: 1 call of 10)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.governance.fairshare import water_level
from tests.harness import CHAT, AppHost, EventSetup, Simulator

HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
QUOTA = 30  # requests per minute of the simulated deployment


@pytest.fixture
def quota_sim(log_dir: Path) -> Iterator[Simulator]:
    """A deployment that refuses, as Azure does, past 30 requests in any minute."""
    server = Simulator(log_dir, name="quota", quota_requests_per_minute=QUOTA)
    yield server
    server.stop()


def quota_event(host: AppHost, sim: Simulator, **quota: int) -> tuple[EventSetup, str, str]:
    """An event whose chat deployment is on `sim`; its resource gets `quota`. Two keys."""
    setup = EventSetup(host, sim, daily_request_cap=100_000)
    chat = next(i for i, r in setup.resources.items() if r["model_class"] == "openai-chat")
    if quota:
        assert host.manage.patch(f"/resources/{chat}", json=quota).status_code == 200
    light = setup.add_attendee("light@example.com")["api_key"]
    return setup, setup.key, light


def run_scenario(heavy_hosts: list[AppHost], light_hosts: list[AppHost], heavy: str, light: str
                 ) -> tuple[Counter[Any], list[int]]:  # fmt: skip
    """One attendee loops from six threads for 12 s while another calls once a second, ten
    times; returns the looping one's outcomes and the light one's statuses."""
    outcomes: Counter[Any] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + 12
    light_statuses: list[int] = []

    def loop(index: int) -> None:
        host = heavy_hosts[index % len(heavy_hosts)]
        with httpx.Client(base_url=host.base, timeout=30) as client:
            while time.monotonic() < stop:
                answer = client.post(CHAT, json=HELLO, headers={"api-key": heavy})
                code = answer.json()["error"]["code"] if answer.status_code != 200 else "ok"
                with lock:
                    outcomes[code] += 1

    def calls() -> None:
        start = time.monotonic()
        for i in range(10):
            host = light_hosts[i % len(light_hosts)]
            answer = httpx.post(f"{host.base}{CHAT}", json=HELLO, headers={"api-key": light},
                                timeout=30)  # fmt: skip
            light_statuses.append(answer.status_code)
            time.sleep(max(0.0, start + i + 1 - time.monotonic()))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(6)]
    threads.append(threading.Thread(target=calls))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes, light_statuses


@pytest.mark.slow
def test_a_light_user_keeps_getting_through_while_another_loops(
    host: AppHost, quota_sim: Simulator
) -> None:
    _, heavy, light = quota_event(host, quota_sim, quota_requests_per_minute=QUOTA)
    outcomes, light_statuses = run_scenario([host], [host], heavy, light)
    through = light_statuses.count(200)
    assert through >= 9, light_statuses  # before fair shares: 1 of 10
    # The looping attendee reached half the quota, the equal share of two, before the level
    # (one share each for the two of them and for a newcomer) held it there.
    assert outcomes["ok"] >= QUOTA // 2 - 1, outcomes
    assert outcomes["ok"] + through <= QUOTA
    assert set(outcomes) == {"ok", "rate_limit_exceeded"}, outcomes
    assert quota_sim.stats()["by_status"].get("429", 0) == 0  # the upstream never had to refuse


@pytest.mark.slow
def test_the_quota_announced_by_the_upstream_is_shared_too(
    host: AppHost, quota_sim: Simulator
) -> None:
    setup, heavy, light = quota_event(host, quota_sim)  # no quota on the resource
    # The organiser tries the deployment first: its answer announces the quota.
    organiser = setup.add_attendee("organiser@example.com")["api_key"]
    tried = host.http.post(CHAT, json=HELLO, headers={"api-key": organiser})
    assert tried.headers["x-ratelimit-limit-requests"] == str(QUOTA)
    outcomes, light_statuses = run_scenario([host], [host], heavy, light)
    assert light_statuses.count(200) >= 9, light_statuses
    assert outcomes["ok"] >= 10, outcomes


@pytest.mark.slow
def test_events_sharing_a_deployment_share_its_quota(host: AppHost, quota_sim: Simulator) -> None:
    setup, heavy, _ = quota_event(host, quota_sim, quota_requests_per_minute=QUOTA)
    chat = next(i for i, r in setup.resources.items() if r["model_class"] == "openai-chat")
    other = EventSetup(host, quota_sim, name="Another workshop")
    for resource_id, resource in other.resources.items():  # its chat deployment: the same one
        if resource["model_class"] == "openai-chat":
            host.manage.delete(f"/events/{other.id}/resources/{resource_id}")
    assert host.manage.put(f"/events/{other.id}/resources/{chat}").status_code == 200
    outcomes, light_statuses = run_scenario([host], [host], heavy, other.key)
    assert light_statuses.count(200) >= 9, light_statuses
    assert outcomes["ok"] >= QUOTA // 2 - 1, outcomes
    assert quota_sim.stats()["by_status"].get("429", 0) == 0


def test_water_level_gives_equal_shares_and_leaves_light_users_room() -> None:
    assert water_level(30, []) == 30  # nobody yet: a newcomer may use it all
    assert water_level(30, [20]) == 15  # one attendee and room for one more
    assert water_level(30, [15, 1]) == 14.5  # the light one's unused share goes to the others
    assert water_level(30, [15, 10]) == 10
    assert water_level(30, [2, 2, 2, 30]) == 12


@pytest.mark.slow
@pytest.mark.e2e
def test_fair_share_holds_across_two_instances(
    host: AppHost, second_host: AppHost, quota_sim: Simulator
) -> None:
    _, heavy, light = quota_event(host, quota_sim, quota_requests_per_minute=QUOTA)
    both = [host, second_host]
    outcomes, light_statuses = run_scenario(both, both, heavy, light)
    assert light_statuses.count(200) >= 9, light_statuses
    assert outcomes["ok"] >= 10, outcomes
    assert quota_sim.stats()["by_status"].get("429", 0) == 0
