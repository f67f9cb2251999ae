"""A burst of calls on a cold instance (Flex starting one for a workshop's first minute) reads
each thing the calls share from storage once: the calls asking while the first read is under
way wait for it. Reads are counted in the run's Azurite's access log, on tables of this
module's own."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from local.azurite import Azurite
from tests.harness import CHAT, AppHost, EventSetup, Simulator, TableReads, burst, unique_prefix

pytestmark = pytest.mark.e2e  # a new worker process is the cold instance
CALLS = 16
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def test_a_burst_on_a_cold_instance_reads_its_event_and_key_once(
    app_hosts: Callable[..., AppHost], azurite: Azurite, sim: Simulator
) -> None:
    prefix = unique_prefix("burst")
    setup = EventSetup(app_hosts("burst-setup", prefix=prefix), sim)
    # Another instance on the same tables, its caches empty; entries kept long enough that no
    # refresh falls inside the burst however slowly this machine answers.
    cold = app_hosts("burst-cold", prefix=prefix, AIPROXY_CACHE_TTL_SECONDS="600")
    events, keys = TableReads(azurite, f"{prefix}events"), TableReads(azurite, f"{prefix}keys")
    before = events.settled(), keys.settled()
    answers = await burst(CHAT, BODY, [cold], setup.key, CALLS)
    assert [a.status_code for a in answers] == [200] * CALLS, [a.text for a in answers]
    assert all(a.json()["choices"][0]["message"]["content"] for a in answers)
    assert events.settled() - before[0] == 1
    assert keys.settled() - before[1] == 1
