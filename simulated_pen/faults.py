"""Injectable faults and fault scripts (a list of timed actions, loadable from TOML).

A script file looks like this; ``at`` is seconds after the simulator started,
``pen`` a serial (omit it, or write ``"*"``, for every pen)::

    [[fault]]
    at = 5.0
    pen = "SIM-0001"
    action = "silent"
    duration = 2.0

    [[fault]]
    at = 8.0
    action = "line_noise"      # byte faults on both directions of the link
    drop = 0.01
    corrupt = 0.002
    duplicate = 0.001
    delay = 0.005
    duration = 3.0             # optional: back to a clean line afterwards

    [[fault]]
    at = 10
    action = "depth_overshoot"
    amount_um = 150

    [[fault]]
    at = 12
    action = "drop_renews"     # the next `count` Renew frames to the pen are lost
    count = 2

Unknown actions or keys are an error: a fault script that silently did less than
it says would make a reliability test lie.
"""

from __future__ import annotations

import enum
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class FaultKind(enum.StrEnum):
    """Every fault the simulator can inject."""

    SILENT = "silent"  # neither read nor write for `duration` (the lease still expires)
    REBOOT = "reboot"  # new boot id, new link, unsolicited Identity announcement
    STALL = "stall"  # the motor jams (until it is stopped)
    OVER_CURRENT = "over_current"  # a current surge of `amount` mA (until the motor stops)
    OVER_TEMPERATURE = "over_temperature"  # a heat spike above the trip point; cools naturally
    DEPTH_OVERSHOOT = "depth_overshoot"  # measured depth drifts `amount` um above the setpoint
    CARTRIDGE_PULLED = "cartridge_pulled"
    LOW_BATTERY = "low_battery"  # the battery is suddenly near empty
    LINE_NOISE = "line_noise"  # byte faults on both directions, for `duration` (0: for good)
    DROP_RENEWS = "drop_renews"  # the next `count` Renew frames to the pen are lost
    CLEAR = "clear"  # undo physical faults: cool down, new battery, no overshoot or jam


@dataclass(frozen=True, slots=True)
class LineNoise:
    """Byte-fault probabilities (per byte or per chunk, see channel.py) and delays in seconds."""

    drop: float = 0.0
    corrupt: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"line noise {f.name} must be a finite number >= 0, got {value!r}")
        for name in ("drop", "corrupt", "duplicate", "reorder"):
            if getattr(self, name) > 1:
                raise ValueError(f"line noise {name} is a probability, got {getattr(self, name)}")

    @property
    def is_clean(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault. ``duration`` and ``amount`` mean what FaultKind says;
    an ``amount`` of 0 means the default for the kind (DEFAULT_AMOUNT).
    """

    kind: FaultKind
    duration: float = 0.0  # seconds
    amount: float = 0.0  # um for DEPTH_OVERSHOOT, mA for OVER_CURRENT, frames for DROP_RENEWS
    noise: LineNoise | None = None

    @property
    def effective_amount(self) -> float:
        return self.amount or DEFAULT_AMOUNT.get(self.kind, 0.0)


@dataclass(frozen=True, slots=True)
class ScriptEntry:
    """A fault to inject ``at`` seconds after the start, into ``pen`` (None: every pen)."""

    at: float
    fault: Fault
    pen: str | None = None

    def applies_to(self, serial: str) -> bool:
        return self.pen is None or self.pen == serial


#: What a fault with amount 0 injects: the overshoot in um, the current surge in mA
#: (enough to trip the default 1500 mA limit even with the motor idling).
DEFAULT_AMOUNT = {
    FaultKind.DEPTH_OVERSHOOT: 200.0,
    FaultKind.OVER_CURRENT: 1500.0,
    FaultKind.DROP_RENEWS: 1.0,
}
_NOISE_KEYS = frozenset(f.name for f in fields(LineNoise))
_COMMON_KEYS = frozenset({"at", "pen", "action"})
_ALLOWED: dict[FaultKind, frozenset[str]] = {
    FaultKind.SILENT: frozenset({"duration"}),
    FaultKind.LINE_NOISE: _NOISE_KEYS | {"duration"},
    FaultKind.DEPTH_OVERSHOOT: frozenset({"amount_um"}),
    FaultKind.OVER_CURRENT: frozenset({"amount_ma"}),
    FaultKind.DROP_RENEWS: frozenset({"count"}),
}


def _number(entry: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: {key} must be >= 0, got {value!r}")
    return float(value)


def parse_entry(entry: Mapping[str, Any], where: str = "fault") -> ScriptEntry:
    """Build one ScriptEntry from a mapping (one ``[[fault]]`` table). ValueError if invalid."""
    action = entry.get("action")
    try:
        kind = FaultKind(str(action))
    except ValueError:
        known = ", ".join(k.value for k in FaultKind)
        raise ValueError(f"{where}: unknown action {action!r} (known: {known})") from None
    unknown = set(entry) - _COMMON_KEYS - _ALLOWED.get(kind, frozenset())
    if unknown:
        raise ValueError(f"{where}: keys {sorted(unknown)} do not apply to action {kind.value!r}")
    if "at" not in entry:
        raise ValueError(f"{where}: missing 'at' (seconds after start)")
    at = _number(entry, "at", 0.0, where)
    pen = entry.get("pen")
    if pen == "*":
        pen = None
    if pen is not None and not isinstance(pen, str):
        raise ValueError(f"{where}: pen must be a serial string, got {pen!r}")
    duration = _number(entry, "duration", 0.0, where)
    if kind is FaultKind.SILENT and duration <= 0:
        raise ValueError(f"{where}: silent needs a duration > 0")
    amount = DEFAULT_AMOUNT.get(kind, 0.0)
    if kind is FaultKind.DEPTH_OVERSHOOT:
        amount = _number(entry, "amount_um", amount, where)
    elif kind is FaultKind.OVER_CURRENT:
        amount = _number(entry, "amount_ma", amount, where)
    elif kind is FaultKind.DROP_RENEWS:
        amount = _number(entry, "count", amount, where)
        if amount != int(amount):
            raise ValueError(f"{where}: count must be a whole number of frames, got {amount}")
    noise = None
    if kind is FaultKind.LINE_NOISE:
        params = {k: _number(entry, k, 0.0, where) for k in _NOISE_KEYS if k in entry}
        noise = LineNoise(**params)
    return ScriptEntry(at, Fault(kind, duration, amount, noise), pen)


def parse_script(document: Mapping[str, Any]) -> list[ScriptEntry]:
    """Entries of a parsed TOML document (its ``fault`` array), sorted by time."""
    unknown = set(document) - {"fault"}
    if unknown:
        raise ValueError(f"fault script: unknown top-level keys {sorted(unknown)}")
    raw = document.get("fault", [])
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ValueError("fault script: 'fault' must be an array of tables ([[fault]])")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ValueError(f"fault #{i + 1}: not a table")
        entries.append(parse_entry(item, f"fault #{i + 1}"))
    entries.sort(key=lambda e: e.at)  # stable: same-time entries keep file order
    return entries


def load_script(path: str | Path) -> list[ScriptEntry]:
    """Read a TOML fault script. OSError or ValueError (with the file name) if unusable."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_script(document)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
