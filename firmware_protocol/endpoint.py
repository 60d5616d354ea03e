"""The machinery both ends of the link share: framing, the reliable and unreliable
streams, and their counters. ``connection.py`` adds each end's handshake.

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

from collections import deque
from dataclasses import dataclass, field

from .framing import Frame, FrameDecoder, FrameKind, encode_frame
from .link_config import _HALF, LinkConfig
from .link_events import (
    Delivered,
    Event,
    LinkBusyError,
    LinkFailed,
    LinkStats,
    MessageReceived,
    NotReadyError,
    ProtocolViolation,
)
from .link_states import TRANSITIONS, Input, LinkState, Role
from .messages import (
    Delivery,
    Direction,
    Message,
    MessageDecodeError,
    RefusalCode,
    decode_message,
    encode_message,
)


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
