"""Everything the registry knows, and how it is saved: sessions, pens, the cartridge ledger.

The store holds state and answers lookups; it decides nothing. The rules that
change it live in ``enforcement.py``, ``therapist.py``, ``link_events.py`` and
``pen_events.py``.
``to_dict``/``from_dict`` round-trip the whole state exactly; ``to_parts`` is
the slice one input can have changed (what the journal writes after it).
"""

from __future__ import annotations

from typing import Any, Final

from controller.safety.context import SafetyLimits
from controller.safety.rate import RateMeter

from .ledger import CartridgeLedger
from .records import DepartedPen, PenState, Session
from .states import LIVE_STATES

FORMAT_VERSION: Final = 1


class RegistryStore:
    """Sessions by id, pens by port, the ledger, and which session holds each port."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.pens: dict[str, PenState] = {}
        self.ledger = CartridgeLedger()
        #: port -> the session that holds it (at most one live session per port).
        self.live_by_port: dict[str, str] = {}
        self.next_token = 1
        #: Pens that left a port for another pen, by serial (see DepartedPen).
        self.departed: dict[str, DepartedPen] = {}
        #: Measured telemetry rate per port: a measurement, not a record (never journaled).
        self.rates: dict[str, RateMeter] = {}
        #: Each pen's limits (policy narrowed by its Identity): derived, never journaled.
        self.limits: dict[str, SafetyLimits] = {}

    # --- lookups -------------------------------------------------------------------------

    def pen(self, port: str) -> PenState:
        """The pen on ``port`` (a record is made on first mention)."""
        pen = self.pens.get(port)
        if pen is None:
            pen = self.pens[port] = PenState(port=port)
        return pen

    def rate(self, port: str) -> RateMeter:
        """The telemetry rate meter of the pen on ``port``."""
        meter = self.rates.get(port)
        if meter is None:
            meter = self.rates[port] = RateMeter()
        return meter

    def live(self, port: str) -> Session | None:
        """The session holding ``port``, if any."""
        sid = self.live_by_port.get(port)
        return self.sessions[sid] if sid is not None else None

    def take_token(self) -> int:
        """A fresh arming token: u16, never 0, cycling."""
        token = self.next_token
        self.next_token = token % 0xFFFF + 1
        return token

    # --- persistence ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The whole state as plain JSON-able data; :meth:`from_dict` restores it exactly."""
        return {
            "format": FORMAT_VERSION,
            "next_token": self.next_token,
            "departed": {s: d.model_dump(mode="json") for s, d in self.departed.items()},
            "pens": {port: pen.model_dump(mode="json") for port, pen in self.pens.items()},
            "sessions": {
                sid: session.model_dump(mode="json") for sid, session in self.sessions.items()
            },
            "ledger": self.ledger.to_dict(),
        }

    def to_parts(self, session_ids: set[str], ports: set[str]) -> dict[str, Any]:
        """The part of :meth:`to_dict` that one input can have changed.

        Every input concerns one port: a pen event, or an action on a session bound
        to a port. It can change that port's pen, the session live on the port
        before or after it (ENDED is terminal), and the cartridges that session
        used. A journal that stores ``to_parts`` of exactly those after every change
        holds, in total, what ``to_dict()`` would, at the cost of one pen and one
        session per input instead of the clinic's whole history.
        """
        sessions = {sid: self.sessions[sid] for sid in session_ids if sid in self.sessions}
        records = (self.ledger.record(cid) for s in sessions.values() for cid in s.cartridges_used)
        return {
            "format": FORMAT_VERSION,
            "next_token": self.next_token,
            "departed": {s: d.model_dump(mode="json") for s, d in self.departed.items()},
            "pens": {p: self.pens[p].model_dump(mode="json") for p in ports if p in self.pens},
            "sessions": {sid: s.model_dump(mode="json") for sid, s in sessions.items()},
            "ledger": {str(r.cartridge_id): r.model_dump(mode="json") for r in records if r},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegistryStore:
        """Restore exactly what :meth:`to_dict` produced.

        Raises ValueError (pydantic's ValidationError is one) if the data does not fit.
        """
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown registry format {data.get('format')!r}")
        store = cls()
        store.next_token = int(data["next_token"])
        store.departed = {
            serial: DepartedPen.model_validate(d) for serial, d in data.get("departed", {}).items()
        }
        store.pens = {port: PenState.model_validate(pen) for port, pen in data["pens"].items()}
        store.sessions = {sid: Session.model_validate(s) for sid, s in data["sessions"].items()}
        store.ledger = CartridgeLedger.from_dict(data["ledger"])
        for sid, session in store.sessions.items():
            if session.session_id != sid:
                raise ValueError(f"session entry {sid} holds session {session.session_id}")
            if session.state in LIVE_STATES:
                other = store.live_by_port.setdefault(session.port, sid)
                if other != sid:
                    raise ValueError(f"sessions {other} and {sid} both hold port {session.port}")
        return store
