"""The web pages, driven in headless Chromium: playground, registration page, console."""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from openai import AzureOpenAI

from shared.web import pages
from tests.browser import Browser, Route, Tab, tab
from tests.harness import (
    OPERATOR_KEY,
    SIM_KEY,
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    unique_prefix,
    wait_until,
    window,
)
from tests.test_ownership import easyauth

pytestmark = pytest.mark.e2e  # the pages in a browser against the app as deployed

STREAMED = "Tell me a story [sim:tokens=30 latency_ms_per_token=60]"
PWNED = "window.__pwned = 1; document.title = 'pwned';"
HOSTILE_DESCRIPTION = f"""## Welcome to the lab

Bring **a laptop** and read the [guide](https://example.com/guide).

<script>{PWNED}</script>

<img src=x onerror="{PWNED}">

[click me](javascript:window.__pwned=1)
"""


def images_event(host: AppHost, sim: Simulator, **fields: object) -> EventSetup:
    event = EventSetup(host, sim, **fields)
    event.add_resource(sim.url, "dall-e-3", "openai-images")
    return event


# --- served with a strict policy --------------------------------------------------------


def test_pages_and_their_files_are_served_with_a_strict_content_security_policy(
    host: AppHost,
) -> None:
    for path in ("/playground", "/console", "/register/0123456789abcdef"):
        response = host.http.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["content-security-policy"] == pages.CONTENT_SECURITY_POLICY
        assert "script-src 'self';" in pages.CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
        html = response.text
        # Nothing inline that the policy would have to allow.
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path
        assert not re.search(r"\sstyle=|<style|\son[a-z]+=", html), path
        assert "{{" not in html and 'data-base="/api"' in html

    for path, content_type in (
        ("/pages/playground.js", "text/javascript; charset=utf-8"),
        ("/pages/app.css", "text/css; charset=utf-8"),
        ("/pages/vendor/purify.min.js", "text/javascript; charset=utf-8"),
        ("/pages/icon.svg", "image/svg+xml"),
        ("/pages/vendor/marked.LICENSE.txt", "text/plain; charset=utf-8"),
    ):
        response = host.http.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == content_type
        assert response.headers["x-content-type-options"] == "nosniff"
        again = host.http.get(path, headers={"if-none-match": response.headers["etag"]})
        assert again.status_code == 304 and again.content == b""

    for path in (
        "/pages/playground.html",
        "/pages/../function_app.py",
        "/pages/%2e%2e/local.settings.json",
        "/pages/vendor",
        "/pages/nothing.js",
    ):
        assert host.http.get(path).status_code == 404, path


def test_vendored_libraries_are_the_versions_pinned_in_package_json() -> None:
    pinned = json.loads((pages.PAGES_DIR.parent / "package.json").read_text())["devDependencies"]
    vendor = pages.PAGES_DIR / "vendor"
    assert f"marked v{pinned['marked']}" in (vendor / "marked.min.js").read_text()[:300]
    assert f"DOMPurify {pinned['dompurify']}" in (vendor / "purify.min.js").read_text()[:300]
    for licence in ("marked.LICENSE.txt", "purify.LICENSE.txt", "purify.LICENSE-MPL.txt"):
        assert (vendor / licence).stat().st_size > 1000


# --- playground ------------------------------------------------------------------------------


def test_playground_streams_an_answer_and_shows_the_recorded_usage(
    host: AppHost, sim: Simulator, storage: Storage, browser: Browser
) -> None:
    event = images_event(host, sim, name="Playground day", max_token_cap=800,
                         requests_per_minute=60)  # fmt: skip
    with tab(browser) as opened:
        page = opened.page
        opened.connect(host.base, event.key)
        assert opened.text("#event-name") == "Playground day"
        assert opened.text("#max-cap") == "800"
        assert opened.text("#per-minute") == "60 requests"
        assert page.get_attribute("#max-tokens", "max") == "800"
        assert page.locator("#model option").all_inner_texts() == ["gpt-4o-mini"]
        # The key lives in this tab's sessionStorage and nowhere else.
        assert page.evaluate("sessionStorage.getItem('aiproxy.key')") == event.key
        assert page.evaluate("localStorage.length") == 0

        page.fill("#system", "You are terse.")
        page.fill("#prompt", STREAMED)
        page.click("#send")
        answer = page.locator(".message.assistant .content").last
        first = wait_until(lambda: answer.inner_text(), timeout=5)
        streaming = page.locator(".message.assistant.streaming")
        # Longer than the first text, then still streaming: it grew while it streamed (the
        # answer takes about 1.8 s; rendered all at once at its end, this never holds).
        wait_until(lambda: len(answer.inner_text()) > len(first) and streaming.count() == 1)
        page.wait_for_selector(".message.assistant:not(.streaming)")
        wait_until(lambda: opened.text("#usage-total") != "—")

        [record] = storage.usage(event.id, expect=1)
        assert record["streamed"] and not record["estimated"]
        assert record["completion_tokens"] == 30
        shown = {
            name: int(opened.text(f"#usage-{name}").replace(",", ""))
            for name in ("prompt", "completion", "total")
        }
        assert shown == {
            "prompt": record["prompt_tokens"],
            "completion": record["completion_tokens"],
            "total": record["total_tokens"],
        }
        assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", opened.text("#usage-ttft"))
        assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", opened.text("#usage-latency"))
        wait_until(lambda: opened.text("#requests-left").startswith("999 of 1,000"))
        opened.screenshot("playground")
        opened.assert_clean()


def test_playground_keeps_a_responses_conversation_upstream(
    host: AppHost, sim: Simulator, storage: Storage, browser: Browser
) -> None:
    event = images_event(host, sim, name="Responses day")
    event.add_resource(sim.url, "gpt-4.1", "openai-chat")
    with tab(browser) as opened:
        page = opened.page
        opened.connect(host.base, event.key)
        # The event's chat models, from its model list.
        assert page.locator("#model option").all_inner_texts() == ["gpt-4.1", "gpt-4o-mini"]
        page.select_option("#model", "gpt-4o-mini")
        page.select_option("#api", "responses")
        for turn, question in enumerate(("Hello [sim:tokens=6]", "And then? [sim:tokens=4]")):
            page.fill("#prompt", question)
            page.click("#send")
            answer = page.locator(".message.assistant .content").nth(turn)
            page.wait_for_selector(".message.assistant.streaming", state="detached")
            assert len(answer.inner_text().split()) >= 4
            records = storage.usage(event.id, expect=turn + 1)
            wait_until(
                lambda r=records: opened.text("#usage-total") == f"{r[-1]['total_tokens']:,}"
            )
        first, second = records
        assert (first["completion_tokens"], second["completion_tokens"]) == (6, 4)
        # The second turn named the first answer: the upstream got its previous_response_id.
        sent = [r for r in sim.stats()["last_requests"] if r["path"].endswith("/responses")]
        assert sent[-1]["body"]["previous_response_id"].startswith("resp_")
        assert second["prompt_tokens"] > first["total_tokens"]
        opened.screenshot("playground-responses")
        opened.assert_clean()


def test_playground_renders_a_generated_image(
    host: AppHost, sim: Simulator, browser: Browser
) -> None:
    event = images_event(host, sim)
    with tab(browser) as opened:
        page = opened.page
        opened.connect(host.base, event.key)
        page.click("#tab-images")
        page.fill("#image-prompt", "A lighthouse at dawn")
        page.click("#generate")
        page.wait_for_selector("#image-result:not([hidden])")
        wait_until(lambda: page.evaluate("document.querySelector('#image').naturalWidth") > 0)
        assert opened.text("#image-caption") == "A lighthouse at dawn"
        opened.screenshot("playground-images")
        opened.assert_clean()


def test_playground_explains_a_revoked_key(host: AppHost, sim: Simulator, browser: Browser) -> None:
    event = EventSetup(host, sim)
    with tab(browser) as opened:
        page = opened.page
        opened.connect(host.base, event.key)
        revoked = host.manage.delete(f"/events/{event.id}/attendees/{event.attendee['id']}")
        assert revoked.status_code == 200
        page.fill("#prompt", "Are you still there?")
        page.click("#send")
        notice = page.locator("#chat-error")
        notice.wait_for(state="visible")
        assert notice.get_attribute("data-code") == "key_revoked"
        assert "Your key was revoked by the organiser." in notice.inner_text()
        assert "Ask the organiser for a new key." in notice.inner_text()
        # The question comes back to the box so it can be sent again with a new key.
        assert page.input_value("#prompt") == "Are you still there?"
        opened.screenshot("playground-revoked")
        opened.assert_clean()


# --- registration -------------------------------------------------------------------------------


def test_registration_page_gives_a_key_that_works_with_the_sdk_and_runs_no_script(
    host: AppHost, sim: Simulator, browser: Browser
) -> None:
    event = EventSetup(
        host,
        sim,
        name="Spring AI lab",
        shared_code="SPRING-26",
        organizer_name="Ada Lovelace",
        description_markdown=HOSTILE_DESCRIPTION,
        **window(hours_before=2, hours_after=6, zone="Europe/Berlin"),
    )
    with tab(browser, timezone_id="America/New_York") as opened:
        page = opened.page
        page.goto(f"{host.base}/register/{event.id}")
        page.wait_for_selector("#event-card:not([hidden])")
        assert opened.text("#event-name") == "Spring AI lab"
        assert opened.text("#event-organizer") == "Organised by Ada Lovelace"
        # The window in the visitor's zone, from the event's UTC instants.
        start = datetime.fromisoformat(event.event["starts_at_utc"].replace("Z", "+00:00"))
        in_new_york = start.astimezone(ZoneInfo("America/New_York")).strftime("%I:%M %p")
        assert in_new_york in opened.text("#event-window")
        assert "America/New_York" in opened.text("#event-zone")
        # The markdown is rendered; the script, the handler and the javascript: link are not.
        assert opened.text("#description h2") == "Welcome to the lab"
        assert opened.text("#description strong") == "a laptop"
        assert page.get_attribute("#description a", "rel") == "noopener noreferrer"
        assert page.locator("#description script, #description img").count() == 0
        assert "<script>" in opened.text("#description")  # raw HTML is shown as text
        assert page.locator("#description a >> text=click me").get_attribute("href") is None
        page.click("#description a >> text=click me")
        assert page.evaluate("window.__pwned") is None
        assert page.title() == "Spring AI lab · Register · AI Proxy"

        page.fill("#email", "Grace@Example.com")
        page.fill("#code", "WRONG")
        page.click("#register")
        page.locator("#register-error").wait_for(state="visible")
        assert page.get_attribute("#register-error", "data-code") == "registration_refused"
        assert "not the registration code" in opened.text("#register-error")
        opened.screenshot("register-form")

        page.fill("#code", "SPRING-26")
        page.click("#register")
        page.wait_for_selector("#key-card:not([hidden])")
        assert "•" in opened.text("#api-key")
        assert opened.text("#key-user") == "for grace@example.com"
        opened.screenshot("register")
        page.click("#reveal")
        key = opened.text("#api-key")
        endpoint = opened.text("#endpoint")
        assert key.startswith("aip-") and endpoint == host.base
        snippet = opened.text("#snippet")
        assert f'api_key="{key}"' in snippet and f'azure_endpoint="{endpoint}"' in snippet
        assert 'model="gpt-4o-mini"' in snippet
        assert page.get_attribute("#open-playground", "href") == "/api/playground"
        assert page.evaluate("sessionStorage.getItem('aiproxy.key')") == key
        assert page.evaluate("window.__pwned") is None
        opened.assert_clean()

    client = AzureOpenAI(azure_endpoint=endpoint, api_key=key, api_version="2024-10-21")
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], max_tokens=5
    )
    assert answer.choices[0].message.content


def test_registration_page_offers_sign_in_when_the_app_trusts_easyauth(
    host: AppHost, sim: Simulator, browser: Browser
) -> None:
    event = EventSetup(host, sim, self_registration="sign_in")  # no code: sign-in only
    url = f"{host.base}/register/{event.id}"
    # The page and the event's info as an app behind App Service authentication serves them.
    trusted = pages.render(
        "register", {"base": "/api", "event_id": event.id, "sign_in": "aad:Microsoft github:GitHub"}
    )

    def trusted_info(route: Route) -> None:
        answer = route.fetch()
        info = answer.json()
        assert info["registration"] == {"open": True, "shared_code": False, "sign_in": False}
        info["registration"]["sign_in"] = True
        route.fulfill(response=answer, json=info)

    with tab(browser) as opened:
        page = opened.page
        page.route(
            url,
            lambda route: route.fulfill(
                body=trusted, headers=pages.SECURITY_HEADERS, content_type="text/html"
            ),
        )
        page.route(f"{host.base}/events/{event.id}", trusted_info)
        page.goto(url)
        page.wait_for_selector("#sign-in:not([hidden])")
        back = httpx.QueryParams(
            {"post_login_redirect_uri": f"/api/register/{event.id}?signed_in=1"}
        )
        assert page.get_attribute("#sign-in-links a >> text=Sign in with GitHub", "href") == (
            f"/.auth/login/github?{back}"
        )
        assert page.locator("#sign-in-links a >> text=Sign in with Microsoft").count() == 1
        assert page.locator("#code-form").is_hidden()
        opened.screenshot("register-sign-in")
        opened.assert_clean()

    # Served as it is here (no sign-in) the same event says to ask the organiser.
    with tab(browser) as opened:
        opened.page.goto(url)
        opened.page.wait_for_selector("#no-way:not([hidden])")
        assert opened.page.locator("#code-form").is_hidden()
        assert opened.page.locator("#sign-in").is_hidden()
        opened.assert_clean()


# --- console ---------------------------------------------------------------------------------------


def test_console_creates_an_event_wires_it_and_charts_its_usage(
    host: AppHost, sim: Simulator, browser: Browser
) -> None:
    chat = host.manage.post(
        "/resources",
        json={
            "name": "Chat on the simulator",
            "deployment": "gpt-4o-mini",
            "model_class": "openai-chat",
            "endpoint": sim.url,
            "auth": "key",
            "api_key": SIM_KEY,
        },
    )
    assert chat.status_code == 201, chat.text
    name = f"Console day {time.time_ns()}"
    with tab(browser, accept_downloads=True) as opened:
        page = opened.page
        page.goto(f"{host.base}/console")
        page.fill("#operator-key", "not-the-key")
        page.click("#sign-in")
        page.locator("#signin-error").wait_for(state="visible")
        assert "not accepted" in opened.text("#signin-error")
        page.fill("#operator-key", OPERATOR_KEY)
        page.click("#sign-in")
        page.wait_for_selector("#console-view:not([hidden])")

        # Create an event in another time zone.
        page.click("#new-event")
        page.fill("#ev-name", name)
        tokyo = window(hours_before=1, hours_after=8, zone="Asia/Tokyo")
        page.fill("#ev-starts", tokyo["starts_at"][:16])
        page.fill("#ev-ends", tokyo["ends_at"][:16])
        page.select_option("#ev-zone", "Asia/Tokyo")
        page.fill("#ev-max-token-cap", "256")
        page.fill("#ev-daily-request-cap", "50")
        page.fill("#ev-description", "Bring a laptop.")
        page.click("#generate-code")  # the proxy makes the registration code
        opened.screenshot("console-new-event")
        page.click("#save-event")
        page.wait_for_selector("#event-view:not([hidden])")
        assert opened.text("#event-title") == name
        event_id = page.locator("#register-link").inner_text().rsplit("/", 1)[1]
        stored = host.manage.get(f"/events/{event_id}").json()
        assert stored["time_zone"] == "Asia/Tokyo" and stored["max_token_cap"] == 256
        assert re.fullmatch(r"[A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4}", stored["shared_code"])
        item = page.locator(f"#event-list button[data-event-id='{event_id}']")
        assert item.locator(".badge").text_content() == "live"

        # Attach the existing chat resource; add and attach an embeddings one.
        page.select_option("#attach-resource", chat.json()["id"])
        page.click("#attach")
        page.wait_for_selector(f"#catalog-rows tr[data-resource-id='{chat.json()['id']}']")
        page.click("#resource-details summary")
        page.fill("#res-name", "Embeddings on the simulator")
        page.fill("#res-deployment", "text-embedding-3-small")
        page.select_option("#res-class", "openai-embeddings")
        page.fill("#res-endpoint", sim.url)
        page.fill("#res-key", SIM_KEY)
        page.click("#add-resource")
        wait_until(lambda: page.locator("#catalog-rows tr").count() == 2)

        # Add attendees; the key is shown once.
        page.click("#tab-attendees")
        keys = {}
        for user in ("ada@example.com", "grace@example.com"):
            page.fill("#attendee-user", user)
            page.click("#add-attendee")
            wait_until(lambda u=user: opened.text("#new-key-label") == f"Key for {u}")
            keys[user] = opened.text("#new-key-value")
        wait_until(lambda: "2 attendees" in item.inner_text())

        # Traffic from both, with the SDK.
        for user, calls in (("ada@example.com", 3), ("grace@example.com", 1)):
            client = AzureOpenAI(
                azure_endpoint=host.base, api_key=keys[user], api_version="2024-10-21"
            )
            for _ in range(calls):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
                )
            client.embeddings.create(model="text-embedding-3-small", input="a few words")

        # Rotate one key, revoke the other.
        page.click("#tab-attendees")
        grace = page.locator("#attendee-rows tr", has_text="grace@example.com")
        grace.get_by_role("button", name="Rotate").click()
        wait_until(lambda: opened.text("#new-key-label") == "New key for grace@example.com")
        assert opened.text("#new-key-value") not in ("", keys["grace@example.com"])
        page.locator("#attendee-rows tr", has_text="ada@example.com").get_by_role(
            "button", name="Revoke"
        ).click()
        ada = page.locator("#attendee-rows tr", has_text="ada@example.com")
        wait_until(lambda: ada.locator(".badge").text_content() == "revoked")
        opened.screenshot("console-attendees")

        # Charts after traffic, and the CSV agrees with the API.
        page.click("#tab-usage")
        for chart in ("requests-per-day", "tokens-per-day", "deployments", "attendees"):
            page.wait_for_selector(f"#chart-{chart} svg rect")
        assert page.locator("#chart-deployments svg text").all_text_contents()[0] in (
            "gpt-4o-mini",
            "text-embedding-3-small",
        )
        page.select_option("#csv-group", "attendee")
        with page.expect_download() as download:
            page.click("#download-csv")
        rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        api = host.manage.get(f"/events/{event_id}/usage", params={"group_by": "attendee"}).json()
        numbers = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
        assert {n: sum(int(r[n]) for r in rows) for n in numbers} == {
            n: api["totals"][n] for n in numbers
        }
        assert api["totals"]["requests"] == 6
        assert {r["user"] for r in rows} == {"ada@example.com", "grace@example.com"}
        assert download.value.suggested_filename.endswith("-by-attendee.csv")
        opened.screenshot("console")
        opened.assert_clean()


def test_console_finds_events_by_name_and_status_and_shows_who_was_slowed(
    host: AppHost, sim: Simulator, browser: Browser
) -> None:
    tag = f"find{time.time_ns() % 10**9}"
    live = EventSetup(host, sim, name=f"{tag} Live lab", requests_per_minute=2)
    upcoming = host.manage.post("/events", json={"name": f"{tag} Upcoming lab",
                                                 **window(hours_before=-24, hours_after=48),
                                                 "max_token_cap": 8, "daily_request_cap": 1})  # fmt: skip
    ended = host.manage.post("/events", json={"name": f"{tag} Ended lab",
                                              **window(hours_before=48, hours_after=-24),
                                              "max_token_cap": 8, "daily_request_cap": 1})  # fmt: skip
    assert upcoming.status_code == ended.status_code == 201
    chat = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    statuses = [
        host.http.post(chat, json=body, headers={"api-key": live.key}).status_code for _ in range(5)
    ]
    assert statuses == [200, 200, 429, 429, 429]

    with tab(browser) as opened:
        page = opened.page
        opened.sign_in(host.base, OPERATOR_KEY)
        names = lambda: page.locator("#event-list .name").all_text_contents()  # noqa: E731
        page.fill("#event-search", tag.upper())  # any case
        wait_until(lambda: len(names()) == 3)
        page.select_option("#event-status", "upcoming")
        wait_until(lambda: names() == [f"{tag} Upcoming lab"])
        page.select_option("#event-status", "ended")
        wait_until(lambda: names() == [f"{tag} Ended lab"])
        page.fill("#event-search", f"{tag} Live")
        wait_until(lambda: names() == [])
        assert page.locator("#no-match").is_visible()
        opened.screenshot("console-no-match")
        page.click("#clear-filters")
        everything = len(host.manage.get("/events").json())
        wait_until(lambda: len(names()) == everything)
        page.fill("#event-search", tag)
        page.select_option("#event-status", "live")
        wait_until(lambda: names() == [f"{tag} Live lab"])

        # The live event: its per-minute limit, who was refused and why, who was active.
        page.click(f"#event-list button[data-event-id='{live.id}']")
        page.wait_for_selector("#event-view:not([hidden])")
        assert "at most 2 requests per attendee per minute" in opened.text("#event-when")
        page.click("#tab-usage")
        row = page.locator(f"#refusal-rows tr[data-attendee-id='{live.attendee['id']}']")
        row.wait_for()
        assert row.locator("td").first.text_content() == "attendee@example.com"
        assert row.locator("td[data-reason='requests_per_minute']").text_content() == "3"
        assert page.locator("#refusals-head th[data-reason]").all_text_contents() == [
            "Requests per minute"
        ]
        page.wait_for_selector("#chart-active svg rect")
        tiles = page.locator("#usage-totals .tile").all_inner_texts()
        assert any("Calls refused" in t and t.strip().endswith("3") for t in tiles), tiles
        opened.screenshot("console-refusals")

        # The limits are edited in the event form.
        page.click("#edit-event")
        assert page.input_value("#ev-requests-per-minute") == "2"
        page.fill("#ev-requests-per-minute", "7")
        page.fill("#ev-tokens-per-minute", "9000")
        assert not page.is_checked("#ev-realtime-secrets")  # off unless the organiser says so
        page.check("#ev-realtime-secrets")
        page.click("#save-event")
        wait_until(lambda: host.manage.get(f"/events/{live.id}").json()["requests_per_minute"] == 7)
        saved = host.manage.get(f"/events/{live.id}").json()
        assert saved["tokens_per_minute"] == 9000 and saved["realtime_client_secrets"] is True

        # Several bad fields at once: each is listed with what to do.
        page.click("#edit-event")
        page.fill("#ev-max-token-cap", "3000000000")  # the form lets it through, the API not
        page.fill("#ev-requests-per-minute", "3000000000")
        page.click("#save-event")
        page.locator("#console-error .fields-to-fix li").first.wait_for()
        fields = page.locator("#console-error .fields-to-fix li").evaluate_all(
            "items => items.map((li) => li.dataset.field)"
        )
        assert sorted(fields) == ["max_token_cap", "requests_per_minute"]
        opened.assert_clean()


# --- console sign-in -------------------------------------------------------------------------


def console_requests(opened: Tab) -> list[dict[str, str]]:
    """The headers of every management call the page makes, as they are made."""
    sent: list[dict[str, str]] = []
    opened.page.on("request", lambda r: "/manage/" in r.url and sent.append(r.headers))
    return sent


def test_console_signs_in_with_the_operator_key_and_signing_out_forgets_it(
    host: AppHost, sim: Simulator, browser: Browser
) -> None:
    event = EventSetup(host, sim, name=f"Operator's lab {time.time_ns()}")
    with tab(browser) as opened:
        page = opened.page
        sent = console_requests(opened)
        page.goto(f"{host.base}/console")
        assert page.locator("#organiser-sign-in").is_hidden()  # no App Service sign-in here
        assert "x-aiproxy-operator-key" in opened.text("#signin-view")
        page.fill("#operator-key", OPERATOR_KEY)
        page.click("#sign-in")
        page.wait_for_selector("#console-view:not([hidden])")
        assert opened.text("#signed-in-as") == "Operator"
        page.locator(f"#event-list button[data-event-id='{event.id}']").wait_for()
        key = "sessionStorage.getItem('aiproxy.operatorKey')"
        assert page.evaluate(key) == OPERATOR_KEY
        page.reload()  # the tab stays signed in
        page.wait_for_selector("#console-view:not([hidden])")
        assert sent and all(h.get("x-aiproxy-operator-key") == OPERATOR_KEY for h in sent)
        assert not any("x-functions-key" in h for h in sent)
        opened.screenshot("console-operator")

        page.click("#sign-out")
        page.wait_for_selector("#signin-view:not([hidden])")
        assert page.evaluate(key) is None and page.input_value("#operator-key") == ""
        assert page.locator("#signed-in-as").is_hidden()
        calls = len(sent)
        page.reload()
        page.wait_for_selector("#signin-view:not([hidden])")
        assert page.locator("#console-view").is_hidden() and len(sent) == calls
        opened.assert_clean()


class AppServiceAuth:
    """App Service authentication in front of one browser context, as far as the console sees
    it: /.auth/login/aad starts a session (its cookie), /.auth/me describes it, /.auth/logout
    ends it, and every other request reaches the app with the principal headers App Service
    sets from the cookie (any the browser sent are dropped, as App Service does). The host
    stand-in has no such front end, so this one answers inside the browser."""

    COOKIE = "AppServiceAuthSession"

    def __init__(self, user_id: str, name: str) -> None:
        self.principal = easyauth("aad", user_id, name)
        self.name = name
        self.sessions: set[str] = set()

    def handle(self, route: Route) -> None:
        request = route.request
        url = httpx.URL(request.url)
        headers = request.all_headers()
        cookies = dict(
            part.strip().split("=", 1)
            for part in headers.get("cookie", "").split(";")
            if "=" in part
        )
        session = cookies.get(self.COOKIE, "")
        signed_in = session in self.sessions
        if url.path == "/.auth/login/aad":
            session = secrets.token_urlsafe(16)
            self.sessions.add(session)
            cookie = f"{self.COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax"
            back = url.params["post_login_redirect_uri"]
            route.fulfill(status=302, headers={"location": back, "set-cookie": cookie})
        elif url.path == "/.auth/logout":
            self.sessions.discard(session)
            cookie = f"{self.COOKIE}=; Path=/; Max-Age=0"
            back = url.params["post_logout_redirect_uri"]
            route.fulfill(status=302, headers={"location": back, "set-cookie": cookie})
        elif url.path == "/.auth/me":
            me = [{"provider_name": "aad", "user_id": self.name}]
            route.fulfill(status=200, json=me) if signed_in else route.fulfill(status=401)
        else:
            passed = {k: v for k, v in headers.items() if not k.startswith("x-ms-client-")}
            route.continue_(headers=passed | (self.principal if signed_in else {}))


@pytest.fixture(scope="module")
def behind_app_service(app_hosts: Callable[..., AppHost]) -> AppHost:
    """An instance that trusts App Service's principal headers (AIPROXY_TRUST_EASYAUTH)."""
    prefix = unique_prefix("consolesso")
    return app_hosts("console-easyauth", prefix=prefix, AIPROXY_TRUST_EASYAUTH="true")


def test_console_behind_app_service_signs_organisers_in_with_microsoft(
    behind_app_service: AppHost, browser: Browser
) -> None:
    host = behind_app_service
    operators = host.manage.post("/events", json={"name": "The operator's event", **window(),
                                                   "max_token_cap": 8, "daily_request_cap": 1})  # fmt: skip
    assert operators.status_code == 201
    auth = AppServiceAuth("oid-ada", "ada@contoso.com")
    mine = f"Ada's workshop {time.time_ns()}"
    with tab(browser) as opened:
        page = opened.page
        page.context.route(f"http://127.0.0.1:{host.port}/**", auth.handle)
        sent = console_requests(opened)
        page.goto(f"{host.base}/console")
        link = page.locator("#sign-in-microsoft")
        link.wait_for()
        assert link.get_attribute("href") == (
            "/.auth/login/aad?post_login_redirect_uri=%2Fapi%2Fconsole"
        )
        wait_until(lambda: len(sent) == 1)  # the keyless try: 401, so not signed in yet
        assert page.locator("#signin-error").is_hidden()
        assert page.locator("#console-view").is_hidden()
        opened.screenshot("console-sign-in-choices")

        link.click()
        page.wait_for_selector("#console-view:not([hidden])")
        wait_until(lambda: opened.text("#signed-in-as") == "Signed in as ada@contoso.com")
        assert page.locator("#sign-out").is_hidden()  # no key to forget: App Service signs out
        # Her own events only; what she creates is hers.
        assert page.locator("#event-list .name").all_text_contents() == []
        page.click("#new-event")
        page.fill("#ev-name", mine)
        page.click("#save-event")
        page.wait_for_selector("#event-view:not([hidden])")
        event_id = page.locator("#register-link").inner_text().rsplit("/", 1)[1]
        assert host.manage.get(f"/events/{event_id}").json()["owner"] == "aad:oid-ada"
        assert page.locator("#event-list .name").all_text_contents() == [mine]
        assert not any("x-aiproxy-operator-key" in h for h in sent)
        assert page.evaluate("sessionStorage.getItem('aiproxy.operatorKey')") is None
        opened.screenshot("console-organiser")

        sign_out = page.locator("#sign-out-session")
        assert sign_out.get_attribute("href") == (
            "/.auth/logout?post_logout_redirect_uri=%2Fapi%2Fconsole"
        )
        sign_out.click()
        page.wait_for_selector("#signin-view:not([hidden])")
        assert page.locator("#console-view").is_hidden() and auth.sessions == set()
        opened.assert_clean()
