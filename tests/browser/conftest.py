"""Browser tests of the web console: Playwright (from PyPI) driving Debian's Chromium.

Playwright's own browser download is not used: ``scripts/setup`` installs ``chromium``, and
every browser here is ``/usr/bin/chromium``, headless, with a fresh user-data directory.
``IMPULS_CONSOLE_SCREENSHOTS=1`` makes the tests write the screenshots of ``docs/console.md``
(``docs/console/*.png``); without it they write nothing into the tree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

from bench.console import CHROMIUM, CHROMIUM_ARGS
from tests.helpers import ROOT, Server

VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS = os.environ.get("IMPULS_CONSOLE_SCREENSHOTS", "") == "1"
SHOTS_DIR = ROOT / "docs" / "console"
#: how long a test waits for what a page should show (generous: never the budget under test)
WAIT_MS = 30_000



@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """Playwright's driver for one test module: its sync API runs an event loop in this thread
    while it is open, so it is closed before tests that run their own (``asyncio.run``)."""
    if not CHROMIUM.is_file():
        pytest.skip("Chromium is not installed (scripts/setup installs the Debian package chromium)")
    with sync_playwright() as pw:
        yield pw


Browser = Callable[[], Page]


@pytest.fixture
def browser(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Factory: a new Chromium (its own fresh user-data directory, so its own cookies) and a
    page in it; all are closed at the end of the test."""
    contexts: list[BrowserContext] = []

    def open_page() -> Page:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT, device_scale_factor=1, locale="en-US",
            timezone_id="UTC")
        contexts.append(context)
        context.set_default_timeout(WAIT_MS)
        page = context.pages[0] if context.pages else context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())  # the console's "are you sure?"
        return page

    yield open_page
    for context in contexts:
        context.close()


def sign_in(page: Page, server: Server, key: str) -> None:
    page.goto(f"{server.url}/console/")
    page.fill("#key", key)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/console/functions$"))


def shot(page: Page, name: str, full_page: bool = False) -> None:
    """A screenshot for docs/console.md, when IMPULS_CONSOLE_SCREENSHOTS=1."""
    if SCREENSHOTS:
        SHOTS_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS_DIR / f"{name}.png"), full_page=full_page, animations="disabled",
                        caret="hide")


def csrf_of(page: Page) -> str:
    """The session's CSRF token, as every form on the page carries it."""
    return str(page.locator("input[name=csrf]").first.get_attribute("value"))


def make_key(server: Server, name: str, scope: str, functions: str = "*") -> str:
    r = server.request("POST", "/api/v1/keys", json={"name": name, "scope": scope, "functions": functions})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server (SQLite, the host's default sandbox) shared by a test module."""
    srv = Server(tmp_path_factory.mktemp("console") / "data").start()
    yield srv
    srv.stop()
