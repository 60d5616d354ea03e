"""The service's query methods: what the tablet API and the scripted therapist read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.errors import ActionRefused
from controller.safety.context import LinkStatus, SessionState
from controller.sessions import CreateSession, EndSession, SetZoneDepth

from .controller_rig import THERAPIST, Rig, start_rig, stop_rig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig, collector = await start_rig(tmp_path)
    yield rig
    await stop_rig(rig, collector)


async def test_pen_view_follows_the_session(rig: Rig) -> None:
    svc, port = rig.service, rig.port()
    idle = svc.pen_view(port)
    assert idle.link is LinkStatus.UP and idle.cartridge_id is not None
    assert idle.session_id is idle.session_state is idle.zone_id is None

    sid = await rig.start_treating("forehead", 800)
    view = svc.pen_view(port)
    assert (view.session_id, view.session_state) == (sid, SessionState.ACTIVE)
    assert (view.zone_id, view.passes_left, view.depth_setpoint_um) == ("forehead", 3, 800)
    assert view.cartridge_id == idle.cartridge_id


async def test_wait_for_pen_wakes_on_the_change_and_times_out_without_one(rig: Rig) -> None:
    svc, port = rig.service, rig.port()
    # Already true: answered at once.
    assert (await svc.wait_for_pen(port, lambda v: v.link is LinkStatus.UP, within=0.01)).link
    with pytest.raises(TimeoutError):
        await svc.wait_for_pen(port, lambda v: v.session_id is not None, within=0.05)

    waiting = asyncio.create_task(svc.wait_for_pen(port, lambda v: v.session_id is not None))
    await asyncio.sleep(0)  # the waiter is registered before the change
    sid = svc.new_session_id()
    svc.act(CreateSession(sid, port, "client-ref-1", "full_face", THERAPIST))
    async with asyncio.timeout(1):
        assert (await waiting).session_id == sid


async def test_policy_sessions_report_and_audit_queries(rig: Rig) -> None:
    svc = rig.service
    plans = {p.plan_id: p for p in svc.plans()}
    zones = svc.zones()
    assert "full_face" in plans and set(plans["full_face"].zone_ids) <= set(zones)
    assert zones["periorbital"].max_depth_um == 500

    sid = await rig.start_treating("periorbital", 400)
    assert [s.session_id for s in svc.sessions()] == [sid]
    report = svc.report(sid)
    assert report is not None and report["session_id"] == sid
    assert svc.report("s-unknown") is None

    with pytest.raises(ActionRefused):
        svc.act(SetZoneDepth(sid, 600, THERAPIST))  # audited as a refusal
    svc.act(EndSession(sid, THERAPIST))
    other = svc.new_session_id()
    svc.act(CreateSession(other, rig.port(), "client-ref-2", "full_face", THERAPIST))
    svc.sync_records()
    every = await svc.audit_records(None, 10_000)
    assert {r.session_id for r in every} >= {sid, other}
    mine = await svc.audit_records(sid, 200)
    assert mine == [r for r in every if r.session_id == sid]
    assert any(r.kind == "refusal" for r in mine)
    assert await svc.audit_records(sid, 1) == mine[-1:]
    assert await svc.audit_records(None, 2) == every[-2:]
