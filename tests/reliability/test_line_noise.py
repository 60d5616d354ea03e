"""Scenario: line noise (bit errors, dropped bytes, duplicated chunks) both ways.

A pen on a real pseudo-terminal treats a zone through a damaged line: every byte
in both directions passes a seeded LossyChannel. Counted: the faults each channel
injected, the CRC errors and retransmissions they caused. Asserted: every pass and
every command arrived exactly once, the strokes add up, and every telemetry frame
arrived in order exactly once or was counted lost by its sequence number (a
duplicated one is delivered again, marked stale, and counted as stale).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from controller.sessions import ArmState, EventKind, SelectZone, SetZoneDepth
from firmware_protocol.messages import Renew
from simulated_pen.channel import ChannelStats
from simulated_pen.faults import LineNoise
from simulated_pen.runner import PenRunner

from ..controller_rig import THERAPIST, Rig, eventually, start_rig, stop_rig
from .conftest import Record
from .figures import Figures, settles
from .probes import probe

NOISE = LineNoise(drop=0.003, corrupt=0.003, duplicate=0.03)
ZONES = {
    "forehead": (800, 3),
    "cheeks": (1000, 4),
    "chin": (1200, 3),
}  # depth, passes; deeper each time
PASSES = sum(passes for _, passes in ZONES.values())


def _faults(stats: ChannelStats | None) -> dict[str, int]:
    assert stats is not None
    return {
        "dropped_bytes": stats.dropped,
        "flipped_bits": stats.corrupted,
        "duplicated_chunks": stats.duplicated,
    }


async def _pass_through_noise(rig: Rig, sid: str) -> None:
    """One pass through the damaged line.

    Three Renews lost in a row let the lease run out: a designed stop (PROTOCOL.md
    section 10.1), which at this noise level happens in some runs, while the pen is
    idle or mid-pass. A therapist arms again and carries on; so does this one. A pass
    cut by the lease still counts, like any other.
    """
    port = rig.port()
    while True:
        if rig.service.registry.pen(port).arm is ArmState.DISARMED:
            await rig.arm(sid)  # the lease ran out since the last pass
        mark = len(rig.events)
        rig.physical(0, lambda p, now: p.set_contact(True, now))
        rig.physical(0, lambda p, now: p.press_button(now))
        first = await rig.wait_after(mark, EventKind.PASS_STARTED, EventKind.DISARMED)
        if first.kind is EventKind.PASS_STARTED:
            break
        # The lease ran out just before the press: no run. Let go, arm, press again.
        rig.physical(0, lambda p, now: p.release_button(now))
        rig.physical(0, lambda p, now: p.set_contact(False, now))
    await asyncio.sleep(0.3)  # the therapist's hand: a pass takes time
    rig.physical(0, lambda p, now: p.release_button(now))
    rig.physical(0, lambda p, now: p.set_contact(False, now))
    await rig.wait_after(mark, EventKind.PASS_ENDED)


async def test_line_noise_both_ways_loses_nothing(tmp_path: Path, record: Record) -> None:
    runner = PenRunner(seed=21)
    slots = await runner.start(1, "pty")
    pen = slots[0].pen
    seen = probe(pen)  # before the controller connects: every frame of the link counted
    rig, collector = await start_rig(tmp_path, runner=runner, slots=slots)
    link = rig.service.pens[rig.port()].link
    try:
        began = time.monotonic()
        runner.apply(pen, lambda p, now: p.set_line_noise(NOISE, now))
        sid = ""
        for zone, (depth, passes) in ZONES.items():
            if not sid:
                sid = await rig.start_treating(zone, depth)
            else:
                # The zone's last pass disarmed the pen; the next zone waits for its word.
                await eventually(
                    lambda: rig.service.registry.pen(rig.port()).arm is ArmState.DISARMED
                )
                rig.service.act(SelectZone(sid, zone, THERAPIST))
                rig.service.act(SetZoneDepth(sid, depth, THERAPIST))
                await rig.arm(sid)
            for _ in range(passes):
                await _pass_through_noise(rig, sid)
        lease_expiries = sum(
            1
            for e in rig.events
            if e.kind is EventKind.DISARMED and e.detail.get("reason") == "lease_expired"
        )
        to_host, to_pen = pen.channel_stats()
        runner.apply(pen, lambda p, now: p.set_line_noise(None, now))
        window = time.monotonic() - began
        # Telemetry is unacknowledged: each frame arrives in order once or is counted lost
        # by its sequence number; a copy arriving later (a duplicated chunk) is delivered
        # too, marked stale (PROTOCOL.md section 9), and counted as stale. The two sides
        # agree whenever no frame is in flight.
        host = link.conn.stats
        telemetry_accounted = await settles(
            lambda: (
                rig.service.counters.telemetry - host.unreliable_stale + host.unreliable_lost
                == seen.telemetry_sent
            ),
            within=2.0,
        )
        # Every command applied once: the last ones may still be in retransmission.
        commands = rig.service.counters
        commands_once = await settles(
            lambda: len(seen.handled) - len(seen.commands(Renew)) == commands.commands_sent, 3.0
        )
        session = rig.service.session(sid)
        assert session is not None
        ended = [e for e in rig.events if e.kind is EventKind.PASS_ENDED]
        strokes = sum(int(e.detail["strokes"]) for e in ended)
        up = f"{host.frames_received} frames to the host, {seen.telemetry_sent} telemetry"
        figures = record(
            Figures(
                scenario="line noise both ways",
                injected=f"byte drops, bit flips, duplicated chunks ({NOISE}) on a pty",
                faults=sum(_faults(to_host).values()) + sum(_faults(to_pen).values()),
                window_s=round(window, 2),
                unit="passes",
                sent=PASSES,
                received=sum(z.passes_done for z in session.zones.values()),
                lost=PASSES - len(ended),
                duplicated=len(ended)
                - len({(e.detail["zone_id"], e.detail["number"]) for e in ended}),
                detail={
                    "pen_to_host": _faults(to_host),
                    "host_to_pen": _faults(to_pen),
                    "host_crc_errors": host.crc_errors,
                    "host_retransmits": host.retransmits,
                    "pen_crc_errors": pen.connection.stats.crc_errors,
                    "pen_retransmits": pen.connection.stats.retransmits,
                    "telemetry_sent": seen.telemetry_sent,
                    "telemetry_received": rig.service.counters.telemetry,
                    "telemetry_lost_counted": host.unreliable_lost,
                    "telemetry_stale_delivered": host.unreliable_stale,
                    "commands_sent": rig.service.counters.commands_sent,
                    "commands_applied": len(seen.handled) - len(seen.commands(Renew)),
                    "strokes_reported": strokes,
                    "strokes_pen_reported": sum(seen.pass_strokes()),
                    "link_connects": link.connects,
                    "lease_expiries_rearmed": lease_expiries,
                    "traffic": up,
                },
            )
        )
        why = f"figures: {figures}"  # a failing run says what it saw
        # The line really was damaged, both ways, enough to matter.
        assert all(v > 0 for v in _faults(to_host).values()), why
        assert sum(_faults(to_pen).values()) > 0, why  # commands and renews are few bytes
        assert figures.detail["host_crc_errors"] > 0, why
        # Nothing reliable was lost or doubled: passes, strokes, commands.
        assert (figures.lost, figures.duplicated) == (0, 0), why
        assert figures.received == figures.sent == PASSES, why
        assert [int(e.detail["strokes"]) for e in ended] == seen.pass_strokes(), why
        assert commands_once, f"a command was lost or applied twice; {why}"
        assert telemetry_accounted, f"a telemetry frame lost uncounted or doubled unmarked; {why}"
        assert figures.detail["telemetry_lost_counted"] > 0, why  # the loss was counted
        assert link.connects == 1, why  # the link rode through the noise
    finally:
        await stop_rig(rig, collector)
