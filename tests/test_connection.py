"""The link state machine: handshake, exactly-once delivery over a bad line, failure bounds.

Two harnesses: ``Wire`` moves bytes by hand (for precise scenarios), ``Sim`` runs
both ends over a pair of seeded LossyChannels on a simulated clock, calling
``handle_timeout`` exactly at ``next_deadline``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol.connection import (
    Connected,
    Delivered,
    DeviceConnection,
    Event,
    HandshakeRefused,
    HostConnection,
    LinkBusyError,
    LinkConfig,
    LinkFailed,
    LinkState,
    MessageReceived,
    NotReadyError,
    PeerRebooted,
    ProtocolViolation,
)
from firmware_protocol.framing import MAX_PAYLOAD, FrameDecoder, FrameKind, encode_frame
from firmware_protocol.messages import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    Armed,
    CartridgeInserted,
    Hello,
    Identity,
    RefusalCode,
    Renew,
    SetDepth,
    Stop,
    Telemetry,
    decode_message,
)
from simulated_pen.channel import LossyChannel

E = TypeVar("E")
NONCE = 0x5EED_0001


def make_identity(boot_id: int = 0x1234_5678, **changes: Any) -> Identity:
    values: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "serial": b"PEN-0001".ljust(12, b"\0"),
        "fw_major": 1,
        "fw_minor": 2,
        "fw_patch": 3,
        "boot_id": boot_id,
        "schema_hash": SCHEMA_HASH,
        "max_depth_um": 2500,
        "max_lease_ms": 2000,
        "host_nonce": 0,
        "depth_accuracy_um": 20,
        "min_speed_hz": 50,
        "max_speed_hz": 150,
        "default_speed_hz": 100,
        "max_telemetry_rate_hz": 1000,
        "default_telemetry_rate_hz": 100,
        "max_lift_off_grace_ms": 2000,
        "default_lift_off_grace_ms": 300,
        "arm_battery_mv": 3500,
        "low_battery_mv": 3450,
        "max_temperature_cdeg": 4500,
        "rearm_temperature_cdeg": 4200,
    }
    values.update(changes)
    return Identity(**values)


def of(events: list[Any], cls: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, cls)]


def received(events: list[Event], cls: type[E]) -> list[E]:
    return [e.message for e in of(events, MessageReceived) if isinstance(e.message, cls)]


def telemetry(i: int) -> Telemetry:
    return Telemetry(i, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def armed(token: int, lease_ms: int) -> Armed:
    return Armed(token, lease_ms, 500, 1000, 0, 0, 42, 0)


def frames_in(data: bytes) -> list[tuple[int, int, int]]:
    return [(f.kind, f.seq, f.msg_type) for f in FrameDecoder().feed(data)]


# --- Wire: bytes moved by hand -----------------------------------------------------


class Wire:
    def __init__(self, config: LinkConfig | None = None, identity: Identity | None = None) -> None:
        self.host = HostConnection(config)
        self.device = DeviceConnection(identity or make_identity(), config)
        self.now = 0.0
        self.hello = b""

    def h2d(self) -> list[Event]:
        return self.device.receive_data(self.host.data_to_send(), self.now)

    def d2h(self) -> list[Event]:
        return self.host.receive_data(self.device.data_to_send(), self.now)

    def handshake(self, nonce: int = NONCE, first_seq: int | None = None) -> None:
        self.host.start_handshake(nonce, self.now, first_seq)
        self.hello = self.host.data_to_send()
        assert of(self.device.receive_data(self.hello, self.now), Connected)
        assert of(self.d2h(), Connected)
        assert self.host.state is self.device.state is LinkState.READY


def test_handshake_identifies_the_pen() -> None:
    w = Wire()
    w.host.start_handshake(NONCE, 0.0)
    assert w.host.state is LinkState.HANDSHAKING
    dev_events = w.h2d()
    assert dev_events == [Connected(None, NONCE)]
    host_events = w.d2h()
    assert len(host_events) == 1
    assert isinstance(host_events[0], Connected)
    assert host_events[0].identity == make_identity(host_nonce=NONCE)
    assert w.host.identity is not None
    assert w.host.identity.serial_text == "PEN-0001"
    assert w.host.stats.handshakes == w.device.stats.handshakes == 1


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"schema_hash": SCHEMA_HASH ^ 1}, ["schema", f"{SCHEMA_HASH:#010x}", "update"]),
        (
            {"protocol_version": PROTOCOL_VERSION + 1},
            ["protocol version 3", "this controller speaks 2", "update the controller"],
        ),
    ],
    ids=["schema", "protocol"],
)
def test_mismatched_pen_is_refused_with_a_clear_reason(
    changes: dict[str, int], words: list[str]
) -> None:
    w = Wire(identity=make_identity(**changes))
    w.host.start_handshake(NONCE, 0.0)
    w.h2d()
    events = w.d2h()
    assert len(events) == 1
    assert isinstance(events[0], HandshakeRefused)
    reason = events[0].reason
    assert "PEN-0001" in reason
    assert "1.2.3" in reason
    for word in words:
        assert word in reason
    assert w.host.state is LinkState.REFUSED
    assert w.host.refusal == reason
    # Nothing the pen says afterwards makes the link ready, and nothing can be sent.
    w.device.announce(0.5)
    if "protocol_version" in changes:
        assert w.device.state is LinkState.IDLE  # a pen of another version never accepts
    else:
        w.device.send(armed(1, 250), 0.5)
    assert not of(w.d2h(), Connected)
    for t in (0.2, 1.0, 5.0):
        w.host.handle_timeout(t)
    assert w.host.state is LinkState.REFUSED
    with pytest.raises(NotReadyError):
        w.host.send(SetDepth(100), 1.0)


def test_pen_refuses_a_hello_of_another_protocol_version() -> None:
    device = DeviceConnection(make_identity())
    hello = Hello(PROTOCOL_VERSION + 1, NONCE)
    events = device.receive_data(encode_frame(FrameKind.SYNC, 0, Hello.TYPE, hello.encode()), 0.0)
    assert len(events) == 1
    assert isinstance(events[0], HandshakeRefused)
    assert "protocol version 3" in events[0].reason
    assert device.state is LinkState.IDLE
    # It still answers the nonce, so that the host can tell the operator why.
    (answer,) = FrameDecoder().feed(device.data_to_send())
    assert (answer.kind, answer.msg_type) == (FrameKind.SYNC, Identity.TYPE)
    assert decode_message(Identity.TYPE, answer.payload) == make_identity(host_nonce=NONCE)
    with pytest.raises(NotReadyError):
        device.send(armed(1, 250), 0.0)


def test_a_pen_of_protocol_version_1_is_named_and_refused_not_a_violation() -> None:
    w = Wire(identity=make_identity(protocol_version=1))
    w.host.start_handshake(NONCE, 0.0)
    assert of(w.h2d(), HandshakeRefused)  # the v1 pen does not take a v2 Hello either...
    answer = w.device.data_to_send()
    (frame,) = FrameDecoder().feed(answer)
    assert (frame.kind, frame.msg_type, len(frame.payload)) == (FrameKind.SYNC, Identity.TYPE, 32)
    events = w.host.receive_data(answer, 0.0)  # ...but answers, in the version 1 layout
    assert [type(e) for e in events] == [HandshakeRefused]
    refused = events[0]
    assert isinstance(refused, HandshakeRefused)
    for words in (
        "pen PEN-0001 (firmware 1.2.3)",
        "speaks protocol version 1",
        "this controller speaks 2",
        "update the pen firmware",
    ):
        assert words in refused.reason
    assert refused.identity.serial_text == "PEN-0001"
    assert refused.identity.boot_id == 0x1234_5678
    assert refused.identity.depth_accuracy_um == 0  # not in the shared prefix: unknown
    assert w.host.state is LinkState.REFUSED
    assert w.host.stats.protocol_errors == 0


def test_a_short_identity_claiming_this_version_is_a_violation() -> None:
    host = HostConnection()
    host.start_handshake(NONCE, 0.0)
    payload = Identity.FORMAT.pack(*dataclasses.astuple(make_identity(host_nonce=NONCE)))[:32]
    events = host.receive_data(encode_frame(FrameKind.SYNC, 0, Identity.TYPE, payload), 0.0)
    assert [type(e) for e in events] == [ProtocolViolation]
    assert host.state is LinkState.HANDSHAKING


def test_a_new_link_needs_a_new_nonce() -> None:
    w = Wire(LinkConfig(hello_retries=0))
    with pytest.raises(ValueError, match="non-zero"):
        w.host.start_handshake(0, 0.0)
    w.host.start_handshake(NONCE, 0.0)
    assert of(w.host.handle_timeout(1.0), LinkFailed)
    with pytest.raises(ValueError, match="differ"):
        w.host.start_handshake(NONCE, 1.0)
    w.host.start_handshake(NONCE + 1, 1.0)
    assert w.host.state is LinkState.HANDSHAKING


def test_sending_is_checked() -> None:
    w = Wire()
    with pytest.raises(NotReadyError):
        w.host.send(SetDepth(1), 0.0)
    w.handshake()
    with pytest.raises(ValueError, match="not sent by the host"):
        w.host.send(armed(1, 2), 0.0)
    with pytest.raises(ValueError, match="handshake message"):
        w.host.send(Hello(1, 2), 0.0)
    with pytest.raises(ValueError, match="SetDepth"):
        w.host.send(SetDepth(70_000), 0.0)
    assert w.host.unacknowledged == 0


def test_commands_are_delivered_once_in_order_and_acknowledged() -> None:
    w = Wire()
    w.handshake()
    seqs = [w.host.send(SetDepth(d), 0.0) for d in (100, 200, 300)]
    assert received(w.h2d(), SetDepth) == [SetDepth(100), SetDepth(200), SetDepth(300)]
    delivered = of(w.d2h(), Delivered)
    assert [d.seq for d in delivered] == seqs
    assert [d.message for d in delivered] == [SetDepth(100), SetDepth(200), SetDepth(300)]
    assert w.host.unacknowledged == 0
    assert w.host.next_deadline() is None


def test_backlog_then_busy() -> None:
    config = LinkConfig(window=2, backlog=3)
    w = Wire(config)
    w.handshake()
    seqs = [w.host.send(SetDepth(i), 0.0) for i in range(5)]
    with pytest.raises(LinkBusyError):
        w.host.send(SetDepth(99), 0.0)
    assert w.host.unacknowledged == 5
    delivered: list[Delivered] = []
    for _ in range(5):
        w.h2d()
        delivered += of(w.d2h(), Delivered)
    assert [d.seq for d in delivered] == seqs  # the numbers send() promised
    assert [d.message for d in delivered] == [SetDepth(i) for i in range(5)]


def test_duplicates_are_acknowledged_but_not_applied() -> None:
    w = Wire()
    w.handshake()
    w.host.send(SetDepth(5), 0.0)
    frame = w.host.data_to_send()
    assert received(w.device.receive_data(frame, 0.0), SetDepth) == [SetDepth(5)]
    assert received(w.device.receive_data(frame + frame, 0.0), SetDepth) == []
    assert w.device.stats.duplicates == 2
    # Every answer is an ACK of the same number.
    assert {k for k, _, _ in frames_in(w.device.data_to_send())} == {FrameKind.ACK}


def test_gap_is_nakked_once_and_resent_at_once() -> None:
    w = Wire()
    w.handshake()
    w.host.send(SetDepth(1), 0.0)
    w.host.data_to_send()  # lost
    w.host.send(SetDepth(2), 0.001)
    w.host.send(SetDepth(3), 0.002)
    assert w.h2d() == []  # both ahead of the expected number
    out = w.device.data_to_send()
    assert [k for k, _, _ in frames_in(out)] == [FrameKind.NAK]
    w.now = 0.003
    w.host.receive_data(out, w.now)  # no timeout needed: the window is resent now
    assert received(w.h2d(), SetDepth) == [SetDepth(1), SetDepth(2), SetDepth(3)]
    assert w.host.stats.retransmits == 3
    assert w.device.stats.naks_sent == 1


def test_nak_acknowledges_what_came_before_it() -> None:
    w = Wire(LinkConfig(window=2))
    w.handshake()
    for i in range(4):  # two in the window, two in the backlog
        w.host.send(SetDepth(i), 0.0)
    w.h2d()
    acks = frames_in(w.device.data_to_send())  # the ACKs are lost
    expected = (acks[-1][1] + 1) & 0xFFFF  # the number the pen now expects
    # A NAK for one past the window's end acknowledges the whole window.
    nak = encode_frame(FrameKind.NAK, expected, 0)
    events = w.host.receive_data(nak, 0.001)
    assert [d.message for d in of(events, Delivered)] == [SetDepth(0), SetDepth(1)]
    # The backlog moves up and goes out exactly once, not once more as a "resend".
    sent = frames_in(w.host.data_to_send())
    assert [s for _, s, _ in sent] == [expected, (expected + 1) & 0xFFFF]
    assert w.host.stats.retransmits == 0


def test_naks_that_acknowledge_nothing_count_toward_max_retries() -> None:
    w = Wire(LinkConfig(max_retries=3))
    w.handshake()
    seq = w.host.send(SetDepth(1), 0.0)
    w.host.data_to_send()  # lost, again and again
    nak = encode_frame(FrameKind.NAK, seq or 0, 0)  # "I expect the one you have not got through"
    assert w.host.handle_timeout(LinkConfig().ack_timeout) == []  # one timeout resend
    w.host.data_to_send()
    for i in range(2):
        assert w.host.receive_data(nak, 0.1 + i * 0.01) == []  # resent at once, counted
        assert frames_in(w.host.data_to_send()) == [(FrameKind.RELIABLE, seq, SetDepth.TYPE)]
    events = w.host.receive_data(nak, 0.2)  # the fourth resend without progress: too many
    assert [type(e) for e in events] == [LinkFailed]
    assert w.host.state is LinkState.FAILED


def test_a_nak_that_acknowledges_something_is_progress() -> None:
    w = Wire(LinkConfig(max_retries=1))
    w.handshake()
    first = w.host.send(SetDepth(1), 0.0)
    assert first is not None
    for i in range(2, 6):
        w.host.send(SetDepth(i), 0.0)
    w.host.data_to_send()  # all lost
    for k in range(1, 5):  # each NAK acknowledges one more: the count starts again each time
        events = w.host.receive_data(encode_frame(FrameKind.NAK, first + k, 0), 0.01 * k)
        assert [type(e) for e in events] == [Delivered]
    nak = encode_frame(FrameKind.NAK, first + 4, 0)
    assert w.host.receive_data(nak, 0.1) == []  # nothing acknowledged: one resend, counted
    assert [type(e) for e in w.host.receive_data(nak, 0.11)] == [LinkFailed]


def test_rtt_is_sampled_only_from_messages_sent_once() -> None:
    w = Wire()
    w.handshake()
    w.host.send(SetDepth(1), 0.0)
    w.now = 0.004
    w.h2d()
    w.d2h()
    assert w.host.stats.rtt_samples == 1
    assert w.host.stats.rtt_last == pytest.approx(0.004)
    w.host.send(SetDepth(2), 1.0)
    w.host.data_to_send()  # lost
    w.host.handle_timeout(1.0 + LinkConfig().ack_timeout)
    w.now = 1.2
    w.h2d()
    w.d2h()
    assert w.host.stats.rtt_samples == 1  # Karn: an ambiguous sample is not taken


def test_protocol_violations_are_reported_not_applied() -> None:
    w = Wire()
    w.handshake()
    seq = w.host.send(SetDepth(1), 0.0)
    assert seq is not None
    w.h2d()
    w.device.data_to_send()
    host_seq = seq + 1
    bad = [
        encode_frame(FrameKind.RELIABLE, host_seq, 0x7E, b""),  # unknown type
        encode_frame(FrameKind.RELIABLE, host_seq + 1, SetDepth.TYPE, b"\x01"),  # short
        encode_frame(FrameKind.RELIABLE, host_seq + 2, Armed.TYPE, armed(1, 2).encode()),
        encode_frame(FrameKind.UNRELIABLE, 0, Stop.TYPE, Stop(1).encode()),  # wrong kind
        encode_frame(FrameKind.RELIABLE, host_seq + 3, Renew.TYPE, Renew(1).encode()),
    ]
    events = w.device.receive_data(b"".join(bad), 0.0)
    assert not of(events, MessageReceived)
    codes = [(v.msg_type, v.reason, v.reliable) for v in of(events, ProtocolViolation)]
    assert codes == [
        (0x7E, RefusalCode.UNKNOWN_MESSAGE, True),
        (SetDepth.TYPE, RefusalCode.BAD_PAYLOAD, True),
        (Armed.TYPE, RefusalCode.UNKNOWN_MESSAGE, True),
        (Stop.TYPE, RefusalCode.BAD_PAYLOAD, False),  # unreliable frame: never answered
        (Renew.TYPE, RefusalCode.BAD_PAYLOAD, True),
    ]
    assert w.device.stats.protocol_errors == 5
    # The reliable ones consumed their numbers: the next command is accepted.
    acks = [s for k, s, _ in frames_in(w.device.data_to_send()) if k == FrameKind.ACK]
    assert acks == [host_seq, host_seq + 1, host_seq + 2, host_seq + 3]


def test_handshake_frames_with_the_wrong_message_are_violations() -> None:
    device = DeviceConnection(make_identity())
    wrong = encode_frame(FrameKind.SYNC, 0, SetDepth.TYPE, SetDepth(1).encode())
    zero = encode_frame(FrameKind.SYNC, 0, Hello.TYPE, Hello(1, 0).encode())
    assert len(of(device.receive_data(wrong + zero, 0.0), ProtocolViolation)) == 2
    assert device.state is LinkState.IDLE
    host = HostConnection()
    host.start_handshake(NONCE, 0.0)
    assert of(host.receive_data(host.data_to_send(), 0.0), ProtocolViolation)  # its own Hello


# --- unreliable numbering -------------------------------------------------------------


def test_first_telemetry_frames_lost_are_counted() -> None:
    w = Wire()
    w.handshake()
    for i in range(3):
        w.device.send(telemetry(i), 0.0)
        out = w.device.data_to_send()
        if i > 0:  # the very first frame after the handshake is lost
            w.host.receive_data(out, 0.0)
    assert w.host.stats.unreliable_lost == 1


def test_unreliable_counter_restarts_with_each_handshake() -> None:
    w = Wire()
    w.handshake()
    for i in range(5):
        w.device.send(telemetry(i), 0.0)
    w.d2h()
    w.host.handle_timeout(0.0)
    # The pen reboots: a new boot id, a new link, a new stream.
    w.device = DeviceConnection(make_identity(boot_id=0xB007))
    w.device.announce(1.0)
    assert of(w.d2h(), PeerRebooted)
    w.handshake(NONCE + 1)
    w.device.send(telemetry(0), 1.0)
    assert received(w.d2h(), Telemetry) == [telemetry(0)]
    assert w.host.stats.unreliable_lost == 0
    assert w.host.stats.unreliable_stale == 0


def test_unreliable_numbers_wrap_past_65535() -> None:
    w = Wire()
    w.handshake()
    n = 0x10000 + 300
    lost = {0xFFFE, 0xFFFF, 0x10000, 0x10001, 0x10005}  # around the wrap
    got = 0
    for i in range(n):
        w.device.send(telemetry(i), 0.0)
        data = w.device.data_to_send()
        if i not in lost:
            got += len(w.host.receive_data(data, 0.0))
    assert got == n - len(lost)
    assert w.host.stats.unreliable_lost == len(lost)
    assert w.host.stats.unreliable_stale == 0


def test_stale_and_duplicated_unreliable_frames_are_delivered_marked() -> None:
    w = Wire()
    w.handshake()
    frames = []
    for i in range(4):
        w.device.send(telemetry(i), 0.0)
        frames.append(w.device.data_to_send())
    order = [frames[0], frames[2], frames[1], frames[2], frames[3]]
    got = of(w.host.receive_data(b"".join(order), 0.0), MessageReceived)
    assert [(m.message.device_ms, m.in_order) for m in got] == [  # type: ignore[attr-defined]
        (0, True),
        (2, True),
        (1, False),  # overtaken: late, but seen
        (2, False),  # a duplicate: seen twice, the second time marked
        (3, True),  # a stale frame did not move `next`
    ]
    assert w.host.stats.unreliable_lost == 1  # frame 1 was counted lost when 2 overtook it
    assert w.host.stats.unreliable_stale == 2  # loss statistics stay apart from delivery


def test_a_stale_frame_is_delivered_and_never_moves_next() -> None:
    w = Wire()
    w.handshake()
    frames = []
    for i in range(62_801):
        w.device.send(telemetry(i), 0.0)
        frames.append(w.device.data_to_send())

    def deliver(i: int) -> list[tuple[int, bool]]:
        got = of(w.host.receive_data(frames[i], 0.0), MessageReceived)
        return [(m.message.device_ms, m.in_order) for m in got]  # type: ignore[attr-defined]

    assert deliver(30_000) == [(30_000, True)]  # 30 000 counted lost
    assert deliver(29_990) == [(29_990, False)]  # late: delivered, marked
    assert deliver(30_001) == [(30_001, True)]  # `next` did not move back
    assert (w.host.stats.unreliable_lost, w.host.stats.unreliable_stale) == (30_000, 1)
    # After a gap of half the sequence space or more, newer frames look stale. The host
    # is no longer blind to them: every one is delivered (marked) for it to judge.
    assert deliver(62_800) == [(62_800, False)]  # 32 798 ahead of `next`: looks stale
    assert w.host.stats.unreliable_stale == 2


def test_malformed_unreliable_frames_are_counted_consume_their_number_and_get_no_answer() -> None:
    w = Wire()
    w.handshake()
    w.device.send(telemetry(0), 0.0)
    w.d2h()
    bad = encode_frame(FrameKind.UNRELIABLE, 1, Telemetry.TYPE, b"\x00" * 3)  # short
    events = w.host.receive_data(bad, 0.0)
    assert [type(e) for e in events] == [ProtocolViolation]
    assert w.host.data_to_send() == b""  # never answered
    w.device.send(telemetry(1), 0.0)  # the pen's number 1 was used by the bad frame...
    w.device.send(telemetry(2), 0.0)
    got = of(w.d2h(), MessageReceived)
    # ...so its own frame 1 is now stale (late), and nothing was counted lost.
    assert [(m.in_order) for m in got] == [False, True]
    assert w.host.stats.unreliable_lost == 0
    assert w.host.stats.protocol_errors == 1


# --- sequence numbers across links ----------------------------------------------------


def test_reliable_numbers_wrap_past_65535_both_ways() -> None:
    w = Wire(LinkConfig(window=4), make_identity(boot_id=0x0001_FFF5))
    w.handshake(first_seq=0xFFF0)
    host_msgs = [SetDepth(i) for i in range(40)]
    dev_msgs = [CartridgeInserted(i + 1, 0) for i in range(40)]
    got_dev: list[SetDepth] = []
    got_host: list[CartridgeInserted] = []
    host_seqs: list[int | None] = []
    for i in range(40):
        host_seqs.append(w.host.send(host_msgs[i], 0.0))
        w.device.send(dev_msgs[i], 0.0)
    delivered: list[Delivered] = []
    for step in range(60):
        w.now = step * 0.001
        dev_events = w.h2d()
        got_dev += received(dev_events, SetDepth)
        host_events = w.d2h()
        got_host += received(host_events, CartridgeInserted)
        delivered += of(host_events, Delivered)
    assert got_dev == host_msgs
    assert got_host == dev_msgs
    assert [d.seq for d in delivered] == host_seqs
    assert 0xFFFF in host_seqs
    assert 0 in host_seqs


def test_duplicated_hello_does_not_reapply_commands() -> None:
    w = Wire()
    w.handshake()
    w.host.send(SetDepth(7), 0.0)
    command = w.host.data_to_send()
    assert received(w.device.receive_data(command, 0.0), SetDepth) == [SetDepth(7)]
    w.device.data_to_send()
    # The same Hello again (duplicated on the wire), then the command again.
    events = w.device.receive_data(w.hello + command, 0.01)
    assert events == []
    answer = frames_in(w.device.data_to_send())
    assert [k for k, _, _ in answer] == [FrameKind.SYNC, FrameKind.ACK]


def test_old_hello_of_an_earlier_link_is_ignored() -> None:
    # Link A, then link B from a restarted controller using the same first sequence
    # number. An old Hello of A, delayed on the wire, arrives while B's first command is
    # still unacknowledged. Obeying it would restart the pen's receive side and apply
    # B's retransmitted command a second time.
    w = Wire()
    w.handshake(nonce=0xAAAA, first_seq=0)
    hello_a = w.hello
    w.host = HostConnection()
    w.handshake(nonce=0xBBBB, first_seq=0)
    w.host.send(SetDepth(42), 0.0)
    assert received(w.h2d(), SetDepth) == [SetDepth(42)]
    w.device.data_to_send()  # its ACK is lost
    assert w.device.receive_data(hello_a, 0.01) == []
    assert w.device.stats.stale_hellos == 1
    assert w.device.data_to_send() == b""
    w.host.handle_timeout(0.0 + LinkConfig().ack_timeout)  # resend
    assert received(w.h2d(), SetDepth) == []
    assert of(w.d2h(), Delivered)


def test_frames_of_an_earlier_link_are_not_applied_on_the_next() -> None:
    w = Wire()
    w.handshake()
    w.host.send(SetDepth(1), 0.0)
    first = w.host.data_to_send()
    w.device.receive_data(first, 0.0)
    w.device.data_to_send()  # ACK lost
    failed: list[LinkFailed] = []
    while not failed:  # the host gives up on it
        deadline = w.host.next_deadline()
        assert deadline is not None
        failed = of(w.host.handle_timeout(deadline), LinkFailed)
    assert failed[0].abandoned == (SetDepth(1),)
    w.host.data_to_send()  # resends, lost
    w.handshake(nonce=NONCE + 1)  # a new link on the same connection
    # The old frame, still in flight, turns up: it must not be taken for a new command.
    assert received(w.device.receive_data(first, 1.0), SetDepth) == []
    w.host.send(SetDepth(2), 1.0)
    assert received(w.h2d(), SetDepth) == [SetDepth(2)]


def test_pen_that_gave_up_resumes_on_the_same_hello_without_reapplying() -> None:
    w = Wire()
    w.handshake()
    for i in range(4):
        w.host.send(SetDepth(i), 0.0)
    assert len(received(w.h2d(), SetDepth)) == 4
    w.device.data_to_send()  # ACKs lost: the pen->host direction is dead for a while
    w.device.send(armed(1, 250), 0.0)
    failed: list[LinkFailed] = []
    while not failed:
        deadline = w.device.next_deadline()
        assert deadline is not None
        failed = of(w.device.handle_timeout(deadline), LinkFailed)
        w.device.data_to_send()
    assert w.device.state is LinkState.IDLE
    # A copy of the host's Hello turns up; the pen resumes the link...
    events = w.device.receive_data(w.hello, 2.0)
    assert of(events, Connected)
    assert w.device.state is LinkState.READY
    # ...and the host's retransmissions of the four commands are duplicates.
    w.host.handle_timeout(2.0)
    assert received(w.h2d(), SetDepth) == []
    assert w.device.stats.duplicates == 4


def test_a_resumed_link_restarts_both_unreliable_counters() -> None:
    w = Wire(LinkConfig(max_retries=0))
    w.host.start_handshake(NONCE, 0.0)
    hello = w.host.data_to_send()
    assert of(w.device.receive_data(hello, 0.0), Connected)
    w.device.data_to_send()  # the Identity is lost: the host is still handshaking
    for i in range(5):
        w.device.send(telemetry(i), 0.0)  # numbered 0..4, heard by nobody
    w.device.send(CartridgeInserted(1, 0), 0.0)
    w.device.data_to_send()
    assert of(w.device.handle_timeout(0.05), LinkFailed)  # the pen gives up the link
    w.host.handle_timeout(0.1)  # the host resends the same Hello...
    events = w.device.receive_data(w.host.data_to_send(), 0.1)
    assert [e for e in events if isinstance(e, Connected)] == [Connected(None, NONCE, resumed=True)]
    assert of(w.d2h(), Connected)  # ...and the Identity brings both ends up
    w.device.send(telemetry(100), 0.1)
    got = of(w.d2h(), MessageReceived)
    assert [(m.message, m.in_order) for m in got] == [(telemetry(100), True)]
    assert (w.host.stats.unreliable_lost, w.host.stats.unreliable_stale) == (0, 0)
    w.host.send(Renew(7), 0.1)
    assert [(m.message, m.in_order) for m in of(w.h2d(), MessageReceived)] == [(Renew(7), True)]
    assert w.device.stats.unreliable_lost == 0


def test_a_pen_resuming_on_a_delayed_hello_fails_a_link_the_host_thought_up() -> None:
    w = Wire(LinkConfig(max_retries=0))
    w.handshake()
    w.device.send(armed(1, 250), 0.0)
    w.device.data_to_send()  # lost: the pen gives up
    assert of(w.device.handle_timeout(1.0), LinkFailed)
    assert of(w.device.receive_data(w.hello, 1.1), Connected)  # a delayed copy of the Hello
    events = w.d2h()
    assert [type(e) for e in events] == [LinkFailed]
    assert "resumed" in events[0].reason  # type: ignore[union-attr]
    assert w.host.state is LinkState.FAILED
    # A duplicated Hello answered by a pen that never gave up is not a resume:
    w2 = Wire()
    w2.handshake()
    w2.device.receive_data(w2.hello, 0.5)
    assert w2.d2h() == []
    assert w2.host.state is LinkState.READY


def test_pen_that_dropped_the_link_makes_the_host_fail_fast() -> None:
    w = Wire(LinkConfig(max_retries=0))
    w.handshake()
    w.device.send(armed(1, 250), 0.0)
    w.device.data_to_send()  # lost
    assert of(w.device.handle_timeout(1.0), LinkFailed)
    assert w.device.state is LinkState.IDLE
    w.host.send(Renew(1), 1.1)  # anything from the host...
    w.h2d()  # ...makes the pen announce itself
    events = w.d2h()
    assert len(of(events, LinkFailed)) == 1
    assert "dropped the link" in events[0].reason
    assert w.host.state is LinkState.FAILED
    w.handshake(nonce=NONCE + 1)  # and a new link works
    w.host.send(SetDepth(3), 2.0)
    assert received(w.h2d(), SetDepth) == [SetDepth(3)]


def test_pen_reboot_is_reported_and_a_new_handshake_works() -> None:
    w = Wire()
    w.handshake()
    w.host.send(SetDepth(1), 0.0)
    w.host.data_to_send()
    old = w.host.identity
    w.device = DeviceConnection(make_identity(boot_id=0xB007))
    w.device.announce(0.5)
    events = w.d2h()
    assert len(events) == 1
    assert isinstance(events[0], PeerRebooted)
    assert events[0].previous == old
    assert events[0].current.boot_id == 0xB007
    assert events[0].abandoned == (SetDepth(1),)
    assert w.host.state is LinkState.IDLE
    w.handshake(nonce=NONCE + 1)
    w.host.send(SetDepth(2), 1.0)
    assert received(w.h2d(), SetDepth) == [SetDepth(2)]


def test_new_host_sees_what_the_previous_one_left_unacknowledged() -> None:
    w = Wire()
    w.handshake()
    w.device.send(CartridgeInserted(9, 0), 0.0)
    w.device.data_to_send()  # lost
    w.host = HostConnection()
    w.host.start_handshake(NONCE + 1, 1.0)
    events = w.h2d()
    assert events == [Connected(None, NONCE + 1, (CartridgeInserted(9, 0),))]


# --- failure bounds -------------------------------------------------------------------


def test_failure_times_follow_from_the_config() -> None:
    c = LinkConfig()
    assert c.retransmit_timeouts() == pytest.approx((0.03, 0.06, 0.12, 0.24, 0.24, 0.24, 0.24))
    assert c.reliable_failure_time() == pytest.approx(1.17)
    assert c.handshake_failure_time() == pytest.approx(1.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "window"),
        ({"window": 0x8000}, "window"),
        ({"ack_timeout": 0}, "ack_timeout"),
        ({"max_timeout": 0.01}, "ack_timeout <= max_timeout"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinkConfig(**kwargs)


# --- Sim: both ends over lossy channels on a simulated clock ---------------------------


@dataclass
class Sim:
    seed: int
    faults: dict[str, float]
    config: LinkConfig = field(default_factory=LinkConfig)
    boot_id: int = 0xABCD_FFC0
    now: float = 0.0

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.h2d = LossyChannel(random.Random(rng.getrandbits(64)), **self.faults)
        self.d2h = LossyChannel(random.Random(rng.getrandbits(64)), **self.faults)
        self.host = HostConnection(self.config)
        self.device = DeviceConnection(make_identity(self.boot_id), self.config)
        self.host_log: list[tuple[float, Event]] = []
        self.device_log: list[tuple[float, Event]] = []

    @property
    def host_events(self) -> list[Event]:
        return [e for _, e in self.host_log]

    @property
    def device_events(self) -> list[Event]:
        return [e for _, e in self.device_log]

    def flush(self) -> None:
        if data := self.host.data_to_send():
            self.h2d.push(data, self.now)
        if data := self.device.data_to_send():
            self.d2h.push(data, self.now)

    def run_until(self, t_end: float) -> None:
        """Advance to t_end: deliver bytes and fire timeouts at their exact times."""
        while True:
            self.flush()
            times = [
                t
                for t in (
                    self.h2d.next_delivery(),
                    self.d2h.next_delivery(),
                    self.host.next_deadline(),
                    self.device.next_deadline(),
                )
                if t is not None
            ]
            if not times or min(times) > t_end:
                break
            self.now = now = max(self.now, min(times))
            if data := self.h2d.pull(now):
                self.device_log += [(now, e) for e in self.device.receive_data(data, now)]
            if data := self.d2h.pull(now):
                self.host_log += [(now, e) for e in self.host.receive_data(data, now)]
            for conn, log in ((self.host, self.host_log), (self.device, self.device_log)):
                deadline = conn.next_deadline()
                if deadline is not None and deadline <= now:
                    log += [(now, e) for e in conn.handle_timeout(now)]
        self.now = max(self.now, t_end)
        self.flush()

    def connect(self, first_seq: int | None = None) -> None:
        self.host.start_handshake(NONCE, self.now, first_seq)
        t = self.now
        while self.host.state is not LinkState.READY:
            assert self.host.state is LinkState.HANDSHAKING
            t += 0.001
            self.run_until(t)


LINE_NOISE = {"drop": 0.003, "corrupt": 0.003, "delay": 0.002, "jitter": 0.003}
ALL_FAULTS = {**LINE_NOISE, "duplicate": 0.05, "reorder": 0.05}


# The same 40 seeds on every run. At these fault rates a reliable frame and its
# resends (7 tries in 1.17 s) can all be hit, about once per 10^5 messages: the
# link then fails loudly (LinkFailed names what it abandons), as designed. Fresh
# seeds each run made this test fail a CI run now and then (seed 379167379
# abandoned a CartridgeInserted) without anything being wrong.
@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), faults=st.sampled_from([LINE_NOISE, ALL_FAULTS]))
def test_exactly_once_in_order_over_a_bad_line_both_ways(
    seed: int, faults: dict[str, float]
) -> None:
    sim = Sim(seed, faults)
    sim.connect(first_seq=0xFFFF - 60)  # both sequence spaces wrap during the run
    host, device = sim.host, sim.device
    n_cmd = n_evt = n_tel = n_renew = 0
    t_send_end = 2.0
    tick = 0
    while sim.now < t_send_end:
        tick += 1
        sim.run_until(tick * 0.001)
        if tick % 5 == 0:
            try:
                host.send(SetDepth(n_cmd), sim.now)
                n_cmd += 1
            except LinkBusyError:
                pass
        if tick % 80 == 0:
            host.send(Renew(n_renew), sim.now)
            n_renew += 1
        if tick % 10 == 0:
            device.send(telemetry(n_tel), sim.now)
            n_tel += 1
        if tick % 25 == 0:
            device.send(CartridgeInserted(n_evt + 1, 0), sim.now)
            n_evt += 1
    t = sim.now
    while (host.unacknowledged or device.unacknowledged) and t < t_send_end + 5:
        t += 0.01
        sim.run_until(t)
    sim.run_until(t + 0.1)  # let the last frames land

    assert not of(sim.host_events + sim.device_events, LinkFailed)
    assert not of(sim.host_events + sim.device_events, ProtocolViolation)
    # Commands: each applied exactly once, in order, and acknowledged in order.
    assert received(sim.device_events, SetDepth) == [SetDepth(i) for i in range(n_cmd)]
    acked = [d for d in of(sim.host_events, Delivered) if isinstance(d.message, SetDepth)]
    assert [d.message for d in acked] == [SetDepth(i) for i in range(n_cmd)]
    assert all((b.seq - a.seq) & 0xFFFF == 1 for a, b in itertools.pairwise(acked))
    # Device events likewise on the host.
    assert received(sim.host_events, CartridgeInserted) == [
        CartridgeInserted(i + 1, 0) for i in range(n_evt)
    ]
    assert len(of(sim.device_events, Delivered)) == n_evt
    # Unreliable streams: every frame is either received or counted lost.
    for events, sent, stats in (
        (sim.host_events, n_tel, host.stats),
        (sim.device_events, n_renew, device.stats),
    ):
        arrived = [
            e for e in of(events, MessageReceived) if isinstance(e.message, Telemetry | Renew)
        ]
        numbers = [
            m.message.device_ms if isinstance(m.message, Telemetry) else m.message.token
            for m in arrived
        ]
        got = [n for n, m in zip(numbers, arrived, strict=True) if m.in_order]
        stale = [n for n, m in zip(numbers, arrived, strict=True) if not m.in_order]
        assert got == sorted(set(got))
        assert len(stale) == stats.unreliable_stale  # every stale frame was still delivered
        tail = sent - 1 - got[-1]
        assert sent - len(got) == stats.unreliable_lost + tail
        if "duplicate" not in faults:
            assert stats.unreliable_stale == 0
    # The line really was bad.
    assert host.stats.crc_errors + device.stats.crc_errors > 0
    assert host.stats.retransmits + device.stats.retransmits > 0
    assert host.stats.unreliable_lost > 0
    if "reorder" in faults:
        assert sim.h2d.stats.duplicated + sim.d2h.stats.duplicated > 0
        assert sim.h2d.stats.reordered + sim.d2h.stats.reordered > 0
    assert n_cmd > 300
    assert n_evt == 80


def _dead(sim: Sim) -> None:
    sim.h2d = LossyChannel(random.Random(0), drop=1.0)
    sim.d2h = LossyChannel(random.Random(1), drop=1.0)


CONFIGS = [
    LinkConfig(),
    LinkConfig(window=3, ack_timeout=0.01, max_timeout=0.5, max_retries=9),
    LinkConfig(ack_timeout=0.2, max_timeout=0.2, max_retries=0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "long", "no-retries"])
def test_dead_line_fails_the_link_after_bounded_retries_in_bounded_time(
    config: LinkConfig,
) -> None:
    sim = Sim(0, {}, config)
    sim.connect()
    _dead(sim)
    t0 = sim.now
    sim.host.send(SetDepth(1), t0)
    sim.device.send(CartridgeInserted(1, 0), t0)
    sim.run_until(t0 + 60.0)
    for conn, log in ((sim.host, sim.host_log), (sim.device, sim.device_log)):
        failures = [(t, e) for t, e in log if isinstance(e, LinkFailed)]
        assert len(failures) == 1
        t_fail, failure = failures[0]
        assert t_fail - t0 == pytest.approx(config.reliable_failure_time())
        assert failure.abandoned
        assert conn.stats.retransmits == config.max_retries
    assert sim.host.state is LinkState.FAILED
    assert sim.device.state is LinkState.IDLE
    assert sim.host.next_deadline() is None
    assert sim.device.next_deadline() is None


def test_unanswered_handshake_fails_in_bounded_time() -> None:
    config = LinkConfig()
    sim = Sim(0, {}, config)
    _dead(sim)
    sim.host.start_handshake(NONCE, 0.0)
    sim.run_until(30.0)
    failures = [(t, e) for t, e in sim.host_log if isinstance(e, LinkFailed)]
    assert len(failures) == 1
    assert failures[0][0] == pytest.approx(config.handshake_failure_time())
    assert sim.h2d.stats.chunks_in == config.hello_retries + 1
    assert sim.host.state is LinkState.FAILED


# --- fuzz -------------------------------------------------------------------------------

frames_st = st.builds(
    encode_frame,
    kind=st.integers(0, 4),
    seq=st.integers(0, 0xFFFF),
    msg_type=st.sampled_from([0, 1, 0x10, 0x12, 0x13, 0x15, 0x7F, 0x81, 0x82, 0x85, 0x8A]),
    payload=st.binary(max_size=MAX_PAYLOAD),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(frames_st, st.binary(max_size=30)), max_size=12),
    st.sampled_from(["idle", "handshaking", "ready"]),
)
def test_arbitrary_input_never_crashes_either_end(chunks: list[bytes], state: str) -> None:
    w = Wire()
    if state == "handshaking":
        w.host.start_handshake(NONCE, 0.0)
    elif state == "ready":
        w.handshake()
        w.host.send(SetDepth(1), 0.0)
        w.device.send(CartridgeInserted(1, 0), 0.0)
    for i, chunk in enumerate(chunks):
        now = i * 0.05
        for conn in (w.host, w.device):
            for event in conn.receive_data(chunk, now) + conn.handle_timeout(now):
                assert isinstance(event, Event)  # one of the kinds the link declares
            conn.data_to_send()


def test_host_notices_a_silent_pen_when_nothing_is_outstanding() -> None:
    w = Wire(LinkConfig(peer_silence_timeout=0.3))
    w.handshake()
    w.device.send(telemetry(1), w.now)
    w.now = 0.25
    w.d2h()  # a frame at 0.25 pushes the deadline to 0.55
    assert w.host.next_deadline() == pytest.approx(0.55)
    assert w.host.handle_timeout(0.54) == []
    events = w.host.handle_timeout(0.55)
    assert [type(e) for e in events] == [LinkFailed]
    assert "no frame from the pen for 300 ms" in events[0].reason
    assert w.host.state is LinkState.FAILED


def test_silence_watchdog_is_off_by_default() -> None:
    w = Wire()
    w.handshake()
    assert w.host.next_deadline() is None
    assert w.host.handle_timeout(1e6) == []
    assert w.host.state is LinkState.READY
