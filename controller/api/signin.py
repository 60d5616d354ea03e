"""The sign-in limiter: slows password guessing without letting anyone lock a colleague out.

The scheme (after OWASP's Authentication Cheat Sheet, "Protect against
automated attacks" and "Account lockout"), three independent limits:

1. **Per source** (the client address as the API trusts it, see ``edge.py``):
   at most ``per_source`` failures per ``window_s``. Beyond that every attempt
   from that address is refused unheard (429) until the oldest failure leaves
   the window. Stops one machine spraying passwords over many names.
2. **Per account and source**: at most ``per_account_source`` failures per
   ``window_s`` for one name from one address. Stops one machine guessing one
   password, and never touches the same person signing in from their own tablet.
3. **Per account, everywhere, progressive**: once a name has
   ``account_ceiling`` failures within ``account_window_s`` from all sources
   together (a distributed guess), each further attempt waits
   ``2**k`` seconds after the last failure, ``k`` growing with each failure,
   capped at ``delay_cap_s``. Sources from which that account signed in
   successfully within ``known_source_s`` are exempt: a distributed attacker is
   slowed to one guess per ``delay_cap_s``, but can never keep the real user
   out of their own tablet.

No limit is a lockout: each ends by itself once failures stop (at most
``window_s``, or ``delay_cap_s`` for the progressive one).

**Atomic**: an attempt takes its place in every counter *before* the password
is hashed (:meth:`SignInLimiter.begin`), as if it had failed, and gives it back
only if it succeeds (:meth:`Attempt.succeeded`). The check and the reservation
happen in one synchronous call on the event loop, so 30 wrong passwords and
the right one sent at once get exactly ``per_account_source`` hearings between
them, however they interleave.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

#: Keys kept before a sweep drops the empty ones (bounds memory under a spray of names).
_MAX_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class Throttled:
    """The attempt was refused unheard. ``retry_after_s`` is honest: trying then is heard."""

    retry_after_s: float
    limit: str  # "source", "account_source" or "account"


@dataclass
class Attempt:
    """One sign-in being heard. Call :meth:`succeeded` if the password was right;
    otherwise it stays counted as a failure (it already is)."""

    _limiter: SignInLimiter
    _stamp: float
    _keys: tuple[str, ...]
    account: str
    source: str
    _settled: bool = False

    def succeeded(self) -> None:
        """Give back the places this attempt took and remember the source as known."""
        if self._settled:
            return
        self._settled = True
        self._limiter._release(self)

    def failed(self) -> None:
        """It stays counted; only marks it settled (for symmetry and clarity at call sites)."""
        self._settled = True


@dataclass
class SignInLimiter:
    """See the module docstring. ``clock`` is monotonic seconds."""

    per_source: int = 10
    per_account_source: int = 5
    window_s: float = 60.0
    account_ceiling: int = 20
    account_window_s: float = 900.0
    delay_cap_s: float = 60.0
    known_source_s: float = 30 * 86400.0
    clock: Callable[[], float] = time.monotonic
    _stamps: dict[str, deque[float]] = field(default_factory=dict)
    _known: dict[tuple[str, str], float] = field(default_factory=dict)
    #: THROTTLED attempts since the last audit record, per (account, source).
    throttled_counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def begin(self, account: str, source: str) -> Attempt | Throttled:
        """Reserve a hearing for this attempt, or say why (and how long) it is refused.

        Synchronous on purpose: nothing can run between the check and the reservation.
        """
        now = self.clock()
        src, pair, acct = f"s:{source}", f"p:{account}\0{source}", f"a:{account}"
        waits: list[tuple[float, str]] = []
        src_times = self._window(src, now, self.window_s)
        if len(src_times) >= self.per_source:
            waits.append((src_times[0] + self.window_s - now, "source"))
        pair_times = self._window(pair, now, self.window_s)
        if len(pair_times) >= self.per_account_source:
            waits.append((pair_times[0] + self.window_s - now, "account_source"))
        known = self._known.get((account, source), -1e18) > now - self.known_source_s
        acct_times = self._window(acct, now, self.account_window_s)
        excess = len(acct_times) - self.account_ceiling
        if not known and excess >= 0:
            delay = min(2.0**excess, self.delay_cap_s)
            wait = acct_times[-1] + delay - now
            if wait > 0:
                waits.append((wait, "account"))
        if waits:
            wait, limit = max(waits)
            return Throttled(max(wait, 0.001), limit)
        self.throttled_counts.pop((account, source), None)
        keys = (src, pair, acct)
        for key in keys:
            self._stamps.setdefault(key, deque()).append(now)
        if len(self._stamps) > _MAX_KEYS:
            self._sweep(now)
        return Attempt(self, now, keys, account, source)

    def _window(self, key: str, now: float, window: float) -> deque[float]:
        times = self._stamps.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - window:
            times.popleft()
        return times

    def _release(self, attempt: Attempt) -> None:
        for key in attempt._keys:
            times = self._stamps.get(key)
            if times is not None:
                with contextlib.suppress(ValueError):  # already aged out of its window
                    times.remove(attempt._stamp)
        # A right password clears this name's failures from this source (not elsewhere).
        self._stamps.pop(f"p:{attempt.account}\0{attempt.source}", None)
        self._known[(attempt.account, attempt.source)] = self.clock()

    def _sweep(self, now: float) -> None:
        horizon = max(self.window_s, self.account_window_s)
        self._stamps = {k: v for k, v in self._stamps.items() if v and v[-1] > now - horizon}
        self._known = {k: t for k, t in self._known.items() if t > now - self.known_source_s}

    def note_throttled(self, account: str, source: str) -> int:
        """Count a refused attempt; how many to record now (0: not yet).

        The first refusal of a run is recorded at once, then one record per 20, so
        a flood of refused attempts cannot flood the audit log (or the core's disk).
        A heard attempt ends the run.
        """
        key = (account, source)
        if key not in self.throttled_counts:
            if len(self.throttled_counts) > _MAX_KEYS:
                self.throttled_counts.clear()
            self.throttled_counts[key] = 0
            return 1
        pending = self.throttled_counts[key] + 1
        self.throttled_counts[key] = 0 if pending >= 20 else pending
        return pending if pending >= 20 else 0
