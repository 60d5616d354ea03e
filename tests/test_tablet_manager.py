"""The manager's and the admin's views in real Chromium: every pen live, an override with a
reason, the audit log, charts drawn from a real influxd through the API; users, and STOP
for any pen."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, expect

from controller.influx import InfluxClient, InfluxSettings, format_line
from controller.sessions import EventKind
from devtools.stack.processes import ServerProcess

from .browser import (
    LANDSCAPE,
    browser,  # noqa: F401 - a fixture
    serve,
    shot,
    sign_in,
)


def point(
    measurement: str, kind: str, tags: dict[str, str], fields: dict[str, Any], at: float
) -> str:
    return format_line(
        measurement,
        {"clinic": "c1", "device": "SIM-0001", "kind": kind, **tags},
        {"seq": 1, **fields},
        int(at * 1e9),
    )


async def fill_influx(settings: InfluxSettings) -> None:
    """A few days of a clinic, in the measurements of docs/INFLUX_SCHEMA.md."""
    now, day = time.time(), 86400.0
    lines = []
    for d in range(3):
        for n in range(d + 1):
            lines.append(
                point(
                    "sessions",
                    "session_created",
                    {"therapist": "t-1"},
                    {"session": f"s-{d}-{n}"},
                    now - d * day - n,
                )
            )
    for z, peak, limit in (
        ("cheeks", 1210.0, 1500.0),
        ("nose", 700.0, 750.0),
        ("chin", 1400.0, 1500.0),
    ):
        lines.append(point("zones", "pass_ended", {"zone": z}, {"peak_depth_um": peak}, now))
        lines.append(point("zones", "depth_set", {"zone": z}, {"depth_um": peak - 10}, now))
        lines.append(point("zones", "zone_selected", {"zone": z}, {"max_depth_um": limit}, now))
    lines.append(point("safety", "refused", {"code": "depth_above_zone_limit"}, {}, now))
    lines.append(point("safety", "fault", {"code": "depth_overshoot"}, {}, now - day))
    async with InfluxClient(settings) as client:
        await client.create_database()
        await client.write(lines)


async def test_manager_sees_pens_live_overrides_reads_the_audit_and_charts(
    browser: Browser,  # noqa: F811
    tmp_path: Path,
    influxd: ServerProcess,
) -> None:
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", timeout=5)
    await fill_influx(settings)
    async for served in serve(tmp_path, pens=2, influx=settings):
        # Signed in first: an Argon2 check (four lanes) on a loaded machine can starve the
        # pens' event loop in this one-process rig, and this test is not about that.
        page, errors = await served.tablet(browser, LANDSCAPE)
        await page.goto(served.url)
        await sign_in(page, "manager")
        await expect(page.locator("#manager-view")).to_be_visible()
        # A therapist treats on room1 (the scripted one: through the controller's interface).
        therapist = served.rig.therapist(0)
        sid = therapist.open_session("C-9", "full_face")
        therapist.select_zone(sid, "cheeks")
        therapist.set_depth(sid, 900)
        await therapist.arm(sid)
        row = page.locator('#pens-table tr[data-port="room1"]')
        await expect(row).to_contain_text("ARMED")
        await expect(row).to_contain_text("t-0001")
        await expect(row).to_contain_text("cheeks (0/4)")
        await expect(row).to_contain_text("0.90 mm")
        await expect(page.locator('#pens-table tr[data-port="room2"]')).to_contain_text("free")
        # Live: a pass on room1 shows without a reload.
        await served.rig.one_pass()
        await expect(row).to_contain_text("cheeks (1/4)")

        # An override, with a reason.
        await page.select_option("#override-session", sid)
        await page.select_option("#override-zone", "cheeks")
        await page.fill("#override-passes", "5")
        await page.fill("#override-reason", "thick scar tissue, per protocol")
        await page.click("#override-apply")
        await expect(page.locator("#override-result")).to_contain_text("5 passes")
        session = served.rig.service.session(sid)
        assert session is not None and session.zones["cheeks"].override is not None
        assert session.zones["cheeks"].override.reason == "thick scar tissue, per protocol"
        await expect(page.locator('#audit-table tr[data-kind="override"]')).to_have_count(1)
        await expect(row).to_contain_text("cheeks (1/5)")

        # Charts drawn from InfluxDB (through the API), one canvas each.
        for chart in ("sessions", "passes", "depth", "safety"):
            await expect(page.locator(f"#chart-{chart} .uplot canvas")).to_have_count(1)
            # Axes are drawn only for a chart with data.
            await expect(page.locator(f"#chart-{chart} .u-axis:not(.u-off)")).to_have_count(2)
        await expect(page.locator("#charts-problem")).to_be_hidden()
        await expect(page.locator("#chart-passes .u-legend, #chart-passes")).not_to_have_count(0)
        await page.locator("#chart-depth").scroll_into_view_if_needed()
        await shot(page, "manager-charts")
        await page.evaluate("window.scrollTo(0, 0)")
        await shot(page, "manager")

        # The session's report from the list of the day.
        await page.click(f'#sessions-table tr[data-session="{sid}"] button')
        await expect(page.locator("#report-view")).to_be_visible()
        await expect(page.locator('#report-summary dd[data-field="overrides"]')).to_have_text("1")
        await page.click("#report-back")
        await expect(page.locator("#manager-view")).to_be_visible()

        # STOP any pen from the list.
        await page.click('#pens-table tr[data-port="room1"] button.stop-small')
        await served.rig.wait_event(EventKind.STOP_SENT)
        await expect(row).not_to_contain_text("ARMED")
        assert errors == []


async def test_admin_sees_users_and_stops_any_pen(
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    async for served in serve(tmp_path):
        page, errors = await served.tablet(browser)
        await page.goto(served.url)
        await sign_in(page, "admin")
        await expect(page.locator("#admin-view")).to_be_visible()
        therapist = served.rig.therapist(0)
        sid = therapist.open_session("C-10", "full_face")
        therapist.select_zone(sid, "chin")
        therapist.set_depth(sid, 1000)
        await therapist.arm(sid)
        await expect(page.locator("#users-table tbody tr")).to_have_count(3)
        await expect(page.locator("#users-table")).to_contain_text("manager")
        row = page.locator('#admin-pens tr[data-port="room1"]')
        await expect(row).to_contain_text("ARMED")
        await expect(page.locator("#setup-view")).to_be_hidden()  # admins never treat
        await shot(page, "admin")
        await row.locator("button.stop-small").click()
        stop = await served.rig.wait_event(EventKind.STOP_SENT)
        assert stop.session_id == sid
        await expect(row).not_to_contain_text("ARMED")
        assert errors == []
