"""The therapist's hand: drives a pen's physical inputs, automatically if asked.

In automatic mode the hand performs realistic passes while the pen is armed:
put the pen on the skin, press the run button, hold it for 1-2 s (sometimes
lifting off for less than the grace time), release, lift the pen, pause, repeat.
If the pen stops by itself in the middle of a pass, the hand notices after a
human reaction time and lets go. All timing is drawn from its own seeded rng.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Protocol


class PenBody(Protocol):
    """What a hand can see and touch on a pen."""

    @property
    def armed(self) -> bool: ...

    @property
    def running(self) -> bool: ...

    @property
    def has_cartridge(self) -> bool: ...

    def press_button(self, now: float) -> None: ...

    def release_button(self, now: float) -> None: ...

    def set_contact(self, on: bool, now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class HandConfig:
    """Timing of automatic passes, in seconds: each value is a (low, high) range."""

    pause: tuple[float, float] = (0.4, 1.2)  # between passes
    approach: tuple[float, float] = (0.05, 0.15)  # skin contact before pressing
    hold: tuple[float, float] = (1.0, 2.0)  # length of a pass
    lift: tuple[float, float] = (0.05, 0.10)  # release to leaving the skin
    wobble_chance: float = 0.2  # chance of a short loss of contact during a pass
    wobble: tuple[float, float] = (0.03, 0.12)  # shorter than the default 300 ms grace
    reaction: tuple[float, float] = (0.15, 0.30)  # noticing that the pen stopped


class _Phase(enum.Enum):
    WAITING = "waiting"  # for the pen to be armed
    PAUSE = "pause"
    APPROACH = "approach"
    HOLD = "hold"
    WOBBLE = "wobble"
    LIFT = "lift"


class Hand:
    """Physical inputs for one pen. Call ``act(now, pen)`` whenever the pen is stepped."""

    def __init__(
        self, rng: random.Random, *, auto: bool = False, config: HandConfig | None = None
    ) -> None:
        self.rng = rng
        self.config = config or HandConfig()
        self.auto = auto
        self.passes = 0  # passes the hand started
        self._phase = _Phase.WAITING
        self._at: float | None = None  # when the next action is due
        self._hold_until = 0.0
        self._reacting = False

    def set_auto(self, auto: bool) -> None:
        """Switch the automatic hand on or off; it starts again from waiting for an arming."""
        self.auto = auto
        self._phase = _Phase.WAITING
        self._at = None
        self._reacting = False

    @property
    def next_action_at(self) -> float | None:
        """When ``act`` must next be called (None: only when the pen changes state)."""
        return self._at if self.auto else None

    def _draw(self, span: tuple[float, float]) -> float:
        return self.rng.uniform(*span)

    def act(self, now: float, pen: PenBody) -> None:
        """Perform whatever the automatic hand is due to do at ``now``."""
        if not self.auto:
            return
        cfg = self.config
        phase = self._phase
        if phase is _Phase.HOLD and not pen.running and not self._reacting:
            # The pen stopped under our thumb (fault, lease, host stop): let go soon.
            self._reacting = True
            self._at = now + self._draw(cfg.reaction)
            self._hold_until = self._at
            return
        if self._at is not None and now < self._at:
            return
        if phase is _Phase.WAITING:
            if pen.armed and pen.has_cartridge:
                self._phase, self._at = _Phase.PAUSE, now + self._draw(cfg.pause)
            else:
                self._at = None  # nothing to do until the pen is armed
        elif phase is _Phase.PAUSE:
            if pen.armed and pen.has_cartridge:
                pen.set_contact(True, now)
                self._phase, self._at = _Phase.APPROACH, now + self._draw(cfg.approach)
            else:
                self._phase, self._at = _Phase.WAITING, None
        elif phase is _Phase.APPROACH:
            if pen.armed:
                pen.press_button(now)
                self.passes += 1
                self._reacting = False
                self._hold_until = now + self._draw(cfg.hold)
                self._phase = _Phase.HOLD
                self._schedule_in_hold(now)
            else:
                self._leave(now, pen)
        elif phase is _Phase.HOLD:
            if now >= self._hold_until:
                pen.release_button(now)
                self._phase, self._at = _Phase.LIFT, now + self._draw(cfg.lift)
            else:  # a wobble is due
                pen.set_contact(False, now)
                self._phase, self._at = _Phase.WOBBLE, now + self._draw(cfg.wobble)
        elif phase is _Phase.WOBBLE:
            pen.set_contact(True, now)
            self._phase = _Phase.HOLD
            self._schedule_in_hold(now)
        elif phase is _Phase.LIFT:
            self._leave(now, pen)

    def _schedule_in_hold(self, now: float) -> None:
        end = self._hold_until
        if self.rng.random() < self.config.wobble_chance and end - now > 0.3:
            self._at = self.rng.uniform(now + 0.1, end - 0.2)
        else:
            self._at = end

    def _leave(self, now: float, pen: PenBody) -> None:
        pen.set_contact(False, now)
        self._phase, self._at = _Phase.WAITING, now
