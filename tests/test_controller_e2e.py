"""The controller against simulated pens over real pseudo-terminals (product.md §4)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.audit import AuditKind, AuditRecord, read_records
from controller.errors import ActionRefused
from controller.safety.gate import RefusalReason
from controller.sessions import (
    CreateSession,
    EndSession,
    EventKind,
    SelectZone,
    SetZoneDepth,
    StartSession,
)
from simulated_pen.faults import Fault, FaultKind

from .controller_rig import THERAPIST, Rig, eventually, policy_with, start_rig, stop_rig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig, collector = await start_rig(tmp_path)
    yield rig
    await stop_rig(rig, collector)


async def test_depth_above_the_zone_limit_is_refused_and_never_sent(rig: Rig) -> None:
    svc = rig.service
    sid = svc.new_session_id()
    svc.act(CreateSession(sid, rig.port(), "client-ref-1", "full_face", THERAPIST))
    svc.act(StartSession(sid, THERAPIST))
    svc.act(SelectZone(sid, "periorbital", THERAPIST))
    sent_before = svc.counters.commands_sent
    with pytest.raises(ActionRefused) as info:
        svc.act(SetZoneDepth(sid, 600, THERAPIST))  # periorbital allows 0.50 mm
    refusal = info.value.refusal
    assert refusal.code is RefusalReason.DEPTH_ABOVE_ZONE_LIMIT
    assert "0.60 mm" in refusal.message
    assert "0.50 mm" in refusal.message
    assert refusal.remediation
    assert svc.counters.commands_sent == sent_before  # nothing went to the pen
    assert rig.pen().firmware.depth_set_um != 600


async def test_depth_overshoot_stops_the_needle_at_once(rig: Rig) -> None:
    sid = await rig.start_treating("cheeks", 1000)
    rig.physical(0, lambda p, now: p.set_contact(True, now))
    rig.physical(0, lambda p, now: p.press_button(now))
    await rig.wait_event(EventKind.PASS_STARTED)
    rig.physical(0, lambda p, now: p.inject(Fault(FaultKind.DEPTH_OVERSHOOT, amount=300), now))
    stop = await rig.wait_event(EventKind.STOP_SENT, reason="depth_overshoot")
    assert stop.session_id == sid
    await eventually(lambda: not rig.pen().running, within=1.0)
    await rig.wait_event(EventKind.PASS_ENDED)
    stops = [r for r in _audit(rig) if r.kind == AuditKind.STOP]
    assert len(stops) == 1  # recorded once, however many breaching samples followed
    assert stops[0].session_id == sid
    assert stops[0].remediation


async def test_pass_limit_disarms_the_zone(rig: Rig) -> None:
    sid = await rig.start_treating("periorbital", 400)  # 2 passes allowed
    await rig.one_pass()
    await rig.one_pass()
    await eventually(lambda: not rig.pen().armed, within=1.0)
    with pytest.raises(ActionRefused) as info:
        await rig.arm(sid)
    assert info.value.refusal.code is RefusalReason.ZONE_PASSES_USED
    session = rig.service.session(sid)
    assert session is not None
    assert session.zones["periorbital"].passes_done == 2


async def test_puncture_budget_stops_the_pass(tmp_path: Path) -> None:
    policy = policy_with(tmp_path, "puncture_budget = 20\n")
    rig, collector = await start_rig(tmp_path, policy=policy)
    try:
        await rig.start_treating("forehead", 500)
        rig.physical(0, lambda p, now: p.set_contact(True, now))
        rig.physical(0, lambda p, now: p.press_button(now))
        await rig.wait_event(EventKind.PASS_STARTED)
        await rig.wait_event(EventKind.STOP_SENT, reason="puncture_budget", within=3.0)
        await rig.wait_event(EventKind.PASS_ENDED)
        await eventually(lambda: not rig.pen().running, within=1.0)
        # The budget stops the pass within one telemetry period (at most ~2 strokes late).
        assert 20 <= rig.pen().firmware.strokes <= 24
    finally:
        await stop_rig(rig, collector)


async def test_a_used_cartridge_never_arms_again(rig: Rig) -> None:
    sid = await rig.start_treating("cheeks", 1000)
    await rig.one_pass()
    rig.service.act(EndSession(sid, THERAPIST))
    await rig.wait_event(EventKind.DISARMED)
    svc = rig.service
    second = svc.new_session_id()
    svc.act(CreateSession(second, rig.port(), "client-ref-2", "full_face", THERAPIST))
    svc.act(StartSession(second, THERAPIST))
    svc.act(SelectZone(second, "cheeks", THERAPIST))
    svc.act(SetZoneDepth(second, 1000, THERAPIST))
    with pytest.raises(ActionRefused) as info:
        await rig.arm(second)
    assert info.value.refusal.code is RefusalReason.CARTRIDGE_SPENT
    assert not rig.pen().armed
    # A fresh cartridge arms.
    rig.physical(0, lambda p, now: p.remove_cartridge(now))
    fresh = rig.physical(0, lambda p, now: p.insert_cartridge(now))
    await rig.wait_event(EventKind.CARTRIDGE_INSERTED)
    assert svc.registry.pen(rig.port()).cartridge_id == fresh
    await rig.arm(second)
    assert rig.pen().armed
    # The journal, written piecewise, holds exactly the registry's whole state.
    assert svc.journaled_registry() == svc.registry.to_dict()


def _audit(rig: Rig) -> list[AuditRecord]:
    rig.service.sync_records()
    return read_records(rig.service.settings.state_dir / "audit.db")


async def test_a_pen_with_another_serial_than_configured_is_never_armed(tmp_path: Path) -> None:
    rig, collector = await start_rig(tmp_path, expected_serials=["PEN-00042"])
    try:
        svc = rig.service
        serial = rig.pen().serial
        refusals = [r for r in _audit(rig) if r.kind == AuditKind.REFUSAL]
        assert any(serial in r.message and "PEN-00042" in r.message for r in refusals)
        sid = svc.new_session_id()
        svc.act(CreateSession(sid, rig.port(), "client-ref-1", "full_face", THERAPIST))
        with pytest.raises(ActionRefused) as info:
            svc.act(StartSession(sid, THERAPIST))
        refusal = info.value.refusal
        assert refusal.code is RefusalReason.UNEXPECTED_PEN
        assert serial in refusal.message and "PEN-00042" in refusal.message
        assert not rig.pen().armed
    finally:
        await stop_rig(rig, collector)
