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

The link is built in parts, one responsibility each; this module holds the
handshake of each end and re-exports the public names of the others, so
``from firmware_protocol.connection import ...`` reaches all of them:

* ``link_states.py``: link states and the inputs that move them, the ``TRANSITIONS``
  table (anything not listed leaves the state unchanged; PROTOCOL.md renders it).
* ``link_config.py``: ``LinkConfig``, the link's timing and sizing.
* ``link_events.py``: the events, errors and counters the caller sees.
* ``endpoint.py``: reliable and unreliable delivery, the same code at both ends; the
  rules of reliable delivery are in its docstring.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from .endpoint import _Endpoint
from .framing import Frame, FrameKind, encode_frame
from .link_config import LinkConfig
from .link_events import (
    Connected,
    Delivered,
    Event,
    HandshakeRefused,
    LinkBusyError,
    LinkFailed,
    LinkStats,
    MessageReceived,
    NotReadyError,
    PeerRebooted,
    ProtocolViolation,
)
from .link_states import TRANSITIONS, Input, LinkState, Role
from .messages import (
    IDENTITY_PREFIX_SIZE,
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    Direction,
    Hello,
    Identity,
    MessageDecodeError,
    RefusalCode,
    decode_identity_prefix,
    decode_message,
    encode_identity,
    encode_message,
)

__all__ = [
    "RECENT_NONCES",
    "TRANSITIONS",
    "Connected",
    "Delivered",
    "DeviceConnection",
    "Event",
    "HandshakeRefused",
    "HostConnection",
    "Input",
    "LinkBusyError",
    "LinkConfig",
    "LinkFailed",
    "LinkState",
    "LinkStats",
    "MessageReceived",
    "NotReadyError",
    "PeerRebooted",
    "ProtocolViolation",
    "Role",
]

#: Host nonces a pen remembers: a Hello carrying one of them is an old frame, ignored.
RECENT_NONCES = 8


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
