"""Headless Chromium for the page tests: Debian's chromium driven by Playwright.

Playwright's own browser download does not work here, so the tests launch the system
Chromium (`make test` installs it). `AIPROXY_CHROMIUM` names another Chromium binary.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Route, sync_playwright

__all__ = ["FAKE_MICROPHONE", "Browser", "Route", "Tab", "chromium", "chromium_path", "tab"]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
# Without the background-networking flags Chromium keeps calling home, which this network refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Collects CSP violations from inside the page too, in case a console line is missed.
_WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + (e.blockedURI || "inline"));
});
"""


def chromium_path() -> str | None:
    """The Chromium to drive: AIPROXY_CHROMIUM, else `chromium` on the PATH."""
    return os.environ.get("AIPROXY_CHROMIUM") or shutil.which("chromium")


# A microphone without a microphone: Chromium's fake device (a beep) and no permission prompt.
FAKE_MICROPHONE = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")


@contextmanager
def chromium(*flags: str) -> Iterator[Browser]:
    """One headless Chromium (with `flags` besides ours); each test opens its own context (a
    fresh profile)."""
    path = chromium_path()
    assert path, "Chromium is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = _launch(playwright, path, flags)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def for_tests(*flags: str) -> Iterator[Browser]:
    """Chromium for a module's tests (the `browser` fixture); they are skipped where none is
    installed, but never in CI, where `make test` installs it."""
    import pytest

    if chromium_path() is None and not os.environ.get("CI"):
        pytest.skip("Chromium is not installed (`make test` installs Debian's chromium)")
    with chromium(*flags) as launched:
        yield launched


def _launch(playwright: Playwright, path: str, flags: tuple[str, ...] = ()) -> Browser:
    return playwright.chromium.launch(
        executable_path=path, headless=True, args=[*CHROMIUM_FLAGS, *flags], timeout=30_000
    )


@dataclass
class Tab:
    """A page in a fresh browser context, with what its console said."""

    page: Page
    console: list[ConsoleMessage] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def csp_violations(self) -> list[str]:
        said = [m.text for m in self.console if "Content Security Policy" in m.text]
        seen = self.page.evaluate("window.__cspViolations || []")
        return said + [f"securitypolicyviolation: {v}" for v in seen]

    def assert_clean(self) -> None:
        """No CSP violation and no uncaught script error on the page."""
        violations = self.csp_violations()
        assert violations == [], violations
        assert self.errors == []

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def connect(self, base: str, key: str) -> None:
        """The playground at `base` (the app's /api), connected with an attendee's key."""
        self.page.goto(f"{base}/playground")
        self.page.fill("#key", key)
        self.page.click("#connect")
        self.page.wait_for_selector("#play-view:not([hidden])")

    def sign_in(self, base: str, operator_key: str) -> None:
        """The console at `base` (the app's /api), signed in with the operator key."""
        self.page.goto(f"{base}/console")
        self.page.fill("#operator-key", operator_key)
        self.page.click("#sign-in")
        self.page.wait_for_selector("#console-view:not([hidden])")


@contextmanager
def tab(browser: Browser, **context: Any) -> Iterator[Tab]:
    options: dict[str, Any] = {
        "viewport": {"width": 1280, "height": 860},
        "locale": "en-US",
        "device_scale_factor": 1,
        **context,
    }
    browser_context = browser.new_context(**options)
    browser_context.set_default_timeout(10_000)
    page = browser_context.new_page()
    page.add_init_script(_WATCH_CSP)
    opened = Tab(page)
    page.on("console", lambda message: opened.console.append(message))
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())
    try:
        yield opened
    finally:
        browser_context.close()
