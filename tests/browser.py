"""What the tablet page's browser tests share: real headless Chromium, a real controller
on simulated pens behind the real API server, and a few steps every test takes.

Uses the system Chromium (/usr/bin/chromium); Playwright never downloads a browser.
Where it is missing the tests fail (never skip) and say how to install it.
Screenshots go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from controller.api import UserStore
from controller.api.server import ApiServer
from controller.config import ApiSettings
from controller.influx import InfluxSettings
from controller.sessions import EventKind

from .controller_rig import Rig, edge_for, start_rig, stop_rig

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
PORTRAIT = {"width": 1024, "height": 1366}
LANDSCAPE = {"width": 1366, "height": 1024}
USERS = UserStore.demo()  # hashing is slow on purpose: once per module that imports this


def require_chromium() -> None:
    """Fail, never skip, without the browser: a browser test that does not run proves nothing."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"{CHROMIUM} is missing, so the tablet page cannot be tested. Install it with "
            "`make test` (it installs the Debian packages it needs) or "
            "`sudo apt-get install chromium`.",
            pytrace=False,
        )


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    require_chromium()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Served:
    rig: Rig
    server: ApiServer
    contexts: list[BrowserContext] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url + "/"

    async def tablet(
        self, browser: Browser, viewport: dict[str, int] | None = None
    ) -> tuple[Page, list[str]]:
        """A touch tablet (landscape unless told) and the page's errors, CSP ones included."""
        context = await browser.new_context(viewport=viewport or LANDSCAPE, has_touch=True)
        self.contexts.append(context)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "console",
            lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
        )
        return page, errors


async def serve(
    tmp_path: Path, *, pens: int = 1, influx: InfluxSettings | None = None, **app: Any
) -> AsyncIterator[Served]:
    rig, collector = await start_rig(tmp_path, pens=pens)
    try:
        settings = ApiSettings(**{"port": 0, **app})
        async with edge_for(rig.service, users=USERS, api=settings, charts=influx) as edge:
            assert edge.server is not None
            served = Served(rig, edge.server)
            try:
                yield served
            finally:
                for context in served.contexts:
                    await context.close()
    finally:
        await stop_rig(rig, collector)


async def sign_in(page: Page, user: str = "therapist") -> None:
    await page.fill("#username", user)
    await page.fill("#password", f"demo-{user}")
    await page.click("#login")


async def start_session(
    page: Page, served: Served, plan: str = "full_face", pen: str = "room1"
) -> str:
    """From the new-session form to the treatment view; the session's id."""
    await expect(page.locator("#setup-view")).to_be_visible()
    await expect(page.locator(f'#pen option[value="{pen}"]')).to_be_attached()
    await page.select_option("#pen", pen)
    await page.fill("#client-ref", "C-2001")
    await page.select_option("#plan", plan)
    await page.click("#create")
    await expect(page.locator("#treat-view")).to_be_visible()
    await expect(page.locator("#session-state")).to_have_text("active")
    return await page.inner_text("#session-id")


def zone(page: Page, zone_id: str) -> Any:
    return page.locator(f'#face-map .zone[data-zone="{zone_id}"]')


async def tap_zone(page: Page, zone_id: str) -> None:
    """Tap a zone where a finger would: on its label (a zone of two shapes, such as the
    cheeks, has the middle of its bounding box on another zone)."""
    await zone(page, zone_id).locator(".zone-label").tap()


async def arm_at(page: Page, served: Served, zone_id: str, depth_mm: str) -> None:
    """Select the zone on the map, set the depth, arm; the indicator says ARMED."""
    await tap_zone(page, zone_id)
    await expect(zone(page, zone_id)).to_have_class(_has("selected"))
    await page.fill("#depth-mm", depth_mm)
    await expect(page.locator("#depth-set")).to_be_enabled()
    await page.click("#depth-set")
    await served.rig.wait_event(EventKind.DEPTH_SET)
    await expect(page.locator("#arm")).to_be_enabled()
    await page.click("#arm")
    await expect(page.locator("#pen-state")).to_have_text("ARMED")


def _has(cls: str) -> Any:
    import re

    return re.compile(rf"\b{cls}\b")


has_class: Callable[[str], Any] = _has


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)
