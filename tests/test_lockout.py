"""The lock-out counts only wrong attempts: a right key, code or event id always passes, even
from an address flooding wrong ones, while what the flood costs storage stays bounded.

The host stand-in, like Azure's front end, appends the connection's address to
X-Forwarded-For, so every call of a test comes from one client, an address of the test's own
(`own_address`): a classroom behind one address, where one person's wrong attempts are
everybody's. Each test starts from a fresh budget, in whatever order the tests run.
Storage lookups are counted in the run's Azurite's access log (one line per request it
served) on tables of this module's own, so the counts are what the worker really read."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from local.azurite import Azurite
from tests.harness import (
    API_VERSION,
    App,
    AppHost,
    ClientAddress,
    EventSetup,
    Simulator,
    TableReads,
    chat,
    unique_prefix,
    wait_until,
)
from tests.inprocess import Configured

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
CACHE_TTL = 2.0  # AIPROXY_CACHE_TTL_SECONDS in tests.harness.host_env
# The guard's defaults (shared/access/guard.py): wrong attempts before the budget, lookups/s.
THRESHOLD, LOOKUPS_PER_SECOND = 20, 2.0
CODE = "Sesame-Open-42"

pytestmark = pytest.mark.e2e  # the host stand-in adds the client address as Azure does


_tests_seen = [0]


@pytest.fixture(autouse=True)
def own_address(client_address: str) -> Iterator[str]:
    """A loopback address of this test's own (127.0.3.0/24): no test starts over a budget an
    earlier one spent, so none depends on the order the tests run in."""
    _tests_seen[0] += 1
    address = f"127.0.3.{_tests_seen[0] % 250 + 1}"
    ClientAddress.move_to(address)
    yield address
    ClientAddress.move_to(client_address)


@pytest.fixture(scope="module")
def guarded(configured: Configured) -> tuple[App, str]:
    """The app, on tables of this module's own whose reads the run's Azurite logs."""
    prefix = unique_prefix("lock")
    return configured("lockout", prefix=prefix), prefix


def burst(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """The calls sent at once: past its threshold an address gets 2 lookups a second, so a
    burst shows the throttle however slowly this machine answers one call after another."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def wrong_key() -> str:
    return "aip-" + secrets.token_hex(16)  # well formed: 32 letters and digits


def test_forty_wrong_keys_leave_a_right_key_working_after_its_cache_entry_aged(
    guarded: tuple[AppHost, str], azurite: Azurite, sim: Simulator
) -> None:
    host, prefix = guarded
    setup = EventSetup(host, sim)
    # The attendee's own client, the official SDK, from the flooding address.
    right = openai.AzureOpenAI(azure_endpoint=host.base, api_key=setup.key,
                               api_version=API_VERSION, max_retries=0,
                               http_client=host.http)  # fmt: skip
    assert chat(host, setup.key, BODY).status_code == 200  # cached from now on
    keys = TableReads(azurite, f"{prefix}keys")
    before = keys.settled()
    started = time.monotonic()
    answers = [chat(host, wrong_key(), BODY) for _ in range(THRESHOLD)]
    answers += burst([lambda: chat(host, wrong_key(), BODY) for _ in range(40 - THRESHOLD)])
    codes = [a.json()["error"]["code"] for a in answers]
    assert codes[:THRESHOLD] == ["invalid_api_key"] * THRESHOLD
    assert "too_many_failed_keys" in codes[THRESHOLD:]
    # The right key's cache entry ages past the TTL while the address is over its budget.
    aged = started + CACHE_TTL + 0.5
    wait_until(lambda: time.monotonic() > aged, timeout=CACHE_TTL + 5)
    sent = 40
    for _ in range(3):
        # Wrong keys until one is looked up: the address's next lookup is half a second away
        # when the right key comes (a guard in front of the lookup would refuse it).
        for _ in range(50):
            sent += 1
            wrong = chat(host, wrong_key(), BODY)
            if wrong.status_code == 401:
                break
            assert wrong.json()["error"]["code"] == "too_many_failed_keys"
            assert wrong.headers["retry-after"] == "1"
        answer = right.chat.completions.create(model="gpt-4o-mini", **BODY)  # raises if refused
        assert answer.choices and answer.usage is not None
    elapsed = time.monotonic() - started
    # Looked up are the first THRESHOLD unknown keys and then 2 a second at most; the right
    # key's own refreshes are one per TTL (at most 3 here).
    looked_up = keys.settled() - before
    bound = THRESHOLD + int(elapsed * LOOKUPS_PER_SECOND) + 1 + 3
    assert looked_up <= bound, (looked_up, elapsed)
    assert looked_up < sent


def test_a_wrong_key_sent_again_reads_no_storage(
    guarded: tuple[AppHost, str], azurite: Azurite
) -> None:
    host, prefix = guarded
    keys = TableReads(azurite, f"{prefix}keys")
    key = wrong_key()
    before = keys.settled()
    assert chat(host, key, BODY).json()["error"]["code"] == "invalid_api_key"
    assert keys.settled() == before + 1
    started = time.monotonic()
    wait_until(lambda: time.monotonic() > started + CACHE_TTL + 0.5, timeout=CACHE_TTL + 5)
    for _ in range(5):  # past the cache's TTL: still known as unknown
        assert chat(host, key, BODY).json()["error"]["code"] == "invalid_api_key"
    assert keys.settled() == before + 1


def test_ten_wrong_codes_leave_a_right_code_working(
    guarded: tuple[AppHost, str], sim: Simulator
) -> None:
    host, _ = guarded
    setup = EventSetup(host, sim, shared_code=CODE)
    for n in range(10):
        wrong = chat(host, f"{setup.id}@Guess-{n:04d}/mallory@example.com", BODY)
        assert wrong.json()["error"]["code"] == "invalid_api_key", wrong.text
    over = chat(host, f"{setup.id}@Guess-9999/mallory@example.com", BODY)
    assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_failed_keys"
    # A classmate behind the same address, with the right code: a code key and a registration.
    answer = chat(host, f"{setup.id}@{CODE}/ada@example.com", BODY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    registered = host.http.post(
        f"/events/{setup.id}/register",
        json={"email": "grace@example.com", "shared_code": CODE},
    )
    assert registered.status_code == 201, registered.text
    assert registered.json()["api_key"].startswith("aip-")
    wrong_again = host.http.post(
        f"/events/{setup.id}/register",
        json={"email": "eve@example.com", "shared_code": "Guess-0000"},
    )
    assert wrong_again.status_code == 429  # wrong ones stay refused


def test_random_event_ids_are_throttled_while_a_known_event_answers(
    guarded: tuple[AppHost, str], azurite: Azurite, sim: Simulator
) -> None:
    host, prefix = guarded
    setup = EventSetup(host, sim, shared_code=CODE)
    events = TableReads(azurite, f"{prefix}events")
    before = events.settled()
    started = time.monotonic()

    def page() -> httpx.Response:
        return host.http.get(f"/events/{secrets.token_hex(6)}")

    def register() -> httpx.Response:
        body = {"email": "x@example.com", "shared_code": CODE}
        return host.http.post(f"/events/{secrets.token_hex(6)}/register", json=body)

    statuses = [(page if n % 2 else register)() for n in range(THRESHOLD)]
    statuses += burst([page if n % 2 else register for n in range(60 - THRESHOLD)])
    codes = [r.json()["error"]["code"] for r in statuses]
    assert codes[:THRESHOLD] == ["not_found"] * THRESHOLD
    throttled = [r for r in statuses[THRESHOLD:] if r.status_code == 429]
    assert len(throttled) >= 25, codes
    assert {r.json()["error"]["code"] for r in throttled} == {"too_many_failed_keys"}
    assert "event ids" in throttled[0].json()["error"]["message"]
    # The known event, from the same address, whether cached here or not.
    for _ in range(3):
        page = host.http.get(f"/events/{setup.id}")
        assert page.status_code == 200 and page.json()["id"] == setup.id
        answer = chat(host, f"{setup.id}@{CODE}/ada@example.com", BODY)
        assert answer.status_code == 200, answer.text
        host.manage.patch(f"/events/{setup.id}", json={"description_markdown": "again"})
    # Code keys naming random events count the same way.
    refused = burst(
        [lambda: chat(host, f"{secrets.token_hex(6)}@{CODE}/ada@example.com", BODY)] * 8
    )
    assert {r.json()["error"]["code"] for r in refused} <= {
        "too_many_failed_keys",
        "invalid_api_key",
    }
    assert sum(r.status_code == 429 for r in refused) >= 4, [r.text for r in refused]
    elapsed = time.monotonic() - started
    looked_up = events.settled() - before
    # Past the first THRESHOLD, 2 a second; plus the known event's reads after each edit.
    assert looked_up <= THRESHOLD + int(elapsed * LOOKUPS_PER_SECOND) + 1 + 3 * 3, looked_up
    assert looked_up < 61
