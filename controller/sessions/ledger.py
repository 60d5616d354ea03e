"""The single-use cartridge ledger (product.md §4.5).

What "used" means: a cartridge becomes *used* the moment a pass starts with it
(MotorStarted while it is in the pen): from then on its needles have touched a
client. A used cartridge is bound to that session. It may arm again only in
that same session, and only until the session ends; when the session ends the
cartridge is *spent* and never arms again, anywhere. A cartridge that was
inserted but never ran is not used: it may still serve another client.

The ledger is clinic-wide (shared by every pen of the controller) and grows by
one small record per cartridge used.
"""

from __future__ import annotations

from typing import Any

from controller.safety.context import CartridgeStatus

from .records import CartridgeRecord


class CartridgeLedger:
    def __init__(self, records: dict[int, CartridgeRecord] | None = None) -> None:
        self._records: dict[int, CartridgeRecord] = dict(records or {})

    def status(
        self, cartridge_id: int | None, session_id: str | None, chip_strokes: int | None = None
    ) -> CartridgeStatus:
        """The verdict on ``cartridge_id`` for ``session_id`` (None: no session asks).

        ``chip_strokes``: what the cartridge's own chip says it has done. A cartridge the
        ledger has never seen used, whose chip reports strokes, was used somewhere the
        ledger does not know of (another clinic, a lost record): never for a new client.
        """
        if cartridge_id is None:
            return CartridgeStatus.ABSENT
        record = self._records.get(cartridge_id)
        if record is None:
            return CartridgeStatus.USED_UNKNOWN if chip_strokes else CartridgeStatus.FRESH
        if record.spent_at is not None:
            return CartridgeStatus.SPENT
        if record.session_id == session_id:
            return CartridgeStatus.THIS_SESSION
        return CartridgeStatus.OTHER_SESSION

    def record(self, cartridge_id: int) -> CartridgeRecord | None:
        return self._records.get(cartridge_id)

    def mark_used(self, cartridge_id: int, session_id: str, now: float) -> bool:
        """Bind a fresh cartridge to a session. False if it was already bound (to anyone)."""
        if cartridge_id in self._records:
            return False
        self._records[cartridge_id] = CartridgeRecord(
            cartridge_id=cartridge_id, session_id=session_id, first_used_at=now
        )
        return True

    def spend_session(self, session_id: str, now: float) -> list[int]:
        """The session ended: every cartridge it used is spent. Returns their ids."""
        spent = []
        for cartridge_id, record in self._records.items():
            if record.session_id == session_id and record.spent_at is None:
                record.spent_at = now
                spent.append(cartridge_id)
        return spent

    def to_dict(self) -> dict[str, Any]:
        return {str(cid): r.model_dump(mode="json") for cid, r in sorted(self._records.items())}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CartridgeLedger:
        records = {int(cid): CartridgeRecord.model_validate(r) for cid, r in data.items()}
        for cid, record in records.items():
            if record.cartridge_id != cid:
                raise ValueError(f"ledger entry {cid} holds cartridge {record.cartridge_id}")
        return cls(records)

    def __len__(self) -> int:
        return len(self._records)
