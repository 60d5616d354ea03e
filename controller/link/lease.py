"""Host side of the arming lease: when to send Renew. Pure; time is an argument.

The pen disarms itself when a lease runs out (product.md §3), so the host renews
well inside it: four renewals per lease (every 62.5 ms of the default 250 ms) mean
that after two consecutive lost Renews the next one still arrives with a quarter
of the lease to spare (250 - 3 x 62.5 = 62.5 ms) for transmission and for this
event loop being late (PROTOCOL.md section 10). With three, two lost Renews left
no margin at all. A controller whose event loop stalls stops renewing, and the pen
stops by itself: that is the point.
"""

from __future__ import annotations

from dataclasses import dataclass

RENEWALS_PER_LEASE = 4


@dataclass
class LeaseKeeper:
    """Tracks one arming lease and says when the next Renew is due."""

    token: int | None = None
    lease_s: float = 0.0
    _next_renew: float | None = None

    @property
    def active(self) -> bool:
        return self.token is not None

    def start(self, token: int, lease_ms: int, now: float) -> None:
        self.token = token
        self.lease_s = lease_ms / 1000.0
        self._next_renew = now + self.lease_s / RENEWALS_PER_LEASE

    def stop(self) -> None:
        self.token = None
        self._next_renew = None

    def next_deadline(self) -> float | None:
        return self._next_renew

    def due(self, now: float) -> int | None:
        """The token to renew now, or None. Schedules the following renewal."""
        if self.token is None or self._next_renew is None or now < self._next_renew:
            return None
        self._next_renew = now + self.lease_s / RENEWALS_PER_LEASE
        return self.token
