"""Browser-test harness: the app on a real loopback server, driven in Debian's Chromium by Playwright.

Playwright's own browser download is not used: ``executable_path`` points at the system Chromium
(``/usr/bin/chromium``, Debian's ``chromium`` package; ``RLHF_PL_CHROMIUM`` overrides it). A
machine without it fails these tests, saying how to install it: they are never skipped.

Fixtures: ``live_app`` (a started uvicorn server on 127.0.0.1 with a worker on the tiny model and
a fresh SQLite database; ``.url``, ``.harness``), ``browser`` (one Chromium per test module),
``page`` (a fresh browser context per test). :func:`log_in` logs a page in.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import pytest
from app_helpers import PASSWORD, Harness, live_server, make_harness, make_worker

from rlhf_pl.plugins.samplers import NoEOSSampler


def chromium_path() -> str:
    path = os.environ.get("RLHF_PL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail("the browser tests need Chromium: apt-get install chromium (Debian's package; .ci/run does it) "
                    "or RLHF_PL_CHROMIUM=<path to a Chromium binary>")
    return path


@dataclass
class LiveApp:
    url: str
    harness: Harness


class SlowSampler(NoEOSSampler):
    """Never EOS (answers are never empty) and 10 ms per token, so a browser sees an answer stream in
    many pieces rather than in one read."""

    def sample(self, logits: Any, generator: Any = None) -> Any:
        time.sleep(0.01)
        return super().sample(logits, generator)


@pytest.fixture()
def live_app(tmp_path, tiny_model, tiny_tokenizer):
    worker = make_worker(tiny_model, tiny_tokenizer, SlowSampler(1.0, tiny_tokenizer.eos_token_id),
                         max_new_tokens=40)
    harness = make_harness(f"sqlite:///{tmp_path / 'app.db'}", worker, policy="tiny-policy", max_new_tokens=40)
    try:
        with live_server(harness.app) as url:
            yield LiveApp(url, harness)
    finally:
        harness.close()


@pytest.fixture(scope="module")
def browser():
    """One Chromium per test module: Playwright's sync API keeps an event loop on this thread while it
    runs, and later tests that call ``asyncio.run`` need it gone."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    tab.js_errors = errors  # a test asserts the page ran without JavaScript errors
    yield tab
    context.close()


def log_in(page: Any, base_url: str, name: str, password: str = PASSWORD, landing: str = "/chat") -> None:
    """Log ``page`` in through the login form; waits for ``landing`` (where ``/`` leads: the chat page)."""
    page.goto(f"{base_url}/login")
    page.fill("#username", name)
    page.fill("#password", password)
    page.click("#login-button")
    page.wait_for_url(f"{base_url}{landing}**")
