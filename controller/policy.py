"""The treatment policy: zones, their limits and treatment plans, from a TOML file.

The file is written for humans, in millimetres; everything inside the controller
works in integer micrometres (product.md §3). The conversion is exact: the file
is parsed with ``Decimal`` floats and a value that is not a whole number of
micrometres (``0.7505``) is refused rather than rounded.

Validation is pydantic v2 and fails closed (product.md §4.1): an unknown key, a
missing key, a depth above the device ceiling or a plan naming an unknown zone
all refuse to load, and :class:`PolicyError` lists every bad key at once, each
as a dotted path (``zones.cheeks.max_depth_mm: 3.0 exceeds the device ceiling
2.5 mm``).

Public interface:

* :func:`load_policy` ``(path | None) -> TreatmentPolicy``; ``None`` loads the
  packaged ``default_policy.toml`` (the §4 table).
* :func:`policy_from_mapping` for a policy already parsed (an API, a test).
* :class:`TreatmentPolicy`, :class:`ZoneLimits`, :class:`Plan`: frozen, in µm.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from controller.contract import DEVICE_CEILING_UM, DEVICE_MAX_SPEED_HZ, DEVICE_MIN_SPEED_HZ

_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_UM_PER_MM = Decimal(1000)


class PolicyError(ValueError):
    """The policy cannot be used. ``problems`` holds one ``key: why`` line per bad key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} policy error(s); the controller will not start"]
        lines += [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


# --- the domain objects the rest of the controller uses ------------------------------


@dataclass(frozen=True, slots=True)
class ZoneLimits:
    """One zone's limits, in micrometres. ``puncture_budget`` is strokes per pass."""

    zone_id: str
    label: str
    max_depth_um: int
    max_passes: int
    puncture_budget: int | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """A named set of zones a session may treat, in the order the tablet shows them."""

    plan_id: str
    label: str
    zone_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TreatmentPolicy:
    """A validated policy. Every depth is in µm; build one with :func:`load_policy`."""

    device_ceiling_um: int
    depth_tolerance_um: int
    lift_off_grace_ms: int
    max_lease_ms: int
    min_speed_hz: int
    max_speed_hz: int
    telemetry_rate_hz: int
    #: Fewer samples per second than this (measured) and the pen is not armed, or a
    #: running pass is stopped: the monitor could not see an overshoot in time.
    min_telemetry_rate_hz: int
    max_passes_ceiling: int
    zones: Mapping[str, ZoneLimits]
    plans: Mapping[str, Plan]
    source: str = "<mapping>"
    #: SHA-256 over the canonical content (not the file bytes): recorded with each
    #: session so a report says exactly which limits applied.
    fingerprint: str = field(default="", compare=False)

    def zone(self, zone_id: str) -> ZoneLimits | None:
        return self.zones.get(zone_id)

    def plan(self, plan_id: str) -> Plan | None:
        return self.plans.get(plan_id)


# --- the file schema (millimetres, as humans write it) ------------------------------


def _as_decimal(value: object) -> Decimal:
    # bool is an int subclass; `true` is never a depth.
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise PydanticCustomError("mm_type", "must be a number of millimetres, like 0.75")
    try:
        # str(float) is the shortest repr, so 0.75 (float) becomes Decimal("0.75") exactly.
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation as exc:  # pragma: no cover - str(float) is always valid
        raise PydanticCustomError("mm_type", "must be a number of millimetres") from exc
    if not number.is_finite():
        raise PydanticCustomError("mm_type", "must be a finite number of millimetres")
    if (number * _UM_PER_MM) % 1 != 0:
        raise PydanticCustomError(
            "mm_precision",
            "{value} mm is not a whole number of micrometres (use at most 3 decimals)",
            {"value": str(value)},
        )
    return number


#: Millimetres in the file, kept as an exact Decimal until converted to µm.
Millimetres = Annotated[Decimal, BeforeValidator(_as_decimal)]


def _um(mm: Decimal) -> int:
    return int(mm * _UM_PER_MM)


def _mm_text(um: int) -> str:
    return f"{Decimal(um) / _UM_PER_MM:f}"


def _check_id(value: str) -> str:
    if not _ID_PATTERN.match(value):
        raise PydanticCustomError(
            "bad_id",
            "'{value}' is not a valid name: use lower-case letters, digits and underscores, "
            "starting with a letter (e.g. acne_scars)",
            {"value": value},
        )
    return value


Identifier = Annotated[str, BeforeValidator(lambda v: _check_id(v) if isinstance(v, str) else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class _ZoneFile(_Strict):
    label: str | None = Field(default=None, min_length=1, max_length=80)
    max_depth_mm: Millimetres
    max_passes: StrictInt = Field(ge=1)
    puncture_budget: StrictInt | None = Field(default=None, ge=1, le=1_000_000)

    @field_validator("max_depth_mm")
    @classmethod
    def _depth_within_ceiling(cls, value: Decimal, info: ValidationInfo) -> Decimal:
        ceiling_um = _context_int(info, "ceiling_um", DEVICE_CEILING_UM)
        if value <= 0:
            raise PydanticCustomError("depth_not_positive", "must be more than 0 mm")
        if _um(value) > ceiling_um:
            raise PydanticCustomError(
                "depth_above_ceiling",
                "{value} exceeds the device ceiling {ceiling} mm",
                {"value": str(value), "ceiling": _mm_text(ceiling_um)},
            )
        return value

    @field_validator("max_passes")
    @classmethod
    def _passes_within_ceiling(cls, value: int, info: ValidationInfo) -> int:
        ceiling = _context_int(info, "max_passes_ceiling", 1_000)
        if value > ceiling:
            raise PydanticCustomError(
                "passes_above_ceiling",
                "{value} exceeds max_passes_ceiling ({ceiling})",
                {"value": value, "ceiling": ceiling},
            )
        return value


class _PlanFile(_Strict):
    label: str | None = Field(default=None, min_length=1, max_length=80)
    zones: list[str] = Field(min_length=1)

    @field_validator("zones")
    @classmethod
    def _zones_exist(cls, value: list[str], info: ValidationInfo) -> list[str]:
        known = (info.context or {}).get("zone_ids")
        seen: set[str] = set()
        for zone_id in value:
            if isinstance(known, frozenset) and zone_id not in known:
                raise PydanticCustomError(
                    "unknown_zone",
                    "'{zone}' is not a zone defined under [zones]",
                    {"zone": zone_id},
                )
            if zone_id in seen:
                raise PydanticCustomError(
                    "duplicate_zone", "'{zone}' is listed twice", {"zone": zone_id}
                )
            seen.add(zone_id)
        return value


class _PolicyFile(_Strict):
    policy_version: Literal[1]
    device_ceiling_mm: Millimetres = Decimal("2.5")
    depth_tolerance_mm: Millimetres = Decimal("0.05")
    lift_off_grace_ms: StrictInt = Field(default=300, ge=0, le=2000)
    max_lease_ms: StrictInt = Field(default=500, ge=50, le=2000)
    min_speed_hz: StrictInt = Field(default=50, ge=DEVICE_MIN_SPEED_HZ, le=DEVICE_MAX_SPEED_HZ)
    max_speed_hz: StrictInt = Field(default=150, ge=DEVICE_MIN_SPEED_HZ, le=DEVICE_MAX_SPEED_HZ)
    telemetry_rate_hz: StrictInt = Field(default=100, ge=20, le=1000)
    min_telemetry_rate_hz: StrictInt = Field(default=50, ge=10, le=1000)
    max_passes_ceiling: StrictInt = Field(default=8, ge=1, le=100)
    zones: dict[Identifier, _ZoneFile] = Field(min_length=1)
    plans: dict[Identifier, _PlanFile] = Field(min_length=1)

    @field_validator("device_ceiling_mm")
    @classmethod
    def _ceiling_within_device(cls, value: Decimal) -> Decimal:
        if value <= 0 or _um(value) > DEVICE_CEILING_UM:
            raise PydanticCustomError(
                "ceiling_range",
                "{value} must be more than 0 and at most the pen's {device} mm",
                {"value": str(value), "device": _mm_text(DEVICE_CEILING_UM)},
            )
        return value

    @field_validator("depth_tolerance_mm")
    @classmethod
    def _tolerance_range(cls, value: Decimal) -> Decimal:
        if value < 0 or value > Decimal("0.5"):
            raise PydanticCustomError(
                "tolerance_range", "{value} must be between 0 and 0.5 mm", {"value": str(value)}
            )
        return value

    @field_validator("min_telemetry_rate_hz")
    @classmethod
    def _rate_order(cls, value: int, info: ValidationInfo) -> int:
        asked = info.data.get("telemetry_rate_hz")
        if isinstance(asked, int) and value > asked:
            raise PydanticCustomError(
                "rate_order",
                "{value} is above telemetry_rate_hz ({asked}): no pen could ever be armed",
                {"value": value, "asked": asked},
            )
        return value

    @field_validator("max_speed_hz")
    @classmethod
    def _speed_order(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_speed_hz")
        if isinstance(low, int) and value < low:
            raise PydanticCustomError(
                "speed_order", "{value} is below min_speed_hz ({low})", {"value": value, "low": low}
            )
        return value


def _context_int(info: ValidationInfo, key: str, default: int) -> int:
    value = (info.context or {}).get(key, default)
    return value if isinstance(value, int) else default


def _context_from_raw(data: Mapping[str, Any]) -> dict[str, Any]:
    """Cross-key facts for validators, read leniently from the raw data.

    Zone depths are checked against the file's own ceiling, and plans against
    its zone names, in the same single validation pass, so one run reports
    every bad key. If the ceiling itself is bad it is reported on its own key and
    the zones are checked against the pen's absolute maximum instead.
    """
    ceiling_um = DEVICE_CEILING_UM
    raw_ceiling = data.get("device_ceiling_mm", Decimal("2.5"))
    try:
        candidate = _um(_as_decimal(raw_ceiling))
        if 0 < candidate <= DEVICE_CEILING_UM:
            ceiling_um = candidate
    except PydanticCustomError:
        pass
    passes_ceiling = data.get("max_passes_ceiling", 8)
    if isinstance(passes_ceiling, bool) or not isinstance(passes_ceiling, int):
        passes_ceiling = 1_000
    zones = data.get("zones")
    # Without a zones table there is nothing to check plans against (reported on "zones").
    zone_ids = frozenset(zones) if isinstance(zones, Mapping) else None
    return {"ceiling_um": ceiling_um, "max_passes_ceiling": passes_ceiling, "zone_ids": zone_ids}


_FRIENDLY = {
    "extra_forbidden": "unknown key (check the spelling; unknown keys are refused)",
    "missing": "required key is missing",
    "literal_error": "must be 1 (the only policy version this controller understands)",
}


def _describe(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        parts: list[str] = []
        for part in err["loc"]:
            if part == "[key]":
                continue  # the bad part is the key itself, already the last name
            parts.append(f"[{part}]" if isinstance(part, int) else str(part))
        key = ".".join(parts).replace(".[", "[") or "(top level)"
        ctx = err.get("ctx") or {}
        if err["type"] == "greater_than_equal":
            message = f"must be at least {ctx['ge']}"
        elif err["type"] == "less_than_equal":
            message = f"must be at most {ctx['le']}"
        elif err["type"] in ("int_type", "int_parsing", "int_from_float"):
            message = "must be a whole number"
        else:
            message = _FRIENDLY.get(err["type"], err["msg"])
        problems.append(f"{key}: {message}")
    return problems


def policy_from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> TreatmentPolicy:
    """Validate an already-parsed policy (mm, as in the file). PolicyError if bad."""
    try:
        parsed = _PolicyFile.model_validate(data, context=_context_from_raw(data))
    except ValidationError as exc:
        raise PolicyError(source, _describe(exc)) from exc
    return _build(parsed, source)


def load_policy(path: Path | str | None = None) -> TreatmentPolicy:
    """Load and validate a policy file; ``None`` loads the packaged default (§4 table).

    Raises PolicyError naming every bad key, or the file/TOML problem.
    """
    if path is None:
        source = "default_policy.toml"
        text = resources.files("controller").joinpath("default_policy.toml").read_text("utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise PolicyError(source, [f"cannot read the policy file: {exc.strerror}"]) from exc
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, [f"not valid TOML: {exc}"]) from exc
    return policy_from_mapping(data, source)


def _build(parsed: _PolicyFile, source: str) -> TreatmentPolicy:
    zones = {
        zone_id: ZoneLimits(
            zone_id=zone_id,
            label=spec.label or zone_id.replace("_", " "),
            max_depth_um=_um(spec.max_depth_mm),
            max_passes=spec.max_passes,
            puncture_budget=spec.puncture_budget,
        )
        for zone_id, spec in parsed.zones.items()
    }
    plans = {
        plan_id: Plan(plan_id, spec.label or plan_id.replace("_", " "), tuple(spec.zones))
        for plan_id, spec in parsed.plans.items()
    }
    policy = TreatmentPolicy(
        device_ceiling_um=_um(parsed.device_ceiling_mm),
        depth_tolerance_um=_um(parsed.depth_tolerance_mm),
        lift_off_grace_ms=parsed.lift_off_grace_ms,
        max_lease_ms=parsed.max_lease_ms,
        min_speed_hz=parsed.min_speed_hz,
        max_speed_hz=parsed.max_speed_hz,
        telemetry_rate_hz=parsed.telemetry_rate_hz,
        min_telemetry_rate_hz=parsed.min_telemetry_rate_hz,
        max_passes_ceiling=parsed.max_passes_ceiling,
        zones=MappingProxyType(zones),
        plans=MappingProxyType(plans),
        source=source,
    )
    return _with_fingerprint(policy)


def policy_as_dict(policy: TreatmentPolicy) -> dict[str, Any]:
    """The policy's content in µm, as plain JSON-able data (for reports and the API)."""
    return {
        "device_ceiling_um": policy.device_ceiling_um,
        "depth_tolerance_um": policy.depth_tolerance_um,
        "lift_off_grace_ms": policy.lift_off_grace_ms,
        "max_lease_ms": policy.max_lease_ms,
        "min_speed_hz": policy.min_speed_hz,
        "max_speed_hz": policy.max_speed_hz,
        "telemetry_rate_hz": policy.telemetry_rate_hz,
        "min_telemetry_rate_hz": policy.min_telemetry_rate_hz,
        "max_passes_ceiling": policy.max_passes_ceiling,
        "zones": {
            z.zone_id: {
                "label": z.label,
                "max_depth_um": z.max_depth_um,
                "max_passes": z.max_passes,
                "puncture_budget": z.puncture_budget,
            }
            for z in policy.zones.values()
        },
        "plans": {
            p.plan_id: {"label": p.label, "zones": list(p.zone_ids)} for p in policy.plans.values()
        },
    }


def policy_from_dict(data: Mapping[str, Any], fingerprint: str) -> TreatmentPolicy:
    """The policy :func:`policy_as_dict` described, as the core announced it to the edge.

    ValueError if it does not rebuild to the same ``fingerprint``: the edge then shows no
    limits it is not sure of.
    """
    try:
        zones = {
            zid: ZoneLimits(
                zid,
                str(z["label"]),
                int(z["max_depth_um"]),
                int(z["max_passes"]),
                None if z["puncture_budget"] is None else int(z["puncture_budget"]),
            )
            for zid, z in data["zones"].items()
        }
        plans = {
            pid: Plan(pid, str(p["label"]), tuple(str(z) for z in p["zones"]))
            for pid, p in data["plans"].items()
        }
        policy = _with_fingerprint(
            TreatmentPolicy(
                device_ceiling_um=int(data["device_ceiling_um"]),
                depth_tolerance_um=int(data["depth_tolerance_um"]),
                lift_off_grace_ms=int(data["lift_off_grace_ms"]),
                max_lease_ms=int(data["max_lease_ms"]),
                min_speed_hz=int(data["min_speed_hz"]),
                max_speed_hz=int(data["max_speed_hz"]),
                telemetry_rate_hz=int(data["telemetry_rate_hz"]),
                min_telemetry_rate_hz=int(data["min_telemetry_rate_hz"]),
                max_passes_ceiling=int(data["max_passes_ceiling"]),
                zones=MappingProxyType(zones),
                plans=MappingProxyType(plans),
                source="controller",
            )
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a policy: {exc!r}") from exc
    if policy.fingerprint != fingerprint:
        raise ValueError("the policy did not rebuild to the core's fingerprint")
    return policy


def _with_fingerprint(policy: TreatmentPolicy) -> TreatmentPolicy:
    canonical = json.dumps(policy_as_dict(policy), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return TreatmentPolicy(
        **{
            name: getattr(policy, name)
            for name in TreatmentPolicy.__dataclass_fields__
            if name != "fingerprint"
        },
        fingerprint=digest,
    )
