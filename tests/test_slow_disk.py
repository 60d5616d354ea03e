"""A disk that does not answer delays no Stop, and lets no Arm out before its record.

The journal's commit is held (a gate on the writer thread) while pen 2's
therapist arms; pen 1 breaches meanwhile. Deterministic: nothing here depends
on how fast the machine is, only on what happened before the disk answered.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from controller.sessions import (
    ArmPen,
    CreateSession,
    EventKind,
    SelectZone,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from simulated_pen.faults import Fault, FaultKind

from .controller_rig import THERAPIST, Rig, eventually, start_rig, stop_rig


async def test_a_held_commit_for_one_pen_delays_no_stop_and_holds_its_own_arm(
    tmp_path: Path,
) -> None:
    rig, collector = await start_rig(tmp_path, pens=2)
    svc = rig.service
    gate = threading.Event()
    held = threading.Event()
    write = svc.journal.write

    def slow_write(rows: Any) -> None:
        held.set()
        gate.wait(10.0)  # the disk does not answer until the test says so
        write(rows)

    try:
        await rig.start_treating("cheeks", 1000, index=0)
        sid2 = await _ready_to_arm(rig, index=1)
        rig.physical(0, lambda p, now: p.set_contact(True, now))
        rig.physical(0, lambda p, now: p.press_button(now))
        await rig.wait_event(EventKind.PASS_STARTED)
        svc.journal.write = slow_write  # type: ignore[method-assign]
        svc.act(ArmPen(sid2, THERAPIST))  # answers at once: the loop never waits for disk
        await eventually(held.is_set, within=2.0, what="pen 2's arming record is being written")
        assert not rig.pen(1).armed  # its Arm waits for its own record
        rig.physical(0, lambda p, now: p.inject(Fault(FaultKind.DEPTH_OVERSHOOT, amount=300), now))
        # Pen 1 is stopped although no record can be written.
        await eventually(lambda: not rig.pen(0).running, within=2.0, what="pen 1 stopped")
        assert not rig.pen(0).armed
        assert not gate.is_set() and not rig.pen(1).armed
        gate.set()
        await eventually(lambda: rig.pen(1).armed, within=2.0, what="pen 2 armed once durable")
        stop = await rig.wait_event(EventKind.STOP_SENT, reason="depth_overshoot")
        assert stop.port == rig.port(0)
    finally:
        gate.set()
        svc.journal.write = write  # type: ignore[method-assign]
        await stop_rig(rig, collector)


async def test_a_stop_withdraws_an_arm_still_waiting_for_its_record(tmp_path: Path) -> None:
    rig, collector = await start_rig(tmp_path)
    svc = rig.service
    gate = threading.Event()
    held = threading.Event()
    write = svc.journal.write

    def slow_write(rows: Any) -> None:
        held.set()
        gate.wait(10.0)
        write(rows)

    try:
        sid = await _ready_to_arm(rig, index=0)
        svc.journal.write = slow_write  # type: ignore[method-assign]
        svc.act(ArmPen(sid, THERAPIST))
        await eventually(held.is_set, within=2.0)
        svc.act(StopPen(sid, THERAPIST))  # the therapist changes their mind at once
        gate.set()
        await rig.wait_event(EventKind.DISARMED, reason="arm_withdrawn")
        assert svc.executor.counters.withdrawn == 1
        assert not rig.pen().armed  # the Arm never left
        assert svc.registry.pen(rig.port()).arm == "disarmed"
    finally:
        gate.set()
        svc.journal.write = write  # type: ignore[method-assign]
        await stop_rig(rig, collector)


async def _ready_to_arm(rig: Rig, index: int) -> str:
    svc = rig.service
    sid: str = svc.new_session_id()
    svc.act(CreateSession(sid, rig.port(index), "client-ref-2", "full_face", THERAPIST))
    svc.act(StartSession(sid, THERAPIST))
    svc.act(SelectZone(sid, "cheeks", THERAPIST))
    svc.act(SetZoneDepth(sid, 1000, THERAPIST))
    return sid
