"""The controller frozen or killed mid-pass: the pen stops by its lease, nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from controller.safety.context import SessionState
from controller.sessions import EventKind, ResumeSession
from firmware_protocol.messages import StopReason
from simulated_pen.runner import PenRunner

from .controller_rig import THERAPIST, eventually, start_rig, stop_rig

REPO = Path(__file__).resolve().parent.parent
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
        "controller.cli",
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
        _serial, path = (await _line(sim.stdout, "SIM-")).split()
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


async def test_controller_killed_mid_pass_recovers_exactly(tmp_path: Path) -> None:
    """kill -9 mid-pass: the pen stops by its lease; a restart recovers every record."""
    state = tmp_path / "state"
    async with PenRunner(seed=11) as runner:
        (slot,) = await runner.start(1, "pty")
        pen = slot.pen
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.controller_process",
            str(state),
            slot.address,
            "cheeks",
            "1000",
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None
        try:
            sid = (await _line(proc.stdout, "armed")).split()[1]
            cartridge = pen.firmware.cartridge_id
            # One whole pass, then a second one that the kill cuts short.
            runner.apply(pen, lambda p, now: p.set_contact(True, now))
            runner.apply(pen, lambda p, now: p.press_button(now))
            await _line(proc.stdout, "pass_started 1")
            runner.apply(pen, lambda p, now: p.release_button(now))
            await _line(proc.stdout, "pass_ended 1")
            runner.apply(pen, lambda p, now: p.press_button(now))
            await _line(proc.stdout, "pass_started 2")
            assert pen.running
            killed_at = runner.now()
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await eventually(lambda: not pen.running, within=2.0)
        stopped_after = runner.now() - killed_at
        assert stopped_after <= LEASE_S + 0.05
        assert not pen.armed

        # Restart: a new controller on the same journal and the same pen.
        rig, collector = await start_rig(tmp_path, state_dir=state, runner=runner, slots=[slot])
        try:
            session = rig.service.session(sid)
            assert session is not None
            assert session.state is SessionState.INTERRUPTED
            assert session.zones["cheeks"].passes_done == 2
            assert [p.number for p in session.passes] == [1, 2]
            record = rig.service.registry.ledger.record(cartridge)
            assert record is not None
            assert record.session_id == sid
            assert not pen.armed  # nothing resumed by itself
            # Only the therapist resumes, and arming is a separate act.
            rig.service.act(ResumeSession(sid, THERAPIST))
            assert not pen.armed
            await rig.arm(sid)
            assert pen.armed
        finally:
            await stop_rig(rig, collector, close_runner=False)
