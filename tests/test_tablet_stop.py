"""STOP never moves: its bounding box, measured in real Chromium, is the same in every state
of a session, in portrait (1024x1366) and landscape (1366x1024); and it is the largest
control on the treatment view."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from controller.sessions import EventKind
from simulated_pen.faults import Fault, FaultKind

from .browser import (
    LANDSCAPE,
    PORTRAIT,
    Served,
    arm_at,
    browser,  # noqa: F401 - a fixture
    serve,
    shot,
    sign_in,
    start_session,
)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in serve(tmp_path):
        yield s


async def stop_box(page: Page) -> dict[str, float]:
    await expect(page.locator("#stop")).to_be_visible()
    box = await page.locator("#stop").bounding_box()
    assert box is not None
    return box


async def largest_other_control(page: Page) -> float:
    areas: list[float] = await page.eval_on_selector_all(
        "#treat-view button:not([hidden])",
        "els => els.filter(e => e.offsetParent !== null)"
        ".map(e => e.getBoundingClientRect()).map(r => r.width * r.height)",
    )
    return max(areas)


@pytest.mark.parametrize("viewport", [PORTRAIT, LANDSCAPE], ids=["portrait", "landscape"])
async def test_stop_keeps_its_place_in_every_state_of_a_session(
    browser: Browser,  # noqa: F811
    served: Served,
    viewport: dict[str, int],
) -> None:
    page, errors = await served.tablet(browser, viewport)
    name = "portrait" if viewport is PORTRAIT else "landscape"
    await page.goto(served.url)
    await sign_in(page)
    sid = await start_session(page, served)
    first = await stop_box(page)
    stop_area = first["width"] * first["height"]
    assert stop_area > await largest_other_control(page), "STOP is the largest control"
    seen: list[tuple[str, dict[str, Any]]] = []

    async def state(label: str) -> None:
        seen.append((label, await stop_box(page)))

    await state("active, no zone")
    await arm_at(page, served, "cheeks", "1.20")
    await state("armed")
    served.rig.physical(0, lambda p, now: p.set_contact(True, now))
    served.rig.physical(0, lambda p, now: p.press_button(now))
    await expect(page.locator("#pen-state")).to_have_text("NEEDLE RUNNING")
    await expect(page.locator("#live-depth")).not_to_have_text("–")
    await state("running, live values")
    served.rig.physical(0, lambda p, now: p.release_button(now))
    served.rig.physical(0, lambda p, now: p.set_contact(False, now))
    await expect(page.locator("#pen-state")).to_have_text("ARMED")
    await page.click("#depth-set", force=True)  # refused while armed: a problem appears
    await state("problem shown")
    served.rig.physical(0, lambda p, now: p.set_contact(True, now))
    served.rig.physical(0, lambda p, now: p.press_button(now))
    overshoot = Fault(FaultKind.DEPTH_OVERSHOOT, amount=300)
    served.rig.physical(0, lambda p, now: p.inject(overshoot, now))
    await expect(page.locator("#fault-panel")).to_be_visible()
    served.rig.physical(0, lambda p, now: p.release_button(now))
    served.rig.physical(0, lambda p, now: p.set_contact(False, now))
    served.rig.physical(0, lambda p, now: p.inject(Fault(FaultKind.CLEAR), now))
    await state("fault")
    await page.click("#ack")
    await state("fault confirmation")
    await page.check("#ack-checked")
    await page.click("#ack-yes")
    await expect(page.locator("#session-state")).to_have_text("active")
    await page.click("#pause")
    await expect(page.locator("#session-state")).to_have_text("paused")
    await state("paused")
    await page.click("#resume")
    await expect(page.locator("#session-state")).to_have_text("active")
    await page.click("#end")
    await expect(page.locator("#end-confirm")).to_be_visible()
    await state("end confirmation")
    await page.click("#end-no")
    await page.context.set_offline(True)
    await expect(page.locator("#offline")).to_be_visible()
    await expect(page.locator("#pen-state")).to_have_text("UNKNOWN")
    await state("offline")
    await shot(page, f"stop-offline-{name}")
    await page.context.set_offline(False)
    await expect(page.locator("#offline")).to_be_hidden()
    await page.click("#stop")
    await served.rig.wait_event(EventKind.STOP_SENT)
    await state("stopped")
    for label, box in seen:
        assert box == first, f"STOP moved when {label}: {box} != {first}"
    session = served.rig.service.session(sid)
    assert session is not None
    assert errors == []
