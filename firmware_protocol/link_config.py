"""Timing and sizing of the link, and the sequence space its numbers live in."""

from __future__ import annotations

from dataclasses import dataclass

# Sequence numbers are u16 and wrap; one in the half behind the expected one is old.
_HALF = 0x8000


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
