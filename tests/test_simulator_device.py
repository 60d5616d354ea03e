"""SimulatedPen through the real wire protocol, in memory, on a controlled clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_protocol.connection import (
    Connected,
    Delivered,
    HandshakeRefused,
    LinkConfig,
    LinkFailed,
    LinkState,
    MessageReceived,
    PeerRebooted,
)
from firmware_protocol.framing import FrameKind, encode_frame
from firmware_protocol.messages import (
    SCHEMA_HASH,
    Arm,
    Armed,
    CartridgeInserted,
    CommandRefused,
    Disarmed,
    MotorStarted,
    MotorStopped,
    QueryStatus,
    RefusalCode,
    Renew,
    Reset,
    SetDepth,
    Status,
    Stop,
    StopReason,
    Telemetry,
    TelemetryFlag,
    counter_diff,
)
from simulated_pen.device import SimulatedPen
from simulated_pen.faults import (
    Fault,
    FaultKind,
    LineNoise,
    ScriptEntry,
    load_script,
    parse_script,
)
from simulated_pen.testing import PenHarness


def armed(h: PenHarness, lease_ms: int = 250, token: int = 1, depth: int = 1000) -> None:
    h.handshake()
    mark = len(h.received)
    h.send(SetDepth(depth))
    h.send(Arm(lease_ms, token, depth, 2500))
    h.wait_for(Armed, start=mark)


def test_handshake_identifies_the_pen() -> None:
    h = PenHarness(serial="SIM-0042", seed=3)
    ident = h.handshake()
    assert ident.serial_text == "SIM-0042"
    assert ident.schema_hash == SCHEMA_HASH
    assert ident.boot_id == h.pen.boot_id != 0
    assert ident.max_depth_um == 2500
    assert h.host.state is LinkState.READY


def test_arm_and_telemetry_over_the_link() -> None:
    h = PenHarness(seed=1)
    armed(h, lease_ms=2000)
    h.pen.set_contact(True, h.now)
    h.pen.press_button(h.now)
    h.wait_for(MotorStarted)
    start = len(h.received)
    h.advance(0.5)
    tel = [m for _, m in h.received[start:] if isinstance(m, Telemetry)]
    assert 49 <= len(tel) <= 51  # 100 Hz
    assert all(m.flags & TelemetryFlag.MOTOR_RUNNING for m in tel)
    assert h.host.stats.unreliable_lost == 0
    status = h.request(QueryStatus(), Status)
    assert status.flags & TelemetryFlag.ARMED
    assert status.flags & TelemetryFlag.MOTOR_RUNNING
    assert status.cartridge_id == h.pen.firmware.cartridge_id != 0


def test_the_pen_reports_its_cartridge_once_linked() -> None:
    h = PenHarness(seed=1, cartridge=False)
    h.handshake()
    cid = h.pen.insert_cartridge(h.now)
    _, msg = h.wait_for(CartridgeInserted)
    assert msg.cartridge_id == cid


def test_silent_host_lease_expiry_on_a_controlled_clock() -> None:
    h = PenHarness(seed=2)
    armed(h, lease_ms=250)
    armed_at = h.now
    h.pen.set_contact(True, h.now)
    h.pen.press_button(h.now)
    h.host_silent = True  # the host says nothing more: no renewals, no ACKs reach the pen
    _, stopped = h.wait_for(MotorStopped, within=1.0)
    assert stopped.reason == StopReason.LEASE_EXPIRED
    assert h.now == pytest.approx(armed_at + 0.250, abs=1e-9)  # exactly at the deadline
    assert not h.pen.running
    assert not h.pen.armed
    assert tuple(m.reason for m in h.of(Disarmed)) == (StopReason.LEASE_EXPIRED,)


def test_renewals_keep_the_pen_armed() -> None:
    h = PenHarness(seed=2)
    armed(h, lease_ms=250)
    for _ in range(20):
        h.advance(0.1)
        h.send(Renew(1))
    assert h.pen.armed
    assert h.of(Disarmed) == []


def test_a_silent_pen_still_stops_within_its_lease_and_tells_afterwards() -> None:
    h = PenHarness(seed=4)
    armed(h, lease_ms=250)
    h.pen.set_contact(True, h.now)
    h.pen.press_button(h.now)
    h.wait_for(MotorStarted)
    start = h.now
    h.pen.inject(Fault(FaultKind.SILENT, duration=0.5), h.now)
    seen = len(h.received)
    for _ in range(4):  # the host keeps renewing; the pen hears none of it
        h.advance(0.1)
        h.send(Renew(1))
    assert h.received[seen:] == []  # silent: not a byte
    assert not h.pen.running  # yet its lease ran out on time
    h.advance(0.2)  # silence over: the queued events are retransmitted
    (stopped,) = h.of(MotorStopped)
    assert stopped.reason == StopReason.LEASE_EXPIRED
    assert h.of(Disarmed) == [Disarmed(StopReason.LEASE_EXPIRED)]
    started = h.of(MotorStarted)[0]
    assert counter_diff(stopped.device_ms, started.device_ms) <= 250
    assert h.pen.stats.bytes_ignored > 0
    assert h.now - start >= 0.5


def test_reboot_announces_a_new_boot_id_and_the_host_sees_peer_rebooted() -> None:
    h = PenHarness(seed=5)
    armed(h, lease_ms=2000)
    old = h.host.identity
    assert old is not None
    h.pen.inject(Fault(FaultKind.REBOOT), h.now)
    h.pump()
    rebooted = [e for _, e in h.events if isinstance(e, PeerRebooted)]
    assert len(rebooted) == 1
    assert rebooted[0].previous.boot_id == old.boot_id
    assert rebooted[0].current.boot_id == h.pen.boot_id != old.boot_id
    assert h.pen.stats.boots == 2
    assert not h.pen.armed  # a reboot never resumes treatment
    new = h.handshake(nonce=0x7777)
    assert new.boot_id == h.pen.boot_id
    status = h.request(QueryStatus(), Status)
    assert not status.flags & TelemetryFlag.ARMED
    assert not status.flags & TelemetryFlag.DEPTH_SET
    assert status.depth_set_um == 0


def test_reset_command_reboots_after_acknowledging() -> None:
    h = PenHarness(seed=6)
    armed(h, lease_ms=2000)
    old_boot = h.pen.boot_id
    h.send(Reset())
    h.advance(0.05)
    assert h.pen.boot_id != old_boot
    assert any(isinstance(e, PeerRebooted) for _, e in h.events)
    assert Disarmed(StopReason.REBOOT) in h.of(Disarmed)
    assert h.host.stats.retransmits == 0  # the Reset was acknowledged, not resent


def test_same_seed_same_bytes_both_ways() -> None:
    def session(seed: int) -> tuple[bytes, bytes]:
        h = PenHarness(seed=seed, auto_hand=True)
        armed(h, lease_ms=300)
        for _ in range(30):
            h.advance(0.1)
            h.send(Renew(1))
        h.pen.inject(Fault(FaultKind.REBOOT), h.now)
        h.advance(0.3)
        return bytes(h.to_host), bytes(h.to_pen)

    first = session(11)
    assert len(first[0]) > 5_000
    assert session(11) == first
    assert session(12)[0] != first[0]


def test_serials_boot_ids_and_cartridges_are_unique() -> None:
    pens = [SimulatedPen(f"SIM-{i:04d}", now=0.0, seed=1) for i in range(1, 51)]
    boots = {p.boot_id for p in pens}
    carts = {p.firmware.cartridge_id for p in pens}
    for p in pens:
        carts.add(p.insert_cartridge(0.0) if not p.has_cartridge else p.new_cartridge_id())
    assert len(boots) == 50
    assert len(carts) == 100
    with pytest.raises(ValueError, match="serial"):
        SimulatedPen("A-SERIAL-TOO-LONG", now=0.0)


def test_a_schema_mismatch_is_refused_by_the_host() -> None:
    h = PenHarness(seed=1, schema_hash=SCHEMA_HASH ^ 1)
    h.host.start_handshake(0x1234, h.now)
    h.advance(0.2)
    refused = [e for _, e in h.events if isinstance(e, HandshakeRefused)]
    assert refused
    assert "schema" in refused[0].reason
    assert h.host.state is LinkState.REFUSED


def test_the_automatic_hand_makes_passes_while_armed() -> None:
    h = PenHarness(seed=7, auto_hand=True)
    armed(h, lease_ms=300)
    for _ in range(80):  # 8 s of treatment, renewing like a controller would
        h.advance(0.1)
        h.send(Renew(1))
    starts, stops = h.of(MotorStarted), h.of(MotorStopped)
    assert 3 <= len(starts) <= 8
    assert len(stops) >= len(starts) - 1
    assert {m.reason for m in stops} == {StopReason.BUTTON_RELEASED}
    for a, b in zip(starts, stops, strict=False):
        assert 900 <= counter_diff(b.device_ms, a.device_ms) <= 2100  # holds of 1-2 s
        assert counter_diff(b.strokes, a.strokes) > 80
    h.advance(1.0)  # no more renewals: the lease lapses and the hand stops too
    passes = h.pen.hand.passes
    h.advance(3.0)
    assert h.pen.hand.passes == passes
    assert not h.pen.running


def test_fault_script_applies_at_its_times() -> None:
    script = [
        (0.5, Fault(FaultKind.STALL)),
        (1.5, Fault(FaultKind.SILENT, duration=0.2)),
    ]
    h = PenHarness(seed=8, script=script)
    armed(h, lease_ms=2000)
    h.pen.set_contact(True, h.now)
    h.pen.press_button(h.now)
    _, stopped = h.wait_for(MotorStopped, within=1.0)
    assert stopped.reason == StopReason.STALL
    assert 0.5 <= h.now <= 0.6
    h.run(1.6)
    assert h.pen.silent
    h.run(1.8)
    assert not h.pen.silent


def test_fault_script_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(
        """
[[fault]]
at = 2.0
pen = "SIM-0002"
action = "depth_overshoot"
amount_um = 150

[[fault]]
at = 1.0
action = "line_noise"
drop = 0.01
corrupt = 0.001
duration = 3

[[fault]]
at = 5
pen = "*"
action = "silent"
duration = 0.5
""",
        encoding="utf-8",
    )
    entries = load_script(path)
    assert [e.at for e in entries] == [1.0, 2.0, 5.0]
    assert entries[0].fault.noise == LineNoise(drop=0.01, corrupt=0.001)
    assert entries[0].fault.duration == 3.0
    assert entries[1] == ScriptEntry(
        2.0, Fault(FaultKind.DEPTH_OVERSHOOT, amount=150.0), "SIM-0002"
    )
    assert entries[1].applies_to("SIM-0002")
    assert not entries[1].applies_to("SIM-0001")
    assert entries[2].pen is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"fault": [{"at": 1, "action": "explode"}]}, "unknown action"),
        ({"fault": [{"action": "reboot"}]}, "missing 'at'"),
        ({"fault": [{"at": 1, "action": "reboot", "duration": 2}]}, "do not apply"),
        ({"fault": [{"at": 1, "action": "silent"}]}, "duration > 0"),
        ({"fault": [{"at": -1, "action": "reboot"}]}, ">= 0"),
        ({"fault": [{"at": 1, "action": "line_noise", "drop": 2}]}, "probability"),
        ({"faults": []}, "unknown top-level"),
    ],
)
def test_a_bad_fault_script_is_refused_with_a_reason(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_script(doc)


def test_reliable_delivery_survives_line_noise() -> None:
    noise = LineNoise(drop=0.002, corrupt=0.002, duplicate=0.01, delay=0.002, jitter=0.003)
    h = PenHarness(seed=9, line_noise=noise)
    h.handshake()
    for depth in range(100, 2100, 100):  # set while disarmed: an arming fixes the setpoint
        h.send(SetDepth(depth))
        h.advance(0.05)
    status = h.request(QueryStatus(), Status, within=3.0)
    assert status.depth_set_um == 2000  # every setpoint applied, in order
    mark = len(h.received)
    h.send(Arm(2000, 1, 2000, 2500))
    h.wait_for(Armed, within=3.0, start=mark)
    assert h.pen.armed
    tx, rx = h.pen.channel_stats()
    assert tx is not None
    assert rx is not None
    damage = h.host.stats.crc_errors + h.host.stats.discarded_bytes + h.host.stats.unreliable_lost
    assert damage > 0  # the noise really was there
    assert h.pen.connection.stats.duplicates + h.host.stats.retransmits > 0


def test_silence_on_a_delaying_line_neither_stalls_nor_leaks() -> None:
    noise = LineNoise(delay=0.02, jitter=0.01)
    h = PenHarness(seed=13, line_noise=noise)
    armed(h, lease_ms=250)
    h.pen.set_contact(True, h.now)
    h.pen.press_button(h.now)
    h.send(Renew(1))  # in flight on the delaying line when the pen goes silent
    h.pen.inject(Fault(FaultKind.SILENT, duration=0.5), h.now)
    seen = len(h.received)
    h.advance(0.4)  # would raise HarnessStuckError if a due byte were never drained
    late = [m for t, m in h.received[seen:] if t > h.now - 0.35]
    assert late == []  # after the in-flight bytes landed, nothing more came out
    assert h.pen.stats.bytes_ignored > 0
    assert not h.pen.running  # and the lease ran out on time
    h.advance(0.5)
    assert h.of(Disarmed) == [Disarmed(StopReason.LEASE_EXPIRED)]


def test_line_noise_ends_after_its_duration() -> None:
    noise = LineNoise(drop=0.5)
    h = PenHarness(seed=10, script=[(0.0, Fault(FaultKind.LINE_NOISE, duration=1.0, noise=noise))])
    h.advance(0.5)
    assert h.pen.channel_stats() != (None, None)
    h.advance(1.0)
    assert h.pen.channel_stats() == (None, None)
    assert h.handshake().serial_text == "SIM-0001"  # a clean line again


def test_new_host_hello_is_answered() -> None:
    h = PenHarness(seed=12)
    h.handshake(nonce=1)
    h2 = PenHarness(h.pen, now=h.now)  # another host on the same pen (controller restarted)
    h2.handshake(nonce=2)
    assert any(isinstance(e, Connected) for _, e in h2.events)


# --- version 2: the link's rules for the pen ------------------------------------------------


def test_a_version_1_pen_is_refused_with_what_to_do() -> None:
    h = PenHarness(seed=1, protocol_version=1)
    h.host.start_handshake(0x1234, h.now)
    h.advance(0.2)
    refused = [e for _, e in h.events if isinstance(e, HandshakeRefused)]
    assert refused and h.host.state is LinkState.REFUSED
    reason = refused[0].reason
    assert "SIM-0001" in reason and "speaks protocol version 1" in reason
    assert "this controller speaks 2" in reason and "update the pen firmware" in reason
    assert h.host.stats.protocol_errors == 0
    assert h.pen.connection.state is LinkState.IDLE  # the pen never took the link either


def test_a_pen_that_gives_up_the_link_disarms_and_queues_nothing() -> None:
    h = PenHarness(seed=4)
    armed(h, lease_ms=2000)
    h.pen.set_contact(True, h.now)
    h.pen.press_button(h.now)
    h.wait_for(MotorStarted)
    h.host_silent = True  # nothing from the host reaches the pen: no ACK, no Renew
    h.pen.release_button(h.now)  # a reliable event the pen can never get acknowledged
    gave_up_by = h.now + LinkConfig().reliable_failure_time() + 0.05
    h.run(gave_up_by)
    assert h.pen.stats.link_failures == 1
    assert not h.pen.armed  # disarmed at once, well inside its 2 s lease
    assert h.pen.firmware.lease_expiries == 0
    assert h.pen.stats.messages_unlinked >= 1  # Disarmed(LINK_LOST): said to nobody
    h.host_silent = False
    h.send(Renew(1))  # the host's next frame gets an announcement: its link fails too
    h.advance(0.05)
    assert any(isinstance(e, LinkFailed) for _, e in h.events)
    h.handshake(nonce=0x7777)
    status = h.request(QueryStatus(), Status)
    assert not status.flags & (TelemetryFlag.ARMED | TelemetryFlag.MOTOR_RUNNING)
    assert (status.runs, status.fault) == (1, 0)
    assert h.of(Disarmed) == []  # never queued for the new link
    assert StopReason.LINK_LOST not in [m.reason for m in h.of(MotorStopped)]


def test_a_new_host_disarms_the_pen_and_is_told_after_the_identity() -> None:
    h = PenHarness(seed=12)
    armed(h, lease_ms=2000)
    h.pen.set_contact(True, h.now)
    h.pen.press_button(h.now)
    h.wait_for(MotorStarted)
    h2 = PenHarness(h.pen, now=h.now)  # another controller opens the pen
    h2.handshake(nonce=0x4242)
    h2.advance(0.05)
    kinds = [
        type(e.message) if isinstance(e, MessageReceived) else type(e)
        for _, e in h2.events
        if not (isinstance(e, MessageReceived) and isinstance(e.message, Telemetry))
    ]
    assert kinds[:3] == [Connected, MotorStopped, Disarmed]
    assert [m.reason for m in h2.of(MotorStopped)] == [StopReason.NEW_HOST]
    assert h2.of(Disarmed) == [Disarmed(StopReason.NEW_HOST)]
    assert not h.pen.armed and not h.pen.running


def test_a_sample_sent_after_the_ack_of_a_stop_already_shows_it() -> None:
    h = PenHarness(seed=3)
    armed(h, lease_ms=2000)
    h.pen.set_contact(True, h.now)
    h.pen.press_button(h.now)
    h.wait_for(MotorStarted)
    h.advance(0.1)
    mark = len(h.events)
    h.send(Stop(1))
    h.advance(0.1)
    after = [e for _, e in h.events[mark:]]
    acked = next(i for i, e in enumerate(after) if isinstance(e, Delivered))
    samples = [
        e.message
        for e in after[acked:]
        if isinstance(e, MessageReceived) and isinstance(e.message, Telemetry)
    ]
    assert len(samples) >= 9
    assert all(not m.flags & (TelemetryFlag.ARMED | TelemetryFlag.MOTOR_RUNNING) for m in samples)


@pytest.mark.parametrize(("dropped", "expires"), [(2, False), (3, True)])
def test_lost_renewals_against_a_lease_renewed_four_times(dropped: int, expires: bool) -> None:
    h = PenHarness(seed=5)
    armed(h, lease_ms=250)
    period = 0.250 / 4
    h.advance(period)
    h.send(Renew(1))
    h.pen.inject(Fault(FaultKind.DROP_RENEWS, amount=dropped), h.now)
    for _ in range(dropped + 2):
        h.advance(period)
        h.send(Renew(1))
    assert h.pen.stats.renews_dropped == dropped
    assert h.pen.firmware.lease_expiries == int(expires)
    if expires:
        granted, expired = h.pen.firmware.last_lease_expiry or (0.0, 0.0)
        assert expired - granted == pytest.approx(0.250, abs=1e-9)  # within the lease, exactly


def test_the_pen_answers_violations_in_reliable_frames_only() -> None:
    h = PenHarness(seed=2)
    h.handshake()
    unreliable = [
        encode_frame(FrameKind.UNRELIABLE, 0, Renew.TYPE, b"\x01"),  # short
        encode_frame(FrameKind.UNRELIABLE, 1, Stop.TYPE, Stop(1).encode()),  # wrong kind
        encode_frame(FrameKind.UNRELIABLE, 2, 0x7E, b""),  # unknown
    ]
    h.pen.receive_data(b"".join(unreliable), h.now)
    h.advance(0.05)
    assert h.of(CommandRefused) == []  # dropped and counted, never answered
    assert h.pen.connection.stats.protocol_errors == 3
    h.send(Renew(9))  # numbered 0 by the host: behind the three that consumed 0..2
    assert h.pen.connection.stats.unreliable_stale == 1
    expected = h.host._tx.next_seq  # the pen's next reliable number from this host
    h.pen.receive_data(encode_frame(FrameKind.RELIABLE, expected, 0x7E, b""), h.now)
    h.advance(0.05)
    assert h.of(CommandRefused) == [CommandRefused(0x7E, RefusalCode.UNKNOWN_MESSAGE)]
