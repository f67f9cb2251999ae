"""The playground's voice tab in Chromium with a fake microphone: a realtime call set up
through the worker, its audio reaching the simulator's WebRTC peer, every answer's usage
recorded exactly, the call ended by the proxy when the token cap is crossed, and refusals
shown before any media flows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.browser import FAKE_MICROPHONE, Browser, for_tests, tab
from tests.harness import AppHost, EventSetup, Simulator, Storage, wait_until

pytestmark = pytest.mark.e2e

REALTIME = "gpt-realtime"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with for_tests(*FAKE_MICROPHONE) as launched:  # the shared fixture's, with a microphone
        yield launched


def sim_calls(sim: Simulator) -> list[dict[str, Any]]:
    return httpx.get(f"{sim.url}/_sim/realtime").json()["calls"]


def test_a_voice_call_is_metered_exactly_and_ended_at_the_token_cap(
    app_host: AppHost, sim: Simulator, storage: Storage, browser: Browser
) -> None:
    event = EventSetup(app_host, sim, name="Voice day", daily_token_cap=400)
    event.add_resource(sim.url, REALTIME, "openai-realtime")
    before = {c["id"] for c in sim_calls(sim)}
    sim.configure(realtime_turn_seconds=0.5)
    try:
        with tab(browser) as opened:
            page = opened.page
            opened.connect(app_host.base, event.key)
            page.click("#tab-voice")
            assert page.locator("#voice-model option").all_inner_texts() == [REALTIME]
            page.fill("#voice-instructions", "Answer briefly.")
            page.click("#voice-start")
            [call] = wait_until(lambda: [c for c in sim_calls(sim) if c["id"] not in before])
            assert call["session"]["instructions"] == "Answer briefly."
            # The fake microphone's audio reaches the deployment's peer, not the proxy.
            wait_until(lambda: next(c for c in sim_calls(sim) if c["id"] == call["id"])[
                "audio_seconds"] > 0.5, timeout=20)  # fmt: skip
            ended = page.locator("#voice-ended")
            ended.wait_for(state="visible", timeout=30_000)
            assert "used today's 400 tokens" in ended.inner_text()
            wait_until(lambda: page.locator("#voice-state").text_content() == "idle")
            seen = next(c for c in sim_calls(sim) if c["id"] == call["id"])
            # The proxy's hangup, or the page's own on its message: whichever came first.
            assert seen["ended"] in ("hangup", "closed")
            [row] = storage.rows("realtimecalls", f"RowKey eq '{call['id']}'")
            assert row["ended"] == "daily_token_cap_exceeded"
            shown = int(opened.text("#voice-tokens").replace(",", ""))
            responses = seen["responses"]
            rows = storage.usage(event.id, expect=len(responses) + 1)
            records = [r for r in rows if r["outcome"] == "realtime_response"]
            assert len(records) == len(responses)
            total = sum(r["usage"]["total_tokens"] for r in responses)
            assert sum(r["total_tokens"] for r in records) == total == shown
            assert total >= 400 and total - responses[-1]["usage"]["total_tokens"] < 400

            # Over the cap now: the next call is refused before any media flows. Another
            # instance of this run takes the realtime queue too and may have metered the call:
            # this one refuses once it has seen those tokens, within two syncs
            # (docs/operating.md), as the page's own panel shows.
            wait_until(lambda: _info(app_host, event.key)["today"]["tokens_left"] == 0)
            calls = len(sim_calls(sim))
            page.click("#voice-start")
            refused = page.locator("#voice-error")
            try:
                refused.wait_for(state="visible")
            except PlaywrightTimeout as timeout:  # what the page went through, to see why
                opened.screenshot("playground-voice-not-refused")
                said = [m.text for m in opened.console]
                raise AssertionError(
                    f"no refusal shown; state {opened.text('#voice-state')!r}, "
                    f"log {opened.text('#voice-log')!r}, console {said}"
                ) from timeout
            assert refused.get_attribute("data-code") == "daily_token_cap_exceeded"
            assert len(sim_calls(sim)) == calls
            wait_until(lambda: opened.text("#tokens-left").startswith("0 of 400"))
            opened.screenshot("playground-voice")
            opened.assert_clean()
    finally:
        sim.configure(realtime_turn_seconds=None)


def test_a_call_outside_the_event_is_refused_before_any_media_flows(
    app_host: AppHost, sim: Simulator, browser: Browser
) -> None:
    event = EventSetup(app_host, sim)
    event.add_resource(sim.url, REALTIME, "openai-realtime")
    with tab(browser) as opened:
        page = opened.page
        opened.connect(app_host.base, event.key)
        switched = app_host.manage.patch(f"/events/{event.id}", json={"active": False})
        assert switched.status_code == 200
        # Every instance knows within the key cache's TTL; this one at once.
        wait_until(lambda: _info(app_host, event.key).get("status") == "inactive")
        calls = len(sim_calls(sim))
        page.click("#tab-voice")
        page.click("#voice-start")
        refused = page.locator("#voice-error")
        refused.wait_for(state="visible")
        assert refused.get_attribute("data-code") == "event_inactive"
        assert "switched off" in refused.inner_text()
        assert len(sim_calls(sim)) == calls  # nothing reached the deployment
        wait_until(lambda: page.locator("#voice-start").is_enabled())
        assert page.locator("#voice-stop").is_hidden()
        opened.assert_clean()


def _info(host: AppHost, key: str) -> dict[str, Any]:
    """What the attendee's page shows of its event (GET /eventinfo)."""
    return host.http.get("/eventinfo", headers={"api-key": key}).json()


def test_the_voice_tab_shows_only_with_a_realtime_deployment(
    app_host: AppHost, sim: Simulator, browser: Browser
) -> None:
    event = EventSetup(app_host, sim)  # chat, completions, embeddings: no realtime
    with tab(browser) as opened:
        opened.connect(app_host.base, event.key)
        assert opened.page.locator("#tab-voice").is_hidden()
        opened.assert_clean()
