"""The operator console in a real browser (Debian's Chromium, driven by Playwright): what an
operator sees and clicks. Screenshots of each view go to ``artifacts/console/`` (or
``$FRAISEQL_ARTIFACTS/console/``) for CI to keep."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

import fraiseql
from fraiseql.scalars import ID
from fraiseql.testing.sinks import SinkResponse, WebhookSink

TOKEN = "console-browser-token-0123456789"
FAST = fraiseql.Retry(max_attempts=2, backoff_strategy="fixed", initial_delay_ms=1, max_delay_ms=5)
HOSTILE_KEY = '<img src=x onerror="document.body.dataset.owned=1">'
SCREENSHOTS = (
    Path(os.environ.get("FRAISEQL_ARTIFACTS", Path(__file__).parent.parent / "artifacts")) / "console"
)


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "the console's browser tests need Chromium: scripts/setup.sh installs it with "
        "`apt-get install chromium`; install it or put it on PATH"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == [], f"the page raised: {errors}"


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def declare(sink: WebhookSink) -> None:
    @fraiseql.type
    class Order:
        id: ID
        status: str
        total: float

    fraiseql.observer(
        name="notify_warehouse",
        entity="Order",
        event="INSERT",
        condition="total > 10",
        actions=[fraiseql.webhook(url=f"{sink.url}/orders")],
        retry=FAST,
    )


def emit(engine: fraiseql.Engine, key: str, total: float) -> None:
    engine.emit("Order", "INSERT", new={"id": key, "status": "new", "total": total})


def test_an_operator_finds_a_dead_letter_and_retries_it(
    registry: fraiseql.Registry, page: Page, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRAISEQL_TEST_ADMIN_TOKEN", TOKEN)
    config: dict[str, Any] = {
        "observers": {"backend": "in_memory", "admin_token_env": "FRAISEQL_TEST_ADMIN_TOKEN"}
    }
    with WebhookSink(default=503) as sink:
        declare(sink)
        with fraiseql.Engine(config, http_port=0) as engine:
            emit(engine, "o-small", 1.0)
            emit(engine, "o-1001", 50.0)
            emit(engine, "o-1002", 70.0)
            engine.drain()
            base = f"http://127.0.0.1:{engine.http_port}"

            page.goto(f"{base}/#observers")
            row = page.locator('tr[data-observer="notify_warehouse"]')
            expect(row).to_contain_text("total > 10")
            expect(row).to_contain_text(f"Webhook to {sink.url}/")  # the path may hold a secret: hidden
            expect(page.locator("#received")).to_contain_text("3 events received")
            expect(page.locator("#dlq-count")).to_have_text("2")
            screenshot(page, "observers")

            page.click('nav a[data-tab="dlq"]')
            rows = page.locator("#dlq-rows tr")
            expect(rows).to_have_count(2)
            expect(rows.first).to_contain_text("503")
            screenshot(page, "dead-letters")

            # Without the token a retry is refused, and the page says why.
            rows.first.get_by_role("button", name="Retry").click()
            expect(page.locator("#message")).to_contain_text("this needs the admin token")
            expect(rows).to_have_count(2)

            page.fill("#token", TOKEN)
            page.click("#token-form button")
            expect(page.locator("#mode")).to_have_text("admin")

            # Search narrows the list to one entry; its detail shows the event.
            page.fill("#search", "o-1002")
            page.click("#search-form button[type=submit]")
            expect(rows).to_have_count(1)
            rows.first.locator("a").click()
            expect(page.locator("#detail")).to_be_visible()
            expect(page.locator("#detail-event")).to_contain_text('"o-1002"')
            expect(page.locator("#detail-error")).to_contain_text("503")
            screenshot(page, "dead-letter-detail")

            # The receiver is back: the retry delivers and the entry leaves the queue.
            sink.default = SinkResponse(status=200)
            page.click("#detail-retry")
            expect(page.locator("#message")).to_contain_text("1 delivered")
            expect(page.locator("#detail")).to_be_hidden()
            expect(rows).to_have_count(0)
            delivered = [r for r in sink.requests if r.status == 200]
            assert len(delivered) == 1 and b"o-1002" in delivered[0].body

            # The last one is purged, after the confirmation.
            page.fill("#search", "")
            page.click("#search-form button[type=submit]")
            expect(rows).to_have_count(1)
            page.check("#select-all")
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#purge-selected")
            expect(page.locator("#message")).to_contain_text("1 purged")
            expect(page.locator("#dlq-empty")).to_be_visible()
            assert engine.dlq() == []

            page.click('nav a[data-tab="events"]')
            events = page.locator("#event-rows tr")
            expect(events).to_have_count(3)
            expect(events.filter(has_text="o-small")).to_contain_text("notify_warehouse: no match")
            expect(events.filter(has_text="o-1001")).to_contain_text("notify_warehouse: dead lettered")
            screenshot(page, "recent-events")


def test_without_a_token_the_page_is_read_only_and_shows_hostile_text_as_text(
    registry: fraiseql.Registry, page: Page
) -> None:
    with WebhookSink(default=503) as sink:
        declare(sink)
        with fraiseql.Engine(http_port=0) as engine:
            emit(engine, HOSTILE_KEY, 99.0)
            engine.drain()
            base = f"http://127.0.0.1:{engine.http_port}"
            page.goto(f"{base}/#dlq")
            expect(page.locator("#mode")).to_have_text("read-only")
            expect(page.locator("#dlq-rows tr")).to_have_count(1)
            expect(page.locator("#dlq-rows button.mutation")).to_be_hidden()
            expect(page.locator("#token-form")).to_be_hidden()
            screenshot(page, "read-only")

            page.goto(f"{base}/#events")
            expect(page.locator("#event-rows")).to_contain_text(HOSTILE_KEY)
            expect(page.locator("#event-rows img")).to_have_count(0)
            assert page.evaluate("document.body.dataset.owned") is None
