"""Scenario: the controller killed (SIGKILL) mid-pass and restarted; also frozen.

The pen, on its own clock, stops by its lease; the restarted controller finds the
session INTERRUPTED in its journal with every pass and the cartridge record, and
does not treat again until the therapist resumes and arms.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from controller.errors import ActionRefused
from controller.safety.gate import RefusalReason
from controller.sessions import (
    ArmPen,
    CreateSession,
    EndSession,
    EventKind,
    ResumeSession,
    SelectZone,
    SetZoneDepth,
    StartSession,
)
from firmware_protocol.messages import StopReason
from simulated_pen.runner import PenRunner

from ..controller_rig import THERAPIST, eventually, start_rig, stop_rig
from .conftest import Record
from .figures import Figures

REPO = Path(__file__).resolve().parents[2]
KILLS = 3  # cheeks allows 4 passes: one left for the therapist afterwards
LEASE_S = 0.250
MAX_RATE_HZ = 150


async def _line(stream: asyncio.StreamReader, prefix: str, within: float = 10.0) -> str:
    async with asyncio.timeout(within):
        while True:
            raw = await stream.readline()
            if not raw:
                raise EOFError(f"process ended before printing {prefix!r}")
            line = raw.decode().strip()
            if line.startswith(prefix):
                return line


async def test_frozen_controller_lets_the_lease_expire(tmp_path: Path) -> None:
    """Block the controller's event loop mid-pass: the pen, in its own process, stops."""
    sim = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penctl",
        "simulate",
        "--pens",
        "1",
        "--auto-hand",
        "--seed",
        "5",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert sim.stdout is not None
    try:
        # SERIAL ADDRESS control=CONTROL (the pen's control port, unused here)
        _serial, path, _control = (await _line(sim.stdout, "SIM-")).split()
        rig, collector = await start_rig(tmp_path, urls=[path])
        try:
            sid = await rig.start_treating("cheeks", 1000)
            started = await rig.wait_event(EventKind.PASS_STARTED, within=10.0)
            frozen_at = time.time()
            time.sleep(1.0)  # the controller hangs: no renewals, no reads  # noqa: ASYNC251
            ended = await rig.wait_event(EventKind.PASS_ENDED, within=5.0)
            assert ended.detail["reason"] == StopReason.LEASE_EXPIRED.name.lower()
            # The needle ran at most one lease (plus a control period) past the freeze.
            most = (frozen_at - started.at + LEASE_S + 0.03) * MAX_RATE_HZ
            assert 0 < ended.detail["strokes"] <= most
            session = rig.service.session(sid)
            assert session is not None
            assert session.zones["cheeks"].passes_done == 1
        finally:
            await stop_rig(rig, collector)
    finally:
        sim.send_signal(signal.SIGTERM)
        await sim.wait()


async def test_controller_killed_mid_pass_recovers_exactly(tmp_path: Path, record: Record) -> None:
    """kill -9 mid-pass, again and again: each time the pen stops by its lease, the
    restarted controller recovers the session INTERRUPTED and waits for the therapist;
    the pass counts and the cartridge record come out exact."""
    state = tmp_path / "state"
    stops_ms: list[float] = []
    recovered: list[str] = []
    armed_at_recovery = 0
    async with PenRunner(seed=11) as runner:
        (slot,) = await runner.start(1, "pty")
        pen = slot.pen
        cartridge = pen.firmware.cartridge_id
        assert cartridge is not None
        began = runner.now()
        sid = ""
        for kill in range(1, KILLS + 1):
            proc = await _controller(state, slot.address)
            assert proc.stdout is not None and proc.stdin is not None
            try:
                if kill > 1:
                    line = await _line(proc.stdout, "recovered")
                    recovered.append(line.split()[2])
                    armed_at_recovery += pen.armed
                    proc.stdin.write(b"resume\n")
                sid = (await _line(proc.stdout, "armed")).split()[1]
                runner.apply(pen, lambda p, now: p.set_contact(True, now))
                runner.apply(pen, lambda p, now: p.press_button(now))
                await _line(proc.stdout, f"pass_started {kill}")
                assert pen.running
                killed_at = runner.now()
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await eventually(lambda: not pen.running, within=2.0)
            stops_ms.append(round((runner.now() - killed_at) * 1000, 1))
            runner.apply(pen, lambda p, now: p.release_button(now))
        window = runner.now() - began

        # The last restart, in-process to read its state: exact, and still not treating.
        rig, collector = await start_rig(tmp_path, state_dir=state, runner=runner, slots=[slot])
        try:
            session = rig.service.session(sid)
            assert session is not None
            ledger = rig.service.registry.ledger.record(cartridge)
            figures = record(
                Figures(
                    scenario="controller killed",
                    injected="SIGKILL to the controller process mid-pass, then a restart",
                    faults=KILLS,
                    window_s=round(window, 2),
                    unit="passes",
                    sent=KILLS,
                    received=session.zones["cheeks"].passes_done,
                    lost=KILLS - len(session.passes),
                    duplicated=len(session.passes) - len({p.number for p in session.passes}),
                    pen_stop_ms=stops_ms,
                    lease_ms=int(LEASE_S * 1000),
                    detail={
                        "recovered_states": [*recovered, session.state.value],
                        "armed_after_restart": armed_at_recovery + pen.armed,
                        "pass_numbers": [p.number for p in session.passes],
                        "cartridge_session": ledger.session_id if ledger else None,
                    },
                )
            )
            assert len(figures.pen_stop_ms) == KILLS
            assert figures.pen_stop_ms_max <= LEASE_S * 1000 + 50
            assert figures.detail["recovered_states"] == ["interrupted"] * KILLS
            assert figures.detail["armed_after_restart"] == 0  # nothing resumed by itself
            assert figures.detail["pass_numbers"] == list(range(1, KILLS + 1))
            assert figures.detail["cartridge_session"] == sid
            assert (figures.lost, figures.duplicated) == (0, 0)
            assert figures.received == figures.sent
            # Only the therapist resumes, and arming is a separate act.
            rig.service.act(ResumeSession(sid, THERAPIST))
            assert not pen.armed
            await rig.arm(sid)
            assert pen.armed
        finally:
            await stop_rig(rig, collector, close_runner=False)


async def _controller(state: Path, url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.reliability.controller_process",
        str(state),
        url,
        "cheeks",
        "1000",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )


async def test_a_run_while_the_controller_is_dead_is_recovered_as_a_pass(tmp_path: Path) -> None:
    """kill -9 while the pen is armed and idle; the therapist presses within the lease.

    Nobody hears the run: the restarted controller learns of it from the pen's
    counters, counts it as a pass, binds the cartridge, and the next client is
    refused that cartridge (product.md §4.5, §4.9).
    """
    state = tmp_path / "state"
    async with PenRunner(seed=12) as runner:
        (slot,) = await runner.start(1, "pty")
        pen = slot.pen
        cartridge = pen.firmware.cartridge_id
        proc = await _controller(state, slot.address)
        assert proc.stdout is not None
        try:
            sid = (await _line(proc.stdout, "armed")).split()[1]
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        runner.apply(pen, lambda p, now: p.set_contact(True, now))
        runner.apply(pen, lambda p, now: p.press_button(now))
        assert pen.running  # within the lease: the needle runs with no controller
        await eventually(lambda: not pen.running, within=2.0)  # the lease stops it
        runner.apply(pen, lambda p, now: p.release_button(now))
        strokes = pen.firmware.strokes

        rig, collector = await start_rig(tmp_path, state_dir=state, runner=runner, slots=[slot])
        try:
            await rig.wait_event(EventKind.PASS_ENDED, reason="recovered")
            session = rig.service.session(sid)
            assert session is not None
            assert session.zones["cheeks"].passes_done == 1
            assert session.passes[-1].recovered and session.passes[-1].strokes == strokes
            assert cartridge in session.cartridges_used
            rig.service.act(EndSession(sid, THERAPIST))
            svc = rig.service
            sid2 = svc.new_session_id()
            svc.act(CreateSession(sid2, rig.port(), "client-ref-2", "full_face", THERAPIST))
            svc.act(StartSession(sid2, THERAPIST))
            svc.act(SelectZone(sid2, "cheeks", THERAPIST))
            svc.act(SetZoneDepth(sid2, 1000, THERAPIST))
            with pytest.raises(ActionRefused) as info:
                svc.act(ArmPen(sid2, THERAPIST))
            assert info.value.refusal.code is RefusalReason.CARTRIDGE_SPENT
            assert not pen.armed
        finally:
            await stop_rig(rig, collector, close_runner=False)
