"""Which outbox messages to publish, and when to publish them again: sans-I/O.

The publisher asks :class:`DeliveryWindow` how many new messages it may send
(``room()``), tells it what it sent (``sent()``) and what ingest acknowledged
(``acked()``), and asks what is due again (``due()``); time is an argument
everywhere, so tests drive it with a fake clock.

A message that stays unacknowledged is sent again:

* after a reconnect to the broker (``reset()``): everything in flight;
* when a message sent after it has been acknowledged and it is still missing
  ``reorder_s`` plus that acknowledgement's round trip after it was sent (loss
  detection by time, as TCP's RACK, RFC 8985, does): ingest works through
  a broker's queue in order, so an older message still missing was lost (a
  broker restarted before saving it, a subscription it forgot) or waits in the
  queue of a worker that is away, and sending it again lets a live worker write
  it. ``reorder_s`` covers the reordering between workers and concurrent writes;
* after a timeout (``rto_s``) without any acknowledgement, with exponential
  backoff up to ``rto_max_s``: the tail of a stream, or ingest down altogether.
  While ingest is down the broker queues for it, so every resend adds a copy to
  that queue; the backoff keeps the copies to a few per message over hours.

At most ``max_in_flight`` messages are unacknowledged at once: end-to-end flow
control, so that an absent ingest fills the bounded outbox, with its counted
overflow policy, rather than the broker's memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class _Flight:
    sent_at: float
    sends: int


@dataclass
class DeliveryCounters:
    sent: int = 0  # first sends
    resent_reconnect: int = 0  # in flight at a reconnect (sent again from the outbox)
    resent_lost: int = 0  # detected lost: a later message was acknowledged
    resent_timeout: int = 0  # unacknowledged for rto_s
    acked: int = 0  # messages completely acknowledged end to end


class DeliveryWindow:
    """The outbox messages in flight, by id; see the module docstring."""

    def __init__(
        self,
        *,
        max_in_flight: int = 5_000,
        reorder_s: float = 2.0,
        rto_s: float = 5.0,
        rto_max_s: float = 60.0,
    ) -> None:
        if max_in_flight < 1 or reorder_s <= 0 or rto_s <= 0 or rto_max_s < rto_s:
            raise ValueError("bad delivery window settings")
        self.max_in_flight = max_in_flight
        self.reorder_s = reorder_s
        self.rto_initial_s = rto_s
        self.rto_max_s = rto_max_s
        self.rto_s = rto_s
        self.counters = DeliveryCounters()
        self._flights: dict[int, _Flight] = {}
        # RACK: send time and round trip of the most recently sent message acknowledged.
        self._rack_sent_at = float("-inf")
        self._rack_rtt = 0.0
        self._last_progress = float("-inf")  # last ack, or last timeout resend

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def room(self) -> int:
        """How many new messages may be sent now."""
        return max(0, self.max_in_flight - len(self._flights))

    def sent(self, ids: Iterable[int], now: float) -> None:
        """These messages went to the broker now (first sends and resends alike)."""
        for i in ids:
            flight = self._flights.get(i)
            if flight is None:
                self._flights[i] = _Flight(now, 1)
                self.counters.sent += 1
                if self._last_progress == float("-inf"):
                    self._last_progress = now
            else:
                flight.sent_at = now
                flight.sends += 1

    def forget(self, ids: Iterable[int]) -> None:
        """These messages need no acknowledgement (delivered on PUBACK, or dropped)."""
        for i in ids:
            self._flights.pop(i, None)

    def acked(self, ids: Iterable[int], now: float) -> None:
        """Ingest acknowledged every key of these messages: they left the outbox."""
        progress = False
        for i in ids:
            flight = self._flights.pop(i, None)
            if flight is None:
                continue  # sent by an earlier process life, or acknowledged twice
            progress = True
            self.counters.acked += 1
            if flight.sent_at >= self._rack_sent_at:
                self._rack_sent_at = flight.sent_at
                self._rack_rtt = now - flight.sent_at
        if progress:
            self.rto_s = self.rto_initial_s
            self._last_progress = now

    def reset(self) -> int:
        """A new broker connection: nothing is in flight any more. Returns how many were."""
        count = len(self._flights)
        self.counters.resent_reconnect += count
        self._flights.clear()
        self._rack_sent_at = float("-inf")
        self._rack_rtt = 0.0
        self._last_progress = float("-inf")
        self.rto_s = self.rto_initial_s
        return count

    def due(self, now: float) -> list[int]:
        """Messages to send again now, oldest first (their clocks restart when sent)."""
        lost = [i for i, f in self._flights.items() if self._lost_at(f) <= now]
        if lost:
            self.counters.resent_lost += len(lost)
            return sorted(lost)
        if self._flights and now - self._last_progress >= self.rto_s:
            timed_out = [i for i, f in self._flights.items() if now - f.sent_at >= self.rto_s]
            if timed_out:
                self.counters.resent_timeout += len(timed_out)
                self.rto_s = min(self.rto_s * 2, self.rto_max_s)
                self._last_progress = now
                return sorted(timed_out)
        return []

    def next_deadline(self) -> float | None:
        """When ``due()`` may next return something without news (None: never)."""
        if not self._flights:
            return None
        oldest = min(f.sent_at for f in self._flights.values())
        deadline = max(self._last_progress, oldest) + self.rto_s
        return min(deadline, *(self._lost_at(f) for f in self._flights.values()))

    def _lost_at(self, flight: _Flight) -> float:
        """When a message counts as lost, given what was acknowledged so far."""
        if flight.sent_at >= self._rack_sent_at:
            return float("inf")  # nothing sent after it has been acknowledged
        return flight.sent_at + self._rack_rtt + self.reorder_s
