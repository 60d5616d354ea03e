"""A stalled and a dropped network in real Chromium: the offline banner within a second,
controls that need the controller disabled with the reason, and on return the state
rebuilt from the server (what happened meanwhile), never what the page last showed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Route, expect

from controller.sessions import EventKind

from .browser import (
    Served,
    arm_at,
    browser,  # noqa: F401 - a fixture
    serve,
    shot,
    sign_in,
    start_session,
    zone,
)

#: The issue's bar for noticing a stall or a drop.
WITHIN_MS = 1000


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in serve(tmp_path):
        yield s


async def one_pass_done(page: Page, served: Served) -> None:
    """Arm the nose and make its first pass; the page shows one of two left, armed."""
    await page.goto(served.url)
    await sign_in(page)
    await start_session(page, served)
    await arm_at(page, served, "nose", "0.50")
    await served.rig.one_pass()
    await expect(zone(page, "nose")).to_have_attribute("data-left", "1")
    await expect(page.locator("#pen-state")).to_have_text("ARMED")


async def offline_shows_no_false_state(page: Page, started: float) -> None:
    await expect(page.locator("#offline")).to_be_visible(timeout=WITHIN_MS)
    noticed = time.monotonic() - started
    assert noticed < 1.5, f"the banner took {noticed:.2f} s"
    await expect(page.locator("#pen-state")).to_have_text("UNKNOWN")
    await expect(page.locator("#live-depth")).to_have_text("–")
    for button in ("#arm", "#depth-set", "#end", "#pause"):
        await expect(page.locator(button)).to_be_disabled()
    await expect(page.locator("#arm-why")).to_contain_text("Offline")
    await expect(page.locator("#stop")).to_be_enabled()  # STOP is never disabled


async def rebuilt_from_the_server(page: Page) -> None:
    """The second pass happened while the page was cut off: it shows it now."""
    await expect(page.locator("#offline")).to_be_hidden(timeout=3000)
    await expect(zone(page, "nose")).to_have_attribute("data-left", "0")
    await expect(zone(page, "nose")).to_have_attribute("aria-disabled", "true")
    await expect(page.locator("#pen-state")).to_have_text("DISARMED")
    await expect(page.locator("#arm-why")).to_contain_text("passes allowed on the nose are done")


async def test_a_stalled_network_is_noticed_and_the_state_rebuilt(
    browser: Browser,  # noqa: F811
    served: Served,
) -> None:
    page, errors = await served.tablet(browser)
    await one_pass_done(page, served)
    held: list[Route] = []

    async def stall(route: Route) -> None:
        held.append(route)  # never answered: the network stalls

    started = time.monotonic()
    await page.route("**/api/**", stall)
    await page.route_web_socket("**/live", lambda ws: None)  # a new stream stalls too
    await offline_shows_no_false_state(page, started)
    await shot(page, "network-stalled")
    await served.rig.one_pass()  # the nose's second pass, unseen by the page
    await served.rig.wait_event(EventKind.ZONE_COMPLETED)
    await page.unroute_all(behavior="ignoreErrors")  # the held requests fail; new ones pass
    assert held, "the stall held the heartbeat's requests"
    await rebuilt_from_the_server(page)
    await shot(page, "network-stall-rebuilt")
    assert errors == []


async def test_a_dropped_network_is_noticed_and_the_state_rebuilt(
    browser: Browser,  # noqa: F811
    served: Served,
) -> None:
    page, errors = await served.tablet(browser)
    await one_pass_done(page, served)
    started = time.monotonic()
    await page.context.set_offline(True)
    await offline_shows_no_false_state(page, started)
    await shot(page, "network-dropped")
    await served.rig.one_pass()
    await served.rig.wait_event(EventKind.ZONE_COMPLETED)
    await page.context.set_offline(False)
    await rebuilt_from_the_server(page)
    assert errors == []
