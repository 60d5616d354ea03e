"""What the link tells its caller: the events ``receive_data`` and ``handle_timeout``
return, the errors ``send`` and ``start_handshake`` raise, and the counters in ``stats``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import Identity, Message, RefusalCode


class LinkBusyError(RuntimeError):
    """The reliable backlog is full: the peer is not keeping up or is gone."""


class NotReadyError(RuntimeError):
    """A message was sent before the handshake completed."""


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
