"""The dev host serves function_app like the Functions host: routes, methods, keys, timers."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from local.devhost import TimerFunction, _run_timer, compile_route, resolve_setting
from local.ncrontab import Schedule
from tests.harness import DevHost


def test_route_templates_match_like_the_functions_host() -> None:
    chat = compile_route("api", "openai/deployments/{deployment}/chat/completions")
    match = chat.match("/api/openai/deployments/gpt-4o/chat/completions")
    assert match and match["deployment"] == "gpt-4o"
    assert chat.match("/api/OpenAI/Deployments/gpt-4o/Chat/Completions")  # case-insensitive
    assert not chat.match("/api/openai/deployments/a/b/chat/completions")
    search = compile_route("api", "indexes('{index}')/docs/search.post.search")
    found = search.match("/api/indexes('hotels')/docs/search.post.search")
    assert found and found["index"] == "hotels"
    rest = compile_route("api", "files/{*path}")
    assert rest.match("/api/files/a/b/c")["path"] == "a/b/c"


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("0 */5 * * * *", "2026-11-22T10:02:30", "2026-11-22T10:05:00"),
        ("30 0 9 * * 1-5", "2026-11-21T10:00:00", "2026-11-23T09:00:30"),  # Saturday -> Monday
        ("0 0 0 1 * *", "2026-12-15T00:00:00", "2027-01-01T00:00:00"),
        ("*/10 * * * * *", "2026-11-22T10:00:05", "2026-11-22T10:00:10"),
        ("0 15 10 * Jan,Jul Sun", "2026-11-22T11:00:00", "2027-01-03T10:15:00"),
    ],
)
def test_ncrontab_next_firing(expression: str, after: str, expected: str) -> None:
    fired = Schedule(expression).next_after(datetime.fromisoformat(after))
    assert fired == datetime.fromisoformat(expected)


def test_ncrontab_refuses_five_fields() -> None:
    with pytest.raises(ValueError, match="6 fields"):
        Schedule("*/5 * * * *")


def test_schedule_setting_reference_is_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPROXY_ROLLUP_SCHEDULE", "*/2 * * * * *")
    assert resolve_setting("%AIPROXY_ROLLUP_SCHEDULE%") == "*/2 * * * * *"
    assert resolve_setting("0 0 * * * *") == "0 0 * * * *"


async def test_timer_fires_on_its_schedule_and_stops() -> None:
    fired: list[object] = []

    async def handler(timer: object) -> None:
        fired.append(timer)

    stop = asyncio.Event()
    task = asyncio.create_task(_run_timer(TimerFunction("t", "* * * * * *", False, handler), stop))
    for _ in range(40):  # at most 4 s for two firings of an every-second schedule
        if len(fired) >= 2:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert len(fired) >= 2


def test_unknown_route_is_a_json_404(host: DevHost) -> None:
    response = host.http.get("/no/such/route")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_wrong_method_is_405_with_allow(host: DevHost) -> None:
    response = host.http.get("/openai/deployments/x/chat/completions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_health_reports_storage(host: DevHost) -> None:
    response = host.http.get("/health")
    assert response.status_code == 200
    assert response.json()["storage"] == "ok"
