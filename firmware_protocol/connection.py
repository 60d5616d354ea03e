"""The link state machine, sans-I/O: bytes and messages in, events and bytes out.

One class per end of the cable, sharing the reliable-delivery machinery:

* ``HostConnection``: opens the link with Hello, checks the pen's Identity
  (protocol version and schema hash), sends commands, receives telemetry/events.
* ``DeviceConnection``: answers Hello with Identity, receives commands exactly
  once, sends events reliably and telemetry unreliably.

Nothing here reads a clock or touches a file descriptor. Every method that can
depend on time takes ``now`` (seconds, any monotonic origin). The caller feeds
received bytes to ``receive_data``, calls ``handle_timeout`` when
``next_deadline()`` passes, and writes out whatever ``data_to_send()`` returns.

Link states and the inputs that move them are the ``TRANSITIONS`` table below
(anything not listed leaves the state unchanged; PROTOCOL.md renders it).

Rules of reliable delivery (both directions, same code):

1. Sequence numbers are u16 and wrap. The sender numbers each reliable message
   and keeps at most ``window`` of them unacknowledged; further messages wait in
   a bounded backlog (``LinkBusyError`` when it is full).
2. The receiver accepts only the next expected number. It delivers that message
   once and answers ACK(seq) (cumulative). A number in the half of the sequence
   space behind the expected one is a duplicate: dropped, re-ACKed with the last
   accepted number. A number ahead of the expected one is dropped and answered
   once with NAK(expected).
3. The sender treats ACK(n) as acknowledging everything up to n, and NAK(e) as
   acknowledging everything before e and asking to resend the window from e at
   once. If the oldest unacknowledged message is older than the retransmit
   timeout, the whole window is resent and the timeout doubles (up to
   ``max_timeout``). A NAK that acknowledges nothing is a resend without progress
   too; after ``max_retries`` resends without progress the link has failed.
   Progress resets the timeout and the count.
4. Round-trip time is sampled only from messages sent exactly once (Karn).
5. Unreliable messages carry their own u16 counter, restarted at 0 (both ways)
   whenever an Identity brings the link up; the receiver counts the numbers it
   never saw as lost, and counts numbers behind the next expected one as stale
   (duplicates or reordered) but still delivers them, marked ``in_order=False``.
6. A frame's kind must match its message's delivery class: a command in an
   unreliable frame could be applied twice, so it is a protocol violation.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from dataclasses import dataclass, field

from .framing import Frame, FrameDecoder, FrameKind, encode_frame
from .messages import (
    IDENTITY_PREFIX_SIZE,
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    Delivery,
    Direction,
    Hello,
    Identity,
    Message,
    MessageDecodeError,
    RefusalCode,
    decode_identity_prefix,
    decode_message,
    encode_identity,
    encode_message,
)

SEQ_MOD = 0x10000
_HALF = 0x8000
#: Host nonces a pen remembers: a Hello carrying one of them is an old frame, ignored.
RECENT_NONCES = 8


class Role(enum.Enum):
    HOST = "host"
    DEVICE = "device"


class LinkState(enum.Enum):
    IDLE = "idle"
    HANDSHAKING = "handshaking"
    READY = "ready"
    REFUSED = "refused"
    FAILED = "failed"


class Input(enum.Enum):
    START_HANDSHAKE = "start_handshake"
    IDENTITY_OK = "identity_ok"
    IDENTITY_MISMATCH = "identity_mismatch"
    RETRIES_EXHAUSTED = "retries_exhausted"
    PEER_REBOOTED = "peer_rebooted"
    PEER_LOST_LINK = "peer_lost_link"  # host: the pen announced itself while READY
    HELLO = "hello"


H, D = Role.HOST, Role.DEVICE
S = LinkState
# fmt: off
TRANSITIONS: dict[tuple[Role, LinkState, Input], LinkState] = {
    (H, S.IDLE,        Input.START_HANDSHAKE):   S.HANDSHAKING,
    (H, S.HANDSHAKING, Input.IDENTITY_OK):       S.READY,
    (H, S.HANDSHAKING, Input.IDENTITY_MISMATCH): S.REFUSED,
    (H, S.HANDSHAKING, Input.RETRIES_EXHAUSTED): S.FAILED,
    (H, S.READY,       Input.RETRIES_EXHAUSTED): S.FAILED,
    (H, S.READY,       Input.PEER_LOST_LINK):    S.FAILED,
    (H, S.READY,       Input.PEER_REBOOTED):     S.IDLE,
    (H, S.REFUSED,     Input.START_HANDSHAKE):   S.HANDSHAKING,
    (H, S.FAILED,      Input.START_HANDSHAKE):   S.HANDSHAKING,
    (D, S.IDLE,        Input.HELLO):             S.READY,
    (D, S.READY,       Input.HELLO):             S.READY,
    (D, S.READY,       Input.RETRIES_EXHAUSTED): S.IDLE,
}
# fmt: on


class LinkBusyError(RuntimeError):
    """The reliable backlog is full: the peer is not keeping up or is gone."""


class NotReadyError(RuntimeError):
    """A message was sent before the handshake completed."""


@dataclass(frozen=True)
class LinkConfig:
    """Timing and sizing of the link. Seconds unless named otherwise."""

    window: int = 8
    backlog: int = 64
    ack_timeout: float = 0.030
    max_timeout: float = 0.240
    max_retries: int = 6
    hello_timeout: float = 0.100
    hello_retries: int = 10
    announce_interval: float = 0.250  # device: least time between Identity announcements
    # Host: declare the link failed when no valid frame arrived for this long while
    # READY. Renew is unreliable and telemetry is never acknowledged, so without it a
    # host with nothing reliable outstanding would never notice a dead pen. None: off.
    peer_silence_timeout: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.window < _HALF:
            raise ValueError(f"window must be 1..{_HALF - 1}, got {self.window}")
        if self.backlog < 0 or self.max_retries < 0 or self.hello_retries < 0:
            raise ValueError("backlog, max_retries and hello_retries must not be negative")
        if not 0 < self.ack_timeout <= self.max_timeout:
            raise ValueError("need 0 < ack_timeout <= max_timeout")
        if self.hello_timeout <= 0 or self.announce_interval < 0:
            raise ValueError("hello_timeout must be positive, announce_interval not negative")
        if self.peer_silence_timeout is not None and self.peer_silence_timeout <= 0:
            raise ValueError("peer_silence_timeout must be positive or None")

    def retransmit_timeouts(self) -> tuple[float, ...]:
        """Successive waits for an ACK: after the first send, then after each resend."""
        return tuple(
            min(self.ack_timeout * 2**k, self.max_timeout) for k in range(self.max_retries + 1)
        )

    def reliable_failure_time(self) -> float:
        """Seconds from sending a reliable message into a dead link to LinkFailed.

        Exact when ``handle_timeout`` is called at each ``next_deadline``.
        """
        return sum(self.retransmit_timeouts())

    def handshake_failure_time(self) -> float:
        """Seconds from ``start_handshake`` with no answer to LinkFailed (same proviso)."""
        return (self.hello_retries + 1) * self.hello_timeout


# --- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """Host: the handshake succeeded. Device: a host said Hello.

    ``abandoned`` (device only): reliable messages the previous host never
    acknowledged; they are not resent on the new link.
    ``resumed`` (device only): the Hello carried the current host's nonce after the
    device had given up the link (section 7.3): the same host, not a new one.
    """

    identity: Identity | None = None
    host_nonce: int = 0
    abandoned: tuple[Message, ...] = ()
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    """The two ends cannot talk safely. Never arm such a pen.

    Host: the pen's identity (protocol version or schema hash) does not match. A pen
    of another protocol version is named from the Identity prefix every version
    shares; the fields after it are then 0 in ``identity``.
    Device: the Hello speaks another protocol version (``identity`` is the pen's own).
    """

    reason: str
    identity: Identity


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message from the peer. Reliable ones arrive exactly once and in order.

    ``in_order`` is False for an unreliable message numbered behind one already
    delivered (a duplicate, or overtaken on the line): it is still delivered, so a
    safety monitor sees every sample, but it is older than what came before it.
    """

    message: Message
    in_order: bool = True


@dataclass(frozen=True, slots=True)
class Delivered:
    """A reliable message we sent was acknowledged (it took effect exactly once)."""

    seq: int
    message: Message


@dataclass(frozen=True, slots=True)
class LinkFailed:
    """Reliable delivery gave up. Unacknowledged messages are in ``abandoned``."""

    reason: str
    abandoned: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerRebooted:
    """Host: the pen announced a different boot id. Outstanding messages are dropped."""

    previous: Identity
    current: Identity
    abandoned: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """A frame passed its CRC but made no sense (unknown type, bad body, wrong way).

    ``reliable``: it came in a RELIABLE frame, which consumed its sequence number and
    was acknowledged; the device answers ``CommandRefused(msg_type, reason)``. One in
    an UNRELIABLE frame (it consumed its unreliable number) or a SYNC frame is only
    counted and reported, never answered (PROTOCOL.md section 12).
    """

    detail: str
    msg_type: int
    reason: RefusalCode
    reliable: bool = False


Event = (
    Connected
    | HandshakeRefused
    | MessageReceived
    | Delivered
    | LinkFailed
    | PeerRebooted
    | ProtocolViolation
)


@dataclass
class LinkStats:
    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    crc_errors: int = 0
    header_errors: int = 0
    discarded_bytes: int = 0
    retransmits: int = 0
    naks_sent: int = 0
    naks_received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    unreliable_lost: int = 0
    unreliable_stale: int = 0
    protocol_errors: int = 0
    handshakes: int = 0
    stale_hellos: int = 0  # device: Hellos of an earlier host nonce, ignored
    rtt_samples: int = 0
    rtt_last: float = 0.0
    rtt_min: float = 0.0
    rtt_max: float = 0.0
    rtt_sum: float = 0.0

    @property
    def rtt_mean(self) -> float:
        return self.rtt_sum / self.rtt_samples if self.rtt_samples else 0.0

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = dict(vars(self))
        out["rtt_mean"] = self.rtt_mean
        return out


@dataclass(slots=True)
class _Outstanding:
    seq: int
    message: Message
    frame: bytes
    sent_at: float
    resent: bool = False


@dataclass
class _ReliableSender:
    config: LinkConfig
    next_seq: int = 0
    window: deque[_Outstanding] = field(default_factory=deque)
    backlog: deque[Message] = field(default_factory=deque)
    timeout: float = 0.0
    retries: int = 0

    def reset(self, first_seq: int) -> tuple[Message, ...]:
        abandoned = tuple(o.message for o in self.window) + tuple(self.backlog)
        self.next_seq = first_seq & 0xFFFF
        self.window.clear()
        self.backlog.clear()
        self.timeout = self.config.ack_timeout
        self.retries = 0
        return abandoned


class _Endpoint:
    """The machinery both ends share: framing, reliable and unreliable streams, stats."""

    role: Role
    _outgoing_direction: Direction

    def __init__(self, config: LinkConfig | None = None) -> None:
        self.config = config or LinkConfig()
        self.state = LinkState.IDLE
        self.stats = LinkStats()
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._tx = _ReliableSender(self.config)
        self._tx.timeout = self.config.ack_timeout
        self._rx_expected = 0
        self._nak_sent_for: int | None = None
        self._unrel_tx = 0
        self._unrel_rx_next = 0

    # -- public -------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write to the wire, accumulated since the last call."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def send(self, message: Message, now: float) -> int | None:
        """Queue a message. Returns its sequence number if it is reliable.

        Raises NotReadyError before the handshake, LinkBusyError when the backlog is full,
        ValueError for a message that this end may not send or cannot encode.
        """
        if message.DIRECTION is not self._outgoing_direction:
            raise ValueError(f"{type(message).__name__} is not sent by the {self.role.value}")
        if message.DELIVERY is Delivery.SYNC:
            raise ValueError(f"{type(message).__name__} is a handshake message")
        if self.state is not LinkState.READY:
            raise NotReadyError(f"link is {self.state.value}, not ready")
        payload = encode_message(message)
        if message.DELIVERY is Delivery.UNRELIABLE:
            self._emit(encode_frame(FrameKind.UNRELIABLE, self._unrel_tx, message.TYPE, payload))
            self._unrel_tx = (self._unrel_tx + 1) & 0xFFFF
            return None
        tx = self._tx
        if len(tx.window) >= self.config.window:
            if len(tx.backlog) >= self.config.backlog:
                raise LinkBusyError(f"{len(tx.backlog)} reliable messages already waiting")
            tx.backlog.append(message)
            return (tx.next_seq + len(tx.backlog) - 1) & 0xFFFF
        return self._transmit_new(message, payload, now)

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed received bytes; return the events they complete."""
        stats = self.stats
        stats.bytes_received += len(data)
        frames = self._decoder.feed(data)
        dstats = self._decoder.stats
        stats.crc_errors = dstats.crc_errors
        stats.header_errors = dstats.header_errors
        stats.discarded_bytes = dstats.discarded_bytes
        events: list[Event] = []
        for frame in frames:
            stats.frames_received += 1
            self._on_frame(frame, now, events)
        return events

    def next_deadline(self) -> float | None:
        """When handle_timeout must next be called, or None if nothing is pending."""
        if self._tx.window:
            return self._tx.window[0].sent_at + self._tx.timeout
        return None

    def handle_timeout(self, now: float) -> list[Event]:
        """Retransmit what timed out. Safe to call at any time."""
        events: list[Event] = []
        tx = self._tx
        if not tx.window or now < tx.window[0].sent_at + tx.timeout:
            return events
        if self._count_resend(events):
            return events
        tx.timeout = min(tx.timeout * 2, self.config.max_timeout)
        self._resend_window(now)
        return events

    @property
    def unreliable_sent(self) -> int:
        """The number the next unreliable frame will carry (u16)."""
        return self._unrel_tx

    @property
    def unacknowledged(self) -> int:
        """Reliable messages sent or waiting that the peer has not acknowledged."""
        return len(self._tx.window) + len(self._tx.backlog)

    # -- internals ----------------------------------------------------------------

    def _count_resend(self, events: list[Event]) -> bool:
        """Count one resend without progress; True (and LinkFailed) when that is too many."""
        tx = self._tx
        tx.retries += 1
        if tx.retries <= self.config.max_retries:
            return False
        abandoned = tx.reset(tx.next_seq)
        self._fire(Input.RETRIES_EXHAUSTED)
        events.append(
            LinkFailed(f"no acknowledgement after {self.config.max_retries} resends", abandoned)
        )
        return True

    def _fire(self, event: Input) -> None:
        new = TRANSITIONS.get((self.role, self.state, event))
        if new is not None:
            self.state = new

    def _emit(self, frame: bytes) -> None:
        self._out += frame
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(frame)

    def _transmit_new(self, message: Message, payload: bytes, now: float) -> int:
        tx = self._tx
        seq = tx.next_seq
        frame = encode_frame(FrameKind.RELIABLE, seq, message.TYPE, payload)
        tx.window.append(_Outstanding(seq, message, frame, now))
        tx.next_seq = (seq + 1) & 0xFFFF
        self._emit(frame)
        return seq

    def _resend_window(self, now: float) -> None:
        for item in self._tx.window:
            item.sent_at = now
            item.resent = True
            self.stats.retransmits += 1
            self._emit(item.frame)

    def _reset_streams(self, tx_first: int, rx_first: int) -> tuple[Message, ...]:
        abandoned = self._tx.reset(tx_first)
        self._rx_expected = rx_first & 0xFFFF
        self._nak_sent_for = None
        self._restart_unreliable()
        return abandoned

    def _restart_unreliable(self) -> None:
        """Both unreliable counters back to 0: done whenever an Identity brings the link up."""
        self._unrel_tx = 0
        self._unrel_rx_next = 0

    def _on_frame(self, frame: Frame, now: float, events: list[Event]) -> None:
        kind = frame.kind
        if kind == FrameKind.SYNC:
            self._on_sync(frame, now, events)
        elif self.state is not LinkState.READY:
            self._on_frame_before_ready(frame, now)
        elif kind == FrameKind.UNRELIABLE:
            self._on_unreliable(frame, events)
        elif kind == FrameKind.RELIABLE:
            self._on_reliable(frame, events)
        elif kind == FrameKind.ACK:
            self._on_ack(frame.seq, now, events)
        elif kind == FrameKind.NAK:
            self._on_nak(frame.seq, now, events)

    def _on_reliable(self, frame: Frame, events: list[Event]) -> None:
        diff = (frame.seq - self._rx_expected) & 0xFFFF
        if diff == 0:
            self._rx_expected = (self._rx_expected + 1) & 0xFFFF
            self._nak_sent_for = None
            self._emit(encode_frame(FrameKind.ACK, frame.seq, 0))
            self._deliver(frame, Delivery.RELIABLE, events)
        elif diff >= _HALF:
            self.stats.duplicates += 1
            self._emit(encode_frame(FrameKind.ACK, self._rx_expected - 1, 0))
        else:
            self.stats.out_of_order += 1
            if self._nak_sent_for != self._rx_expected:
                self._nak_sent_for = self._rx_expected
                self.stats.naks_sent += 1
                self._emit(encode_frame(FrameKind.NAK, self._rx_expected, 0))

    def _on_unreliable(self, frame: Frame, events: list[Event]) -> None:
        gap = (frame.seq - self._unrel_rx_next) & 0xFFFF
        if gap >= _HALF:
            # Behind a frame already delivered: counted as stale, never as lost, and it
            # does not move `next`; still delivered (marked) so that nothing the peer
            # said is hidden from the layer that judges it.
            self.stats.unreliable_stale += 1
            self._deliver(frame, Delivery.UNRELIABLE, events, in_order=False)
            return
        self.stats.unreliable_lost += gap
        self._unrel_rx_next = (frame.seq + 1) & 0xFFFF
        self._deliver(frame, Delivery.UNRELIABLE, events)

    def _deliver(
        self, frame: Frame, delivery: Delivery, events: list[Event], *, in_order: bool = True
    ) -> None:
        reliable = delivery is Delivery.RELIABLE
        try:
            message = decode_message(frame.msg_type, frame.payload)
        except MessageDecodeError as exc:
            self._violation(str(exc), exc.msg_type, exc.reason, events, reliable=reliable)
            return
        if message.DIRECTION is self._outgoing_direction or message.DELIVERY is Delivery.SYNC:
            self._violation(
                f"{type(message).__name__} may not be received by the {self.role.value}",
                frame.msg_type,
                RefusalCode.UNKNOWN_MESSAGE,
                events,
                reliable=reliable,
            )
        elif message.DELIVERY is not delivery:
            self._violation(
                f"{type(message).__name__} is {message.DELIVERY.value}, "
                f"sent in a {delivery.value} frame",
                frame.msg_type,
                RefusalCode.BAD_PAYLOAD,
                events,
                reliable=reliable,
            )
        else:
            events.append(MessageReceived(message, in_order))

    def _violation(
        self,
        detail: str,
        msg_type: int,
        code: RefusalCode,
        events: list[Event],
        *,
        reliable: bool = False,
    ) -> None:
        self.stats.protocol_errors += 1
        events.append(ProtocolViolation(detail, msg_type, code, reliable))

    def _on_ack(self, seq: int, now: float, events: list[Event]) -> None:
        tx = self._tx
        if not tx.window:
            return
        acked = ((seq - tx.window[0].seq) & 0xFFFF) + 1
        if acked > len(tx.window):
            return  # stale ACK from before a reset, or for a duplicate: ignore
        self._acknowledge(acked, now, events)
        self._refill(now)

    def _on_nak(self, expected: int, now: float, events: list[Event]) -> None:
        self.stats.naks_received += 1
        tx = self._tx
        if not tx.window:
            return
        before = (expected - tx.window[0].seq) & 0xFFFF  # messages the peer has
        if before > len(tx.window):
            return  # not about this window (stale or from before a reset)
        if before:
            self._acknowledge(before, now, events)
        elif self._count_resend(events):
            # A NAK that acknowledges nothing asks for a resend without progress: it
            # counts like a timeout, or a peer that keeps NAKing would hold the link
            # open for ever.
            return
        # Resend only what was outstanding; messages moved in from the backlog below
        # are sent for the first time.
        self._resend_window(now)
        self._refill(now)

    def _acknowledge(self, count: int, now: float, events: list[Event]) -> None:
        tx = self._tx
        for _ in range(count):
            item = tx.window.popleft()
            if not item.resent:
                self._sample_rtt(now - item.sent_at)
            events.append(Delivered(item.seq, item.message))
        tx.retries = 0
        tx.timeout = self.config.ack_timeout

    def _refill(self, now: float) -> None:
        tx = self._tx
        while tx.backlog and len(tx.window) < self.config.window:
            message = tx.backlog.popleft()
            self._transmit_new(message, encode_message(message), now)

    def _sample_rtt(self, rtt: float) -> None:
        s = self.stats
        s.rtt_last = rtt
        s.rtt_min = rtt if s.rtt_samples == 0 else min(s.rtt_min, rtt)
        s.rtt_max = max(s.rtt_max, rtt)
        s.rtt_sum += rtt
        s.rtt_samples += 1

    # -- role specific ------------------------------------------------------------

    def _on_sync(self, frame: Frame, now: float, events: list[Event]) -> None:
        raise NotImplementedError

    def _on_frame_before_ready(self, frame: Frame, now: float) -> None:
        pass


class HostConnection(_Endpoint):
    """The controller's end of one pen's link."""

    role = Role.HOST
    _outgoing_direction = Direction.HOST_TO_DEVICE

    def __init__(self, config: LinkConfig | None = None) -> None:
        super().__init__(config)
        self.identity: Identity | None = None
        self.refusal: str | None = None
        self._nonce = 0
        self._started = False
        self._hello_frame = b""
        self._hello_sent_at = 0.0
        self._hello_tries = 0
        self._last_frame_at = 0.0
        self._peer_first_seq = 0  # the d0 of the Identity that brought the link up

    def start_handshake(self, host_nonce: int, now: float, first_seq: int | None = None) -> None:
        """Send Hello. host_nonce must differ from the previous link's (use a random u32).

        ``first_seq`` is this end's first reliable sequence number. By default a new
        connection derives it from the nonce and a later handshake continues where the
        previous link stopped, so a delayed frame of an earlier link is never mistaken
        for a new command.
        """
        if not 0 < host_nonce < 2**32:
            raise ValueError("host_nonce must be a non-zero u32")
        if host_nonce == self._nonce:
            # The pen would take the new Hello for a resend of the old one and keep
            # the old link's sequence numbers.
            raise ValueError("host_nonce must differ from the previous link's")
        self._fire(Input.START_HANDSHAKE)
        if self.state is not LinkState.HANDSHAKING:
            raise NotReadyError(f"cannot start a handshake while {self.state.value}")
        if first_seq is None:
            first_seq = self._tx.next_seq if self._started else host_nonce & 0xFFFF
        self._started = True
        self._reset_streams(first_seq, 0)
        self._nonce = host_nonce
        self.refusal = None
        payload = encode_message(Hello(PROTOCOL_VERSION, host_nonce))
        self._hello_frame = encode_frame(FrameKind.SYNC, first_seq, Hello.TYPE, payload)
        self._hello_tries = 0
        self._hello_sent_at = now
        self._emit(self._hello_frame)

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        frames_before = self.stats.frames_received
        events = super().receive_data(data, now)
        if self.stats.frames_received != frames_before:
            self._last_frame_at = now
        return events

    def next_deadline(self) -> float | None:
        if self.state is LinkState.HANDSHAKING:
            return self._hello_sent_at + self.config.hello_timeout
        deadline = super().next_deadline()
        silence = self._silence_deadline()
        if silence is not None and (deadline is None or silence < deadline):
            return silence
        return deadline

    def _silence_deadline(self) -> float | None:
        timeout = self.config.peer_silence_timeout
        if timeout is None or self.state is not LinkState.READY:
            return None
        return self._last_frame_at + timeout

    def handle_timeout(self, now: float) -> list[Event]:
        if self.state is not LinkState.HANDSHAKING:
            silence = self._silence_deadline()
            if silence is not None and now >= silence:
                abandoned = self._tx.reset(self._tx.next_seq)
                self._fire(Input.RETRIES_EXHAUSTED)
                quiet_ms = (now - self._last_frame_at) * 1000
                return [LinkFailed(f"no frame from the pen for {quiet_ms:.0f} ms", abandoned)]
            return super().handle_timeout(now)
        if now < self._hello_sent_at + self.config.hello_timeout:
            return []
        self._hello_tries += 1
        if self._hello_tries > self.config.hello_retries:
            self._fire(Input.RETRIES_EXHAUSTED)
            return [LinkFailed(f"pen did not answer Hello {self.config.hello_retries + 1} times")]
        self._hello_sent_at = now
        self.stats.retransmits += 1
        self._emit(self._hello_frame)
        return []

    def _on_sync(self, frame: Frame, now: float, events: list[Event]) -> None:
        try:
            identity = decode_message(frame.msg_type, frame.payload)
        except MessageDecodeError as exc:
            foreign = _foreign_identity(frame)
            if foreign is None:
                self._violation(str(exc), exc.msg_type, exc.reason, events)
                return
            identity = foreign
        if not isinstance(identity, Identity):
            self._violation(
                f"{type(identity).__name__} in a handshake frame",
                frame.msg_type,
                RefusalCode.UNKNOWN_MESSAGE,
                events,
            )
            return
        if self.state is LinkState.HANDSHAKING:
            if identity.host_nonce != self._nonce:
                return  # an announcement or an answer to an older Hello
            problem = self._check_identity(identity)
            self.identity = identity
            if problem:
                self.refusal = problem
                self._fire(Input.IDENTITY_MISMATCH)
                events.append(HandshakeRefused(problem, identity))
                return
            self._rx_expected = self._peer_first_seq = frame.seq
            self._restart_unreliable()
            self._fire(Input.IDENTITY_OK)
            self.stats.handshakes += 1
            events.append(Connected(identity, self._nonce))
        elif self.state is LinkState.READY and self.identity is not None:
            if identity.boot_id != self.identity.boot_id:
                previous = self.identity
                abandoned = self._reset_streams(self._tx.next_seq, 0)
                self.identity = identity
                self._fire(Input.PEER_REBOOTED)
                events.append(PeerRebooted(previous, identity, abandoned))
            elif identity.host_nonce == 0:
                # The pen announces itself only when it has no link: it dropped ours
                # (it gave up retransmitting), so nothing we send reaches it any more.
                abandoned = self._tx.reset(self._tx.next_seq)
                self._fire(Input.PEER_LOST_LINK)
                events.append(
                    LinkFailed(
                        f"pen {identity.serial_text} dropped the link (it announced itself "
                        "while the link was up)",
                        abandoned,
                    )
                )
            elif identity.host_nonce == self._nonce and frame.seq != self._peer_first_seq:
                # The pen had dropped our link and resumed it on a delayed copy of our
                # Hello (section 7.3): it restarted its numbering and abandoned what it
                # had not got acknowledged, while we thought the link never went down.
                # Only a new handshake brings both ends back in step. (A duplicated
                # answer to a duplicated Hello carries the same first number: ignored.)
                abandoned = self._tx.reset(self._tx.next_seq)
                self._fire(Input.PEER_LOST_LINK)
                events.append(
                    LinkFailed(
                        f"pen {identity.serial_text} dropped the link and resumed it on a "
                        "delayed Hello",
                        abandoned,
                    )
                )

    @staticmethod
    def _check_identity(identity: Identity) -> str | None:
        if identity.protocol_version != PROTOCOL_VERSION:
            remedy = (
                f"update the pen firmware to protocol version {PROTOCOL_VERSION}"
                if identity.protocol_version < PROTOCOL_VERSION
                else "update the controller"
            )
            return (
                f"pen {identity.serial_text} (firmware {identity.firmware_version}) speaks "
                f"protocol version {identity.protocol_version}, this controller speaks "
                f"{PROTOCOL_VERSION}: {remedy} before treating"
            )
        if identity.schema_hash != SCHEMA_HASH:
            return (
                f"pen {identity.serial_text} (firmware {identity.firmware_version}) uses message "
                f"schema {identity.schema_hash:#010x}, this controller uses {SCHEMA_HASH:#010x}: "
                "update the pen firmware or the controller before treating"
            )
        return None


class DeviceConnection(_Endpoint):
    """The pen's end of the link (the simulator runs this; firmware implements it in C)."""

    role = Role.DEVICE
    _outgoing_direction = Direction.DEVICE_TO_HOST

    def __init__(self, identity: Identity, config: LinkConfig | None = None) -> None:
        super().__init__(config)
        self.identity = identity
        self._nonce = 0
        # A fresh boot starts its reliable numbers from the boot id, so frames of the
        # previous boot still in flight do not look like new ones.
        self._tx.next_seq = identity.boot_id & 0xFFFF
        self._tx_first = self._tx.next_seq
        self._recent_nonces: deque[int] = deque(maxlen=RECENT_NONCES)
        self._last_announce: float | None = None

    def announce(self, now: float) -> None:
        """Send an unsolicited Identity (host_nonce 0): done at boot so a host notices."""
        self._last_announce = now
        self._emit_identity(0, self._tx.next_seq)

    def _emit_identity(self, nonce: int, first_seq: int) -> None:
        ident = dataclasses.replace(self.identity, host_nonce=nonce)
        self._emit(encode_frame(FrameKind.SYNC, first_seq, Identity.TYPE, encode_identity(ident)))

    def _on_sync(self, frame: Frame, now: float, events: list[Event]) -> None:
        try:
            hello = decode_message(frame.msg_type, frame.payload)
        except MessageDecodeError as exc:
            self._violation(str(exc), exc.msg_type, exc.reason, events)
            return
        if not isinstance(hello, Hello) or hello.host_nonce == 0:
            self._violation(
                "handshake frame is not a valid Hello",
                frame.msg_type,
                RefusalCode.BAD_PAYLOAD,
                events,
            )
            return
        nonce = hello.host_nonce
        if nonce == self._nonce:
            if self.state is LinkState.READY:
                # A duplicated or retransmitted Hello: answer again, reset nothing.
                self._emit_identity(nonce, self._tx_first)
                return
            # We gave up on this host but it is still there (its Hello was resent):
            # resume without touching the reliable receive side, so nothing it sent
            # before is applied a second time. The unreliable counters restart, as
            # with every Identity that brings the link up (the host restarts its own).
            self._tx_first = self._tx.next_seq
            self._restart_unreliable()
            self._fire(Input.HELLO)
            self.stats.handshakes += 1
            self._emit_identity(nonce, self._tx_first)
            events.append(Connected(None, nonce, resumed=True))
            return
        if nonce in self._recent_nonces:
            # A Hello from an earlier link, delayed or duplicated on the wire. Obeying it
            # would restart the receive side at its old sequence number and could apply
            # a command twice.
            self.stats.stale_hellos += 1
            return
        own_version = self.identity.protocol_version
        if hello.protocol_version != own_version:
            # Answer, so the host can say why, but never accept the link.
            self._emit_identity(nonce, self._tx.next_seq)
            events.append(
                HandshakeRefused(
                    f"host speaks protocol version {hello.protocol_version}, "
                    f"this pen speaks {own_version}",
                    self.identity,
                )
            )
            return
        if self._nonce:
            self._recent_nonces.append(self._nonce)
        self._nonce = nonce
        self._tx_first = self._tx.next_seq
        abandoned = self._reset_streams(self._tx_first, frame.seq)
        self._fire(Input.HELLO)
        self.stats.handshakes += 1
        self._emit_identity(nonce, self._tx_first)
        events.append(Connected(None, nonce, abandoned))

    def _on_frame_before_ready(self, frame: Frame, now: float) -> None:
        # A host talking to a pen that does not know it (the pen rebooted or gave up
        # on the link): remind it, at most once per announce_interval.
        last = self._last_announce
        if last is None or now - last >= self.config.announce_interval:
            self.announce(now)


def _foreign_identity(frame: Frame) -> Identity | None:
    """A pen of another protocol version, named from the Identity prefix every version
    shares; None when the frame is not that (then it is a protocol violation).
    """
    payload = frame.payload
    if (
        frame.msg_type != Identity.TYPE
        or len(payload) < IDENTITY_PREFIX_SIZE
        or payload[0] == PROTOCOL_VERSION
    ):
        return None
    return decode_identity_prefix(payload)
