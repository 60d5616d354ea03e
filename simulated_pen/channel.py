"""A seeded, pure byte channel that damages what passes through it (fault injection).

One ``LossyChannel`` is one direction of a cable. Bytes go in with ``push`` and come
out with ``pull`` once their delivery time has come. Nothing here reads a clock or
the global random generator: time is an argument and randomness comes from the
``random.Random`` the caller passes, so a run is reproducible from its seed.

Faults, each independent:

* ``drop``: per byte, the probability that the byte vanishes.
* ``corrupt``: per byte, the probability that one of its eight bits flips.
* ``duplicate``: per pushed chunk, the probability that it is delivered twice
  (the copy straight after the original).
* ``reorder``: per pushed chunk, the probability that it overtakes the chunk
  pushed before it, if that one is still in flight (so reordering needs a
  ``delay`` or ``jitter`` long enough for two chunks to be in flight at once).
* ``delay`` + ``jitter``: a chunk pushed at ``now`` is delivered at
  ``now + delay + uniform(0, jitter)``, but never before the chunk pushed
  before it: like a real cable, the channel keeps order unless told to reorder.

Per-byte faults are drawn as geometric gaps between damaged bytes, so the cost is
per fault, not per byte, and a clean channel costs almost nothing.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

_FAR = float(2**62)  # bytes; a gap this long never ends in practice


@dataclass
class ChannelStats:
    """What the channel did. Once everything is pulled:
    ``bytes_out == bytes_in - dropped + duplicated_bytes``."""

    chunks_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0  # bytes
    corrupted: int = 0  # bit flips (one per corrupted byte)
    duplicated: int = 0  # chunks delivered twice
    duplicated_bytes: int = 0
    reordered: int = 0  # chunks that overtook the one pushed before them


class _GapSampler:
    """Distance to the next damaged byte for a per-byte probability p (geometric)."""

    def __init__(self, rng: random.Random, p: float) -> None:
        self._rng = rng
        self._p = p
        self._log_q = math.log1p(-p) if 0.0 < p < 1.0 else 0.0
        self.gap = self._draw()

    def _draw(self) -> int:
        if self._p <= 0.0:
            return -1  # never
        if self._p >= 1.0:
            return 0
        # 1 - random() lies in (0, 1], so the logarithm is finite; a tiny p can still
        # give a gap too large for an int, which means "not in this run".
        return int(min(math.log(1.0 - self._rng.random()) / self._log_q, _FAR))

    def positions(self, n: int) -> list[int]:
        """Indices in a chunk of n bytes that are hit; carries the gap to the next chunk."""
        if self.gap < 0:
            return []
        hits: list[int] = []
        i = self.gap
        while i < n:
            hits.append(i)
            i += 1 + self._draw()
        self.gap = i - n
        return hits


class LossyChannel:
    """One direction of a damaged cable; see the module docstring."""

    def __init__(
        self,
        rng: random.Random,
        *,
        drop: float = 0.0,
        corrupt: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.0,
    ) -> None:
        for name, p in (
            ("drop", drop),
            ("corrupt", corrupt),
            ("duplicate", duplicate),
            ("reorder", reorder),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability, got {p}")
        if delay < 0.0 or jitter < 0.0:
            raise ValueError("delay and jitter must not be negative")
        self._rng = rng
        self.drop = drop
        self.corrupt = corrupt
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.jitter = jitter
        self.stats = ChannelStats()
        self._drops = _GapSampler(rng, drop)
        self._flips = _GapSampler(rng, corrupt)
        # In flight, in delivery order; delivery times never decrease along the queue.
        self._queue: deque[tuple[float, bytes]] = deque()
        self._last_time = -math.inf

    @property
    def in_flight(self) -> int:
        """Bytes pushed (and not dropped) that have not been pulled yet."""
        return sum(len(data) for _, data in self._queue)

    def push(self, data: bytes, now: float) -> None:
        """Put bytes on the wire at time ``now``."""
        if not data:
            return
        stats = self.stats
        stats.chunks_in += 1
        stats.bytes_in += len(data)
        rng = self._rng
        damaged = data
        flips = self._flips.positions(len(data))
        if flips:
            buf = bytearray(data)
            for i in flips:
                buf[i] ^= 1 << rng.randrange(8)
            stats.corrupted += len(flips)
            damaged = bytes(buf)
        drops = self._drops.positions(len(data))
        if drops:
            gone = set(drops)
            damaged = bytes(b for i, b in enumerate(damaged) if i not in gone)
            stats.dropped += len(drops)
        # Draw every per-chunk decision even when unused, so a chunk's fate does not
        # depend on whether the bytes before it happened to be dropped.
        jitter = rng.random() * self.jitter
        duplicate = rng.random() < self.duplicate
        reorder = rng.random() < self.reorder
        if not damaged:
            return
        at = max(now + self.delay + jitter, self._last_time)
        self._last_time = at
        queue = self._queue
        queue.append((at, damaged))
        if reorder and len(queue) >= 2:
            # Swap contents with the previous chunk still in flight, keeping the times:
            # this one arrives first, that one takes this one's (later) slot.
            (t_prev, prev), (t_this, this) = queue[-2], queue[-1]
            queue[-2], queue[-1] = (t_prev, this), (t_this, prev)
            stats.reordered += 1
        if duplicate:
            queue.append((at, damaged))
            stats.duplicated += 1
            stats.duplicated_bytes += len(damaged)

    def pull(self, now: float) -> bytes:
        """Bytes whose delivery time has come, in delivery order (b"" if none)."""
        queue = self._queue
        if not queue or queue[0][0] > now:
            return b""
        parts: list[bytes] = []
        while queue and queue[0][0] <= now:
            parts.append(queue.popleft()[1])
        out = b"".join(parts)
        self.stats.bytes_out += len(out)
        return out

    def next_delivery(self) -> float | None:
        """When the next bytes become available to ``pull``, or None if nothing is in flight."""
        return self._queue[0][0] if self._queue else None
