"""The therapist's tablet page in a real headless Chromium against a real controller.

Uses the system Chromium (/usr/bin/chromium); Playwright never downloads a browser.
Screenshots go to tests/artifacts/ (not committed).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from controller.api import UserStore, create_app
from controller.api.server import ApiServer
from controller.sessions import EventKind

from .controller_rig import Rig, eventually, start_rig, stop_rig

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian chromium")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Rig, ApiServer]]:
    rig, collector = await start_rig(tmp_path)
    server = ApiServer(create_app(rig.service, UserStore.demo()))
    await server.start()
    try:
        yield rig, server
    finally:
        await server.stop()
        await stop_rig(rig, collector)


async def test_therapist_treats_a_zone_to_its_limit_in_the_browser(
    browser: Browser, served: tuple[Rig, ApiServer]
) -> None:
    rig, server = served
    # A tablet in landscape, touch enabled.
    context = await browser.new_context(viewport={"width": 1180, "height": 820}, has_touch=True)
    page: Page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(server.url + "/")
        await page.fill("#username", "therapist")
        await page.fill("#password", "demo-therapist")
        await page.click("#login")

        await expect(page.locator("#setup-view")).to_be_visible()
        await expect(page.locator("#who")).to_have_text("therapist (therapist)")
        await page.select_option("#pen", "room1")
        await page.fill("#client-ref", "C-2001")
        await page.select_option("#plan", "full_face")
        await page.click("#create")

        await expect(page.locator("#treat-view")).to_be_visible()
        await expect(page.locator("#session-state")).to_have_text("active")
        sid = await page.inner_text("#session-id")
        tile = page.locator('.zone[data-zone="periorbital"]')
        await expect(tile.locator(".limits")).to_have_text("max 0.50 mm")
        await tile.click()
        await expect(tile).to_have_class(re.compile(r"\bselected\b"))

        # Deeper than the zone allows: refused in plain words, never clamped.
        await page.fill("#depth-mm", "0.60")
        await page.click("#depth-set")
        await expect(page.locator("#problem")).to_be_visible()
        await expect(page.locator("#problem-message")).to_contain_text("0.60 mm")
        await expect(page.locator("#problem-message")).to_contain_text("0.50 mm")
        await expect(page.locator("#problem-remediation")).not_to_be_empty()
        assert _setpoint(rig, sid) is None
        await page.click("#problem-close")
        await expect(page.locator("#problem")).to_be_hidden()

        await page.fill("#depth-mm", "0.35")
        await page.click("#depth-up")  # 0.40 mm
        await page.click("#depth-set")
        await eventually(lambda: _setpoint(rig, sid) == 400)
        await page.click("#arm")
        await expect(page.locator("#pen-state")).to_have_text("armed")
        assert rig.pen().armed

        for done in (1, 2):  # the therapist's hand on the simulated pen
            await rig.one_pass()
            await expect(tile.locator(".passes")).to_have_text(f"passes {done} / 2")
        await expect(tile).to_have_class(re.compile(r"\bdone\b"))
        await expect(page.locator("#live-depth")).to_have_text(re.compile(r"\d\.\d\d mm"))
        await expect(page.locator("#live-speed")).to_have_text(re.compile(r"\d+ Hz"))

        # One more: the pen will not arm again for this zone, and the page says why.
        await page.click("#arm")
        refused = await rig.wait_event(EventKind.REFUSED, code="zone_passes_used")
        problem = page.locator("#problem")
        await expect(problem).to_be_visible()
        await expect(page.locator("#problem-message")).to_have_text(refused.detail["message"])
        await expect(page.locator("#problem-remediation")).to_have_text(
            refused.detail["remediation"]
        )
        assert not rig.pen().armed
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "tablet-refusal.png"), full_page=True)

        await page.click("#problem-close")
        await page.click("#end")
        await expect(page.locator("#report-view")).to_be_visible()
        row = page.locator("#report-table tbody tr", has_text="Periorbital")
        await expect(row).to_contain_text("2 / 2")
        await expect(row).to_contain_text("0.40 mm")
        await page.screenshot(path=str(ARTIFACTS / "tablet-report.png"), full_page=True)
        session = rig.service.session(sid)
        assert session is not None and str(session.state) == "ended"
        assert errors == []
    finally:
        await context.close()


def _setpoint(rig: Rig, sid: str) -> int | None:
    session = rig.service.session(sid)
    return session.depth_setpoint_um if session else None
