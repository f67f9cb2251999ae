"""A deployment near its quota is shared fairly: an attendee looping from six threads is held
to their share, and one calling once a second keeps getting through (before: 1 call of 10).
In this process the seconds are the app's clock, moved instead of waited for."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.governance.fairshare import water_level
from tests.harness import CHAT, App, AppHost, EventSetup, Simulator, StandIns, wait_until
from tests.inprocess import Configured

HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
QUOTA = 30  # requests per minute of the simulated deployment


@pytest.fixture
def quota_sim(log_dir: Path) -> Iterator[Simulator]:
    """A deployment that refuses, as Azure does, past 30 requests in any minute."""
    server = Simulator(log_dir, name="quota", quota_requests_per_minute=QUOTA)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app(configured: Configured) -> tuple[App, StandIns]:
    """The app with a clock the tests move."""
    return configured.with_standins("fairshare")


@pytest.fixture
def move(app: tuple[App, StandIns]) -> Iterator[Callable[[float], None]]:
    """Moves the app's clock forward by some seconds; the real time again after the test."""
    control = app[1]
    moved = 0.0

    def forward(seconds: float) -> None:
        nonlocal moved
        moved += seconds
        control.travel_to((datetime.now(UTC) + timedelta(seconds=moved)).isoformat())

    yield forward
    control.reset()


def quota_event(host: App, sim: Simulator, **quota: int) -> tuple[EventSetup, str, str]:
    """An event whose chat deployment is on `sim`; its resource gets `quota`. Two keys."""
    setup = EventSetup(host, sim, daily_request_cap=100_000)
    chat = next(i for i, r in setup.resources.items() if r["model_class"] == "openai-chat")
    if quota:
        assert host.manage.patch(f"/resources/{chat}", json=quota).status_code == 200
    light = setup.add_attendee("light@example.com")["api_key"]
    return setup, setup.key, light


def run_scenario(heavy_hosts: list[App], light_hosts: list[App], heavy: str, light: str,
                 move: Callable[[float], None] | None = None) -> tuple[Counter[Any], list[int]]:  # fmt: skip
    """One attendee loops from six threads for 12 s while another calls once a second, ten
    times; returns the looping one's outcomes and the light one's statuses.

    With `move`, the seconds are the app's clock's: the light one moves it a second ahead
    instead of waiting one, once the looping one has called at least six times since its last
    call, and the loop stops once it called again after the clock passed the 12 s."""
    outcomes: Counter[Any] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + 12
    done = threading.Event()
    light_statuses: list[int] = []

    def made() -> int:
        with lock:
            return sum(outcomes.values())

    def looping() -> bool:
        return not done.is_set() if move else time.monotonic() < stop

    def loop(index: int) -> None:
        host = heavy_hosts[index % len(heavy_hosts)]
        with httpx.Client(base_url=host.base, timeout=30) as client:
            while looping():
                answer = client.post(CHAT, json=HELLO, headers={"api-key": heavy})
                code = answer.json()["error"]["code"] if answer.status_code != 200 else "ok"
                with lock:
                    outcomes[code] += 1
                time.sleep(0.05)  # up to 120 calls a second from the six: a loop, not a CPU burn

    def calls() -> None:
        start = time.monotonic()
        for i in range(10):
            if move is not None:
                before = made()
                wait_until(lambda: made() >= before + 6, timeout=30)  # noqa: B023
            host = light_hosts[i % len(light_hosts)]
            answer = httpx.post(f"{host.base}{CHAT}", json=HELLO, headers={"api-key": light},
                                timeout=30)  # fmt: skip
            light_statuses.append(answer.status_code)
            if move is not None:
                move(1.0)
            else:
                time.sleep(max(0.0, start + i + 1 - time.monotonic()))
        if move is not None:
            move(2.0)
            before = made()
            wait_until(lambda: made() >= before + 6, timeout=30)
            done.set()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(6)]
    threads.append(threading.Thread(target=calls))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes, light_statuses


@pytest.mark.slow
def test_a_light_user_keeps_getting_through_while_another_loops(
    host: App, quota_sim: Simulator, move: Callable[[float], None]
) -> None:
    _, heavy, light = quota_event(host, quota_sim, quota_requests_per_minute=QUOTA)
    outcomes, light_statuses = run_scenario([host], [host], heavy, light, move)
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
    host: App, quota_sim: Simulator, move: Callable[[float], None]
) -> None:
    setup, heavy, light = quota_event(host, quota_sim)  # no quota on the resource
    # The organiser tries the deployment first: its answer announces the quota.
    organiser = setup.add_attendee("organiser@example.com")["api_key"]
    tried = host.http.post(CHAT, json=HELLO, headers={"api-key": organiser})
    assert tried.headers["x-ratelimit-limit-requests"] == str(QUOTA)
    outcomes, light_statuses = run_scenario([host], [host], heavy, light, move)
    assert light_statuses.count(200) >= 9, light_statuses
    assert outcomes["ok"] >= 10, outcomes


@pytest.mark.slow
def test_events_sharing_a_deployment_share_its_quota(
    host: App, quota_sim: Simulator, move: Callable[[float], None]
) -> None:
    setup, heavy, _ = quota_event(host, quota_sim, quota_requests_per_minute=QUOTA)
    chat = next(i for i, r in setup.resources.items() if r["model_class"] == "openai-chat")
    other = EventSetup(host, quota_sim, name="Another workshop")
    for resource_id, resource in other.resources.items():  # its chat deployment: the same one
        if resource["model_class"] == "openai-chat":
            host.manage.delete(f"/events/{other.id}/resources/{resource_id}")
    assert host.manage.put(f"/events/{other.id}/resources/{chat}").status_code == 200
    outcomes, light_statuses = run_scenario([host], [host], heavy, other.key, move)
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
