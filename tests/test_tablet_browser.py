"""The therapist's tablet page in a real headless Chromium against a real controller:
the face map, depth entry within the zone's range, arming, passes, a refusal, a fault
acknowledged with a confirmation, End confirmed while zones remain, the report."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from controller.sessions import EventKind
from simulated_pen.faults import Fault, FaultKind

from .browser import (
    PORTRAIT,
    Served,
    arm_at,
    browser,  # noqa: F401 - a fixture
    has_class,
    serve,
    shot,
    sign_in,
    start_session,
    tap_zone,
    zone,
)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in serve(tmp_path):
        yield s


async def test_face_map_depth_range_passes_and_the_report(
    browser: Browser,  # noqa: F811
    served: Served,
) -> None:
    page, errors = await served.tablet(browser)
    await page.goto(served.url)
    await sign_in(page)
    await expect(page.locator("#who")).to_have_text("therapist (therapist)")
    sid = await start_session(page, served)
    await shot(page, "treatment-start")

    # The map shows each zone of the plan with passes left and its limit; off-plan zones faint.
    nose = zone(page, "nose")
    await expect(nose).to_have_attribute(
        "aria-label", "nose: 2 of 2 passes left, depth limit 0.75 mm"
    )
    await expect(nose.locator(".zone-label")).to_contain_text("2 of 2 left")
    await expect(nose.locator(".zone-label")).to_contain_text("≤ 0.75 mm")
    await expect(zone(page, "neck")).to_have_class(has_class("off-plan"))
    await expect(page.locator("#arm")).to_be_disabled()
    await expect(page.locator("#arm-why")).to_contain_text("No treatment zone is selected")

    # Depth entry shows the zone's range and refuses what the gate would refuse.
    await tap_zone(page, "nose")
    await expect(nose).to_have_class(has_class("selected"))
    await expect(page.locator("#depth-range")).to_have_text("Allowed: 0.00 mm to 0.75 mm")
    await page.fill("#depth-mm", "0.80")
    await expect(page.locator("#depth-set")).to_be_disabled()
    why = page.locator("#depth-why")
    await expect(why).to_contain_text("deeper than the nose allows (0.75 mm)")
    # The limit itself is allowed (the monitor's tolerance is the pen's accuracy).
    await page.fill("#depth-mm", "0.75")
    await expect(page.locator("#depth-set")).to_be_enabled()
    await page.click("#depth-set")
    await served.rig.wait_event(EventKind.DEPTH_SET, depth_um=750)
    await expect(page.locator("#arm")).to_be_enabled()
    await page.click("#arm")
    await expect(page.locator("#pen-state")).to_have_text("ARMED")
    await expect(page.locator("#pen-indicator")).to_have_class(has_class("armed"))
    # Armed: the depth cannot change, and the page says why before anyone taps.
    await expect(page.locator("#depth-set")).to_be_disabled()
    await expect(page.locator("#depth-why")).to_contain_text("armed")
    await shot(page, "treatment-armed")

    for done in (1, 2):  # the therapist's hand on the simulated pen
        await served.rig.one_pass()
        await expect(nose.locator(".zone-label")).to_contain_text(
            "done" if done == 2 else "1 of 2 left"
        )
    await expect(nose).to_have_class(has_class("done"))
    await expect(nose).to_have_attribute("aria-disabled", "true")
    await expect(page.locator("#live-depth")).to_have_text(re.compile(r"\d\.\d\d mm"))
    await expect(page.locator("#live-speed")).to_have_text(re.compile(r"\d+ Hz"))
    await expect(page.locator("#pen-state")).to_have_text("DISARMED")  # zone used up
    # A done zone is locked: a tap on it asks the controller nothing (the tap on the
    # cheeks after it is answered, so the nose's would have been seen first).
    await nose.locator(".zone-label").tap(force=True)

    # A fault: distinct from a notice, acknowledged only with a confirmation.
    await arm_at(page, served, "cheeks", "1.20")
    selected = [e.detail["zone_id"] for e in served.rig.events if e.kind is EventKind.ZONE_SELECTED]
    assert selected == ["nose", "cheeks"]
    served.rig.physical(0, lambda p, now: p.set_contact(True, now))
    served.rig.physical(0, lambda p, now: p.press_button(now))
    await expect(page.locator("#pen-state")).to_have_text("NEEDLE RUNNING")
    await expect(page.locator("#pen-indicator")).to_have_class(has_class("running"))
    await shot(page, "treatment-running")
    overshoot = Fault(FaultKind.DEPTH_OVERSHOOT, amount=300)
    served.rig.physical(0, lambda p, now: p.inject(overshoot, now))
    await expect(page.locator("#fault-panel")).to_be_visible()
    await expect(page.locator("#pen-state")).to_have_text("FAULT")
    served.rig.physical(0, lambda p, now: p.release_button(now))
    served.rig.physical(0, lambda p, now: p.set_contact(False, now))
    served.rig.physical(0, lambda p, now: p.inject(Fault(FaultKind.CLEAR), now))
    await shot(page, "treatment-fault")
    await page.click("#ack")
    await expect(page.locator("#ack-yes")).to_be_disabled()  # not in one tap
    await page.check("#ack-checked")
    await page.click("#ack-yes")
    await expect(page.locator("#fault-panel")).to_be_hidden()
    await expect(page.locator("#session-state")).to_have_text("active")

    # End with zones left: a confirmation naming them.
    await page.click("#end")
    await expect(page.locator("#end-confirm")).to_be_visible()
    await expect(page.locator("#end-confirm-text")).to_contain_text("forehead")
    await shot(page, "treatment-end-confirm")
    await page.click("#end-no")
    session = served.rig.service.session(sid)
    assert session is not None and str(session.state) == "active"
    await page.click("#end")
    await page.click("#end-yes")

    # The report: peak measured depth per pass, stops, faults, times, therapist.
    await expect(page.locator("#report-view")).to_be_visible()
    await expect(page.locator('#report-summary dd[data-field="therapist"]')).to_have_text("t-demo")
    await expect(page.locator('#report-summary dd[data-field="faults"]')).not_to_have_text("0")
    await expect(page.locator('#report-summary dd[data-field="stops"]')).not_to_have_text("0")
    row = page.locator('#report-zones tr[data-zone="nose"]')
    await expect(row).to_contain_text("2 / 2")
    await expect(row).to_contain_text("0.75 mm")
    passes = page.locator("#report-passes tbody tr")
    await expect(passes).to_have_count(3)
    await expect(passes.nth(0)).to_contain_text(re.compile(r"0\.7\d mm"))  # peak measured
    await expect(page.locator('#report-events tr[data-kind="fault"]').first).to_be_visible()
    csv_button = await page.locator("#report-csv").bounding_box()
    assert csv_button is not None and csv_button["height"] >= 56 and csv_button["width"] >= 180
    async with page.expect_download() as download_info:
        await page.click("#report-csv")
    download = await download_info.value
    text = await asyncio.to_thread(Path(await download.path()).read_text)
    assert text.startswith("session_id,") and "nose" in text
    await shot(page, "report")
    await page.emulate_media(media="print")
    await expect(page.locator("#report-csv")).to_be_hidden()
    await expect(page.locator("#stop-dock")).to_be_hidden()
    await page.screenshot(path=str(Path(__file__).parent / "artifacts" / "report-print.png"))
    assert errors == []


async def test_face_neck_decolletage_and_body_maps(
    browser: Browser,  # noqa: F811
    served: Served,
) -> None:
    page, errors = await served.tablet(browser, PORTRAIT)
    await page.goto(served.url)
    await sign_in(page)
    await start_session(page, served, plan="face_neck_decolletage")
    for zone_id in ("forehead", "periorbital", "neck", "decolletage"):
        await expect(zone(page, zone_id)).to_have_class(has_class("in-plan"))
    await expect(zone(page, "stretch_marks")).to_have_count(0)  # no body on this plan
    await shot(page, "face-map-neck-decolletage")
    await page.click("#end")
    await page.click("#end-yes")
    await expect(page.locator("#report-view")).to_be_visible()
    await page.click("#report-back")
    served.rig.physical(0, lambda p, now: p.remove_cartridge(now))
    served.rig.physical(0, lambda p, now: p.insert_cartridge(now))
    await start_session(page, served, plan="acne_scars")
    await expect(zone(page, "acne_scars")).to_have_class(has_class("in-plan"))
    await expect(zone(page, "stretch_marks")).to_have_class(has_class("off-plan"))
    await expect(zone(page, "cheeks")).to_have_class(has_class("in-plan"))
    await tap_zone(page, "acne_scars")
    await expect(page.locator("#depth-range")).to_have_text("Allowed: 0.00 mm to 2.00 mm")
    await shot(page, "face-map-body")
    assert errors == []
