"""Money in the pages, driven in headless Chromium: the console's event editor sets the currency,
budgets and alerts; its usage tab shows the spend the usage report gives, the budget's forecast
and the alert banner; the playground shows the key's budget left, from each answer's header and
from the event's info, and a refusal for the budget in words."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from tests.browser import Browser, Tab, tab
from tests.harness import (
    OPERATOR_KEY,
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    chat,
    wait_until,
)

pytestmark = pytest.mark.e2e  # the pages in a browser against the app as deployed

SMALL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
EMBED = "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
MINI = (150, 600)  # gpt-4o-mini, billionths of a dollar per input and per output token
STREAMED = "Tell me a story [sim:tokens=40 latency_ms_per_token=60]"
# Every text an element shows, in order (the playground's budget changes twice per answer).
WATCH = """(selector) => {
  window.__seen = window.__seen || {};
  const seen = window.__seen[selector] = [];
  const el = document.querySelector(selector);
  seen.push(el.textContent);
  new MutationObserver(() => seen.push(el.textContent))
    .observe(el, { childList: true, characterData: true, subtree: true });
}"""


def amount(nano: int) -> str:
    """Billionths as the API writes amounts: 1234500 -> '0.0012345'."""
    return f"{(Decimal(nano) / 10**9).normalize():f}"


def cost_of_small(host: AppHost, sim: Simulator) -> int:
    """One SMALL call's cost, by hand from the usage the simulator reports."""
    usage = chat(host, EventSetup(host, sim).key, SMALL).json()["usage"]
    return usage["prompt_tokens"] * MINI[0] + usage["completion_tokens"] * MINI[1]


def open_usage(opened: Tab, event_id: str) -> None:
    page = opened.page
    page.click(f"#event-list button[data-event-id='{event_id}']")
    page.wait_for_selector("#event-view:not([hidden])")
    page.click("#tab-usage")
    page.wait_for_selector("#chart-spend-deployments")


def tiles(opened: Tab) -> dict[str, str]:
    return {
        tile.locator(".label").inner_text(): tile.locator(".value").inner_text()
        for tile in opened.page.locator("#usage-totals .tile").all()
    }


def bars(opened: Tab, chart: str, unit: str = " USD") -> dict[str, str]:
    """A bar chart's bars: each label (whole, from its hover text) and the figure shown beside
    it, which the hover text gives too."""
    titles = opened.page.locator(f"#{chart} svg rect title").all_text_contents()
    values = opened.page.locator(f"#{chart} svg text.value").all_text_contents()
    shown = {}
    for title, value in zip(titles, values, strict=True):
        label, _, hover = title.rpartition(": ")
        assert hover == f"{value}{unit}", (title, value)
        shown[label] = value
    return shown


def report(host: AppHost, event_id: str, group: str) -> dict[str, Any]:
    answer = host.manage.get(f"/events/{event_id}/usage", params={"group_by": group})
    assert answer.status_code == 200, answer.text
    return answer.json()


# --- console: the event editor's money fields -------------------------------------------------


def test_console_editor_sets_the_currency_budgets_and_alerts(
    host: AppHost, sim: Simulator, browser: Browser
) -> None:
    name = f"Budgeted lab {datetime.now(UTC).timestamp()}"
    with tab(browser) as opened:
        page = opened.page
        opened.sign_in(host.base, OPERATOR_KEY)
        page.click("#new-event")
        # A new event starts from the defaults: USD, no budgets, alerts at 50, 80 and 100 %.
        assert page.input_value("#ev-currency") == "USD"
        assert page.input_value("#ev-budget") == page.input_value("#ev-attendee-budget") == ""
        assert page.input_value("#ev-budget-alerts") == "50,80,100"
        page.fill("#ev-name", name)
        page.fill("#ev-currency", "eur")  # any case: the console sends it upper-cased
        page.fill("#ev-budget", "250")
        page.fill("#ev-attendee-budget", "12.50")
        page.fill("#ev-attendee-daily-budget", "4.25")
        page.fill("#ev-budget-alerts", "75, 25,100")
        page.fill("#ev-alert-webhook", "https://hooks.example.com/aiproxy/budget")
        page.click("#save-event")
        page.wait_for_selector("#event-view:not([hidden])")
        assert opened.text("#event-title") == name
        event_id = page.locator("#register-link").inner_text().rsplit("/", 1)[1]
        stored = host.manage.get(f"/events/{event_id}").json()
        assert {k: stored[k] for k in ("currency", "budget", "attendee_budget",
                                       "attendee_daily_budget", "budget_alerts",
                                       "alert_webhook_url")} == {
            "currency": "EUR", "budget": "250", "attendee_budget": "12.5",
            "attendee_daily_budget": "4.25", "budget_alerts": "25,75,100",
            "alert_webhook_url": "https://hooks.example.com/aiproxy/budget",
        }  # fmt: skip

        # The editor reads them back; a budget cleared is none, another raised.
        page.click("#edit-event")
        # The editor fills in from the event the console holds once the save's answer is in.
        page.wait_for_function("document.querySelector('#ev-currency').value === 'EUR'")
        assert page.input_value("#ev-budget") == "250"
        assert page.input_value("#ev-attendee-budget") == "12.5"
        assert page.input_value("#ev-attendee-daily-budget") == "4.25"
        assert page.input_value("#ev-budget-alerts") == "25,75,100"
        page.fill("#ev-budget", "300.75")
        page.fill("#ev-attendee-daily-budget", "")
        page.fill("#ev-budget-alerts", "90")
        page.click("#save-event")
        wait_until(lambda: host.manage.get(f"/events/{event_id}").json()["budget"] == "300.75")
        stored = host.manage.get(f"/events/{event_id}").json()
        assert stored["attendee_daily_budget"] == "" and stored["budget_alerts"] == "90"
        assert stored["attendee_budget"] == "12.5" and stored["currency"] == "EUR"

        # A budget that is not an amount: the field is named, with what to do.
        page.click("#edit-event")
        page.fill("#ev-attendee-budget", "lots")
        page.click("#save-event")
        page.locator("#console-error").wait_for(state="visible")
        assert "attendee_budget" in opened.text("#console-error")
        assert "must be an amount" in opened.text("#console-error")
        assert "Send an amount of the event's currency such as '250'" in opened.text(
            "#console-error"
        )
        assert host.manage.get(f"/events/{event_id}").json()["attendee_budget"] == "12.5"
        opened.screenshot("console-money-editor")
        opened.assert_clean()


# --- console: spend, forecast and the alert banner ---------------------------------------------


def test_console_shows_the_spend_the_report_gives_the_forecast_and_the_alert(
    host: AppHost, sim: Simulator, browser: Browser, storage: Storage
) -> None:
    one = cost_of_small(host, sim)
    # Three small chats' worth and a little: two chats and an embedding cross 50 %, not 80 %.
    budget = 3 * one + 5000
    event = EventSetup(host, sim, name="Priced lab", budget=amount(budget))
    ada, grace = event.key, event.add_attendee("grace@example.com")["api_key"]
    with tab(browser, timezone_id="UTC") as opened:
        page = opened.page
        opened.sign_in(host.base, OPERATOR_KEY)
        open_usage(opened, event.id)
        # Nothing spent yet: no banner, the whole budget left.
        assert page.locator("#budget-banner").is_hidden()
        assert tiles(opened)["Spend (USD)"] == "0"
        assert opened.text("#budget-forecast") == (
            f"{amount(budget)} of {amount(budget)} USD left; nothing spent in the last 24 hours."
        )
        assert opened.text("#chart-spend-deployments").endswith("No traffic yet.")

        assert chat(host, ada, SMALL).status_code == 200
        assert chat(host, grace, SMALL).status_code == 200
        embedded = host.http.post(EMBED, json={"input": "a few words"}, headers={"api-key": grace})
        assert embedded.status_code == 200, embedded.text
        records = storage.usage(event.id, expect=3)
        spent = sum(int(r["cost_nano"]) for r in records)
        assert spent * 100 >= 50 * budget and spent * 100 < 80 * budget

        def alerts() -> list[dict[str, Any]]:
            return host.manage.get(f"/events/{event.id}/alerts").json()

        wait_until(lambda: len(alerts()) == 1, timeout=15)
        page.click("#refresh-usage")
        banner = page.locator("#budget-banner")
        banner.wait_for(state="visible")
        for chart in ("spend-per-day", "spend-deployments", "spend-attendees"):  # drawn last
            page.wait_for_selector(f"#chart-{chart} svg rect")
        [alert] = alerts()
        assert (
            alert["threshold_percent"] == 50 and Decimal(alert["budget"]) == Decimal(budget) / 10**9
        )
        assert banner.inner_text().startswith(
            f"Budget alert: 50% of the event budget reached ({alert['spent']} of "
            f"{alert['budget']} USD spent at "
        )

        # The tiles and the spend charts show the report's figures, exactly.
        totals = report(host, event.id, "day")["totals"]
        assert totals["cost_nano"] == spent and totals["requests"] == 3
        shown = tiles(opened)
        assert shown["Spend (USD)"] == totals["cost"] == amount(spent)
        assert shown["Unpriced calls"] == "0" and shown["Requests"] == "3"
        per_deployment = {
            r["deployment"]: r["cost"] for r in report(host, event.id, "deployment")["rows"]
        }
        assert set(per_deployment) == {"gpt-4o-mini", "text-embedding-3-small"}
        assert bars(opened, "chart-spend-deployments") == per_deployment
        per_attendee = {r["user"]: r["cost"] for r in report(host, event.id, "attendee")["rows"]}
        assert set(per_attendee) == {"attendee@example.com", "grace@example.com"}
        assert bars(opened, "chart-spend-attendees") == per_attendee
        # The bars are as long as their spend: grace's (a chat and an embedding) the longest.
        widths = page.locator("#chart-spend-attendees svg rect").evaluate_all(
            "rs => rs.map((r) => Number(r.getAttribute('width')))"
        )
        assert widths[0] > widths[1] > 2 and widths[1] / widths[0] == pytest.approx(
            float(per_attendee["attendee@example.com"]) / float(per_attendee["grace@example.com"]),
            rel=0.01,
        )
        assert page.locator("#chart-spend-per-day svg rect").count() == 1

        # The forecast: what is left, at the last 24 hours' rate, lasts until a time it names.
        forecast = opened.text("#budget-forecast")
        left = budget - spent
        said = re.fullmatch(
            rf"{re.escape(amount(left))} of {re.escape(amount(budget))} USD left\. At the last 24 "
            rf"hours' rate \({re.escape(amount(spent))} USD a day\) the budget lasts until (.+)\.",
            forecast,
        )
        assert said, forecast
        shown_until = said[1].replace("\u202f", " ")  # some ICU versions: a narrow space
        until = datetime.strptime(shown_until, "%m/%d/%Y, %I:%M:%S %p").replace(tzinfo=UTC)
        expected = datetime.now(UTC) + timedelta(days=left / spent)
        assert abs(until - expected) < timedelta(minutes=5), (until, expected)
        opened.screenshot("console-money")

        # Fired once: another look and the list still holds the one alert.
        page.click("#refresh-usage")
        wait_until(lambda: page.locator("#refresh-usage").is_enabled())
        assert len(alerts()) == 1 and banner.is_visible()
        opened.assert_clean()


# --- playground: the key's budget ----------------------------------------------------------------


def test_playground_shows_the_budget_left_from_each_answer_and_the_refusal(
    host: AppHost, sim: Simulator, browser: Browser, storage: Storage
) -> None:
    event = EventSetup(host, sim, name="Budget day", attendee_budget="0.5")
    with tab(browser) as opened:
        page = opened.page
        opened.connect(host.base, event.key)
        assert opened.text("#budget-left") == "0.5 of 0.5 USD"
        assert page.locator("#budget-meter").is_visible()
        page.evaluate(WATCH, "#budget-left")

        page.fill("#prompt", STREAMED)
        with page.expect_response(lambda r: "/chat/completions" in r.url) as answered:
            page.click("#send")
        header = answered.value.headers["x-aiproxy-budget-remaining"]
        page.wait_for_selector(".message.assistant:not(.streaming)")
        [record] = storage.usage(event.id, expect=1)
        settled = amount(500_000_000 - int(record["cost_nano"]))
        wait_until(lambda: opened.text("#budget-left") == f"{settled} of 0.5 USD")
        seen = page.evaluate("window.__seen['#budget-left']")
        # While the answer streamed: what its header said was left (its worst case held);
        # once it was recorded: the budget less what it cost.
        assert f"{header} of 0.5 USD" in seen, seen
        assert seen.index(f"{header} of 0.5 USD") < seen.index(f"{settled} of 0.5 USD")
        assert Decimal(header) < Decimal(settled) < Decimal("0.5")
        width = page.evaluate(
            "getComputedStyle(document.querySelector('#budget-meter span')).width"
        )
        assert width != "0px"
        opened.screenshot("playground-budget")
        opened.assert_clean()

    # A key whose budget is spent: the refusal, in words and with the server's specifics.
    tight = EventSetup(
        host, sim, name="Tight lab", attendee_budget=amount(2 * cost_of_small(host, sim))
    )
    statuses = []
    for _ in range(10):  # until the budget refuses a small call
        statuses.append(chat(host, tight.key, SMALL).status_code)
        if statuses[-1] != 200:
            break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    with tab(browser) as opened:
        page = opened.page
        opened.connect(host.base, tight.key)
        left = host.http.get("/eventinfo", headers={"api-key": tight.key}).json()["budget"]["left"]
        assert opened.text("#budget-left") == f"{left} of {tight.event['attendee_budget']} USD"
        page.fill("#prompt", "One more, please")
        page.click("#send")
        notice = page.locator("#chat-error")
        notice.wait_for(state="visible")
        assert notice.get_attribute("data-code") == "attendee_budget_exhausted"
        said = notice.inner_text()
        assert "You have used your budget for this event." in said
        assert (
            f"You have spent your budget of {tight.event['attendee_budget']} USD for 'Tight lab' "
            f"({left} USD left)." in said
        )
        assert page.input_value("#prompt") == "One more, please"
        # A long amount stays inside its card.
        card = page.locator("#budget-facts").evaluate(
            "el => el.closest('.card').getBoundingClientRect().right"
        )
        shown = page.locator("#budget-left").evaluate("el => el.getBoundingClientRect().right")
        assert shown <= card
        opened.screenshot("playground-budget-spent")
        opened.assert_clean()

    # Both budgets: what is left is of the tighter, so both are named, not one as its total.
    both = EventSetup(host, sim, attendee_budget="2", attendee_daily_budget="0.75")
    with tab(browser) as opened:
        opened.connect(host.base, both.key)
        assert opened.text("#budget-left") == "0.75 USD (budgets: 2 for the event, 0.75 a day)"
        opened.assert_clean()
