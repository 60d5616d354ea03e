"""Session events as they may leave the controller: codes and numbers, no personal data.

The session registry's events carry whatever the tablet and the audit log need:
sentences for the therapist, a manager's override reason, the client reference.
Telemetry is read far from the clinic, so an event is *shaped* before it is
published, by an allow-list per event kind (:data:`SHAPES`):

* **values** are copied only when listed for the kind; anything new in the
  registry stays home until someone lists it here (a test checks every kind);
* **reason codes**, not sentences: ``code`` comes from an enumerated detail
  (``code``, ``reason``, ``kind``); ``message``, ``remediation`` and ``why`` are
  free text and never leave. Refusal sentences count as free text: several
  embed what the requester typed (an unknown zone id, a pen serial), so they
  stay in the audit log with the rest;
* **the client reference** is replaced by a keyed hash (:class:`Pseudonymizer`,
  HMAC-SHA256 with the clinic's secret), so a clinic can still count one
  client's sessions while nobody outside can recover the code from it;
* **structured values** (the session report's zones) are encoded as complete
  JSON and never cut; a value that would exceed the schema's limit is left out
  and named in ``omitted``, never truncated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from ..config import PSEUDONYM_KEY_MIN_CHARS
from .schema import MAX_VALUE_CHARS, EventKind

Value = int | float | bool | str


class Pseudonymizer:
    """Client references -> stable pseudonyms: ``c-`` + 32 hex digits of HMAC-SHA256.

    The same reference always gives the same pseudonym under one key, so the
    controllers of a clinic must share its key; without the key the reference
    cannot be recovered or confirmed by guessing.
    """

    def __init__(self, key: str) -> None:
        if len(key) < PSEUDONYM_KEY_MIN_CHARS:
            raise ValueError(f"pseudonym_key: needs at least {PSEUDONYM_KEY_MIN_CHARS} characters")
        self._key = key.encode()

    @classmethod
    def configured(cls, key: SecretStr | None, state_dir: Path) -> Pseudonymizer:
        """The clinic's key (setting ``pseudonym_key``), else the one in ``state_dir``."""
        if key is not None:
            return cls(key.get_secret_value())
        return cls.from_file(state_dir / "pseudonym.key")

    @classmethod
    def from_file(cls, path: Path) -> Pseudonymizer:
        """The key in ``path``, generated there (mode 0600) on first use.

        For the local stack and single-controller clinics: every controller of a
        clinic with several must share one key (``pseudonym_key`` setting), or the
        same client gets a different pseudonym on each.
        """
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
        return cls(path.read_text().strip())

    def __call__(self, client_ref: str) -> str:
        digest = hmac.new(self._key, client_ref.encode(), hashlib.sha256).hexdigest()
        return "c-" + digest[:32]


@dataclass(frozen=True, slots=True)
class Shape:
    """What of one event kind's detail may be published."""

    values: tuple[str, ...] = ()  # detail keys copied as values (numbers, codes, ids)
    code_from: tuple[str, ...] = ()  # detail keys whose first present value is the code
    code: str | None = None  # the code when none of code_from is present


@dataclass(frozen=True, slots=True)
class ShapedEvent:
    """An event's publishable parts: zone, reason code and values."""

    zone: str | None
    code: str | None
    values: dict[str, Value]


SHAPES: Mapping[EventKind, Shape] = {
    "session_created": Shape(),
    "state_changed": Shape(values=("previous", "state", "input"), code_from=("input",)),
    "zone_selected": Shape(values=("max_depth_um", "max_passes", "passes_done")),
    "depth_set": Shape(values=("depth_um",)),
    "speed_set": Shape(values=("rate_hz",)),
    "arming": Shape(values=("depth_um", "token", "already")),
    "armed": Shape(values=("lease_ms",)),
    "disarmed": Shape(values=("requested",), code_from=("reason",)),
    "pass_started": Shape(values=("number", "max_passes")),
    "pass_ended": Shape(
        values=("number", "passes_done", "max_passes", "strokes", "peak_depth_um"),
        code_from=("reason",),
    ),
    "zone_completed": Shape(values=("passes_done",)),
    "override_applied": Shape(values=("max_depth_um", "max_passes"), code="manager_override"),
    "stop_sent": Shape(code_from=("reason",)),
    # A refusal by the pen itself has no registry code, only its sentence.
    "refused": Shape(values=("by",), code_from=("code",), code="pen_refused"),
    "fault": Shape(code_from=("kind",)),
    "cartridge_inserted": Shape(values=("cartridge_id", "status"), code_from=("status",)),
    "cartridge_removed": Shape(values=("cartridge_id",)),
    "pen_connected": Shape(values=("serial",)),
    # The link's reason is an error text (it may name device paths): not published.
    "pen_disconnected": Shape(code="link_down"),
    "session_report": Shape(
        values=("state", "passes", "refusals", "started_at", "ended_at", "policy_fingerprint"),
    ),
}

_CODE_CHARS = 64


def shape_event(
    kind: EventKind, detail: Mapping[str, Any], pseudonymize: Callable[[str], str]
) -> ShapedEvent:
    """The publishable parts of one registry event (see the module docstring)."""
    shape = SHAPES[kind]
    values: dict[str, Value] = {}
    for key in shape.values:
        value = detail.get(key)
        if isinstance(value, bool | int | float | str):
            values[key] = value
    code = next(
        (str(detail[k]) for k in shape.code_from if isinstance(detail.get(k), str | int)),
        shape.code,
    )
    zone = detail.get("zone_id")
    if kind == "session_report":
        _report_values(detail, values, pseudonymize)
    return ShapedEvent(
        zone=zone if isinstance(zone, str) else None,
        code=code[:_CODE_CHARS] if code is not None else None,
        values=values,
    )


def _report_values(
    detail: Mapping[str, Any], values: dict[str, Value], pseudonymize: Callable[[str], str]
) -> None:
    client = detail.get("client_ref")
    if isinstance(client, str):
        values["client"] = pseudonymize(client)
    cartridges = detail.get("cartridges")
    if isinstance(cartridges, list):
        values["cartridges"] = len(cartridges)
    zones = detail.get("zones")
    if isinstance(zones, list):
        summary = {
            str(z.get("zone_id")): {
                "passes_done": z.get("passes_done"),
                "max_passes": z.get("max_passes"),
                "max_depth_um": z.get("max_depth_um"),
                "policy_max_depth_um": z.get("policy_max_depth_um"),
                "deepest_setpoint_um": z.get("deepest_setpoint_um"),
                "peak_depth_um": z.get("peak_depth_um"),
                # Who and how much, never why: the reason is the manager's prose.
                "overridden": bool(z.get("override")),
            }
            for z in zones
            if isinstance(z, Mapping)
        }
        encoded = json.dumps(summary, sort_keys=True, separators=(",", ":"))
        if len(encoded) <= MAX_VALUE_CHARS:
            values["zones"] = encoded
        else:
            values["omitted"] = "zones"
