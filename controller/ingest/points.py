"""MQTT payloads -> InfluxDB line protocol: the one place the database schema lives.

docs/INFLUX_SCHEMA.md describes the result for dashboard authors; this module is
the implementation, and the two must change together.

Rules that keep the database healthy for years of a clinic chain:

* Tags only for small, bounded sets that dashboards group by: clinic, device,
  event kind, zone (the clinic's zone table), therapist (the clinic's staff) and
  reason code. Unbounded ids (session, client, cartridge, plan revision, ...)
  are fields, so the number of series does not grow with every session.
* Every timestamp comes from the payload, so a redelivered message rewrites the
  very same points (same measurement, tag set and time): writes are idempotent.
* A field keeps one type forever (InfluxDB rejects a conflicting type for the
  life of a shard): event values that are numbers are always floats, values
  that name things (``cartridge``, ``*_id``) are always strings.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from firmware_protocol.messages import TelemetryFlag

from ..audit import PublishedHead
from ..influx import FieldValue, format_line
from ..telemetry.schema import (
    DEFAULT_ROOT,
    SAMPLE_FIELDS,
    ControllerStatus,
    DeviceStatus,
    EventRecord,
    TelemetryBatch,
    TelemetryBundle,
    parse_topic,
)

# Measurements (see docs/INFLUX_SCHEMA.md).
TELEMETRY: Final = "telemetry"
TELEMETRY_BATCHES: Final = "telemetry_batches"
EVENTS: Final = "events"
SESSIONS: Final = "sessions"
ZONES: Final = "zones"
SAFETY: Final = "safety"
CARTRIDGES: Final = "cartridges"
DEVICE_STATUS: Final = "device_status"
CONTROLLER_STATUS: Final = "controller_status"
AUDIT_HEAD: Final = "audit_head"

MEASUREMENTS: Final = (
    TELEMETRY,
    TELEMETRY_BATCHES,
    EVENTS,
    SESSIONS,
    ZONES,
    SAFETY,
    CARTRIDGES,
    DEVICE_STATUS,
    CONTROLLER_STATUS,
    AUDIT_HEAD,
)

# The session registry's event kinds (controller.sessions.EventKind) that feed the
# session and safety measurements. A state change carries ``state`` (e.g.
# "interrupted", "faulted") among its values.
SESSION_KINDS: Final = frozenset({"session_created", "session_report", "state_changed"})
SAFETY_KINDS: Final = frozenset({"refused", "stop_sent", "override_applied", "fault"})
# The kinds that go to ``zones`` (with the zone as a tag) when they name a zone: what
# happens in a zone. Others (arming's lease, a cartridge) stay in ``events`` only, so
# the series per pen stay (this many) x (zones in the clinic's table).
ZONE_KINDS: Final = frozenset(
    {
        "zone_selected",
        "depth_set",
        "arming",
        "pass_started",
        "pass_ended",
        "zone_completed",
        "override_applied",
        "refused",
        "stop_sent",
        "fault",
    }
)
# The fixed fields of an event point; a value with one of these names gets a prefix.
_EVENT_FIELDS: Final = frozenset(
    {"seq", "session", "therapist", "plan", "zone", "code", "message", "depth_ratio"}
)

_M = TypeVar("_M", bound=BaseModel)

MalformedReason = Literal["bad_json", "schema", "unknown_topic", "topic_mismatch"]


class MalformedMessage(ValueError):  # noqa: N818 - a verdict on data, not a bug
    """A message that can never become points; it goes to the dead letters."""

    def __init__(self, reason: MalformedReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: MalformedReason = reason
        self.detail = detail


#: (device, stream, seq): one numbered entry a controller waits to see acknowledged.
AckKey = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class Points:
    """The line-protocol lines of one MQTT message and what writing them settles.

    ``controller`` (clinic, controller id) is whom ``keys`` are acknowledged to once
    the lines are written (None: nobody waits); ``offline`` is set for a controller's
    offline status or last will, whose pens ingest then marks offline too.
    """

    lines: list[str]
    newest_ts_ns: int
    controller: tuple[str, str] | None = None
    keys: tuple[AckKey, ...] = ()
    offline: ControllerStatus | None = None


def message_points(topic: str, payload: bytes, root: str = DEFAULT_ROOT) -> Points:
    """Points of one device or bundle message; MalformedMessage if it cannot be ingested."""
    parsed = parse_topic(topic, root)
    if parsed is None:
        raise MalformedMessage(
            "unknown_topic", f"not a device or controller topic under {root}/: {topic!r}"
        )
    clinic, kind, ident, stream = parsed
    model: (
        type[TelemetryBatch]
        | type[EventRecord]
        | type[DeviceStatus]
        | type[TelemetryBundle]
        | type[ControllerStatus]
    )
    if kind == "controller" and stream == "telemetry":
        model = TelemetryBundle
    elif kind == "controller" and stream == "status":
        model = ControllerStatus
    elif kind == "controller" and stream == AUDIT_HEAD_STREAM:
        return Points(audit_head_lines(clinic, ident, payload), 0)
    elif kind == "controller":
        raise MalformedMessage("unknown_topic", f"unknown controller stream in {topic!r}")
    elif stream == "telemetry":
        model = TelemetryBatch
    elif stream == "events":
        model = EventRecord
    elif stream == "status":
        model = DeviceStatus
    else:
        raise MalformedMessage("unknown_topic", f"unknown stream {stream!r} in {topic!r}")
    record = _validate(model, payload)
    # Tags come from the payload; a topic that disagrees is a producer bug (or a
    # forged message) and must not file points under someone else's device.
    if isinstance(record, TelemetryBundle):
        if (record.clinic, record.controller) != (clinic, ident):  # batches: see schema
            raise MalformedMessage(
                "topic_mismatch",
                f"bundle is {record.clinic}/{record.controller}, topic says {clinic}/{ident}",
            )
        lines = [line for batch in record.batches for line in telemetry_lines(batch)]
        newest = max(batch.samples[-1][0] for batch in record.batches)
        keys = tuple((b.device, "telemetry", b.seq) for b in record.batches)
        return Points(lines, newest, (clinic, ident), keys)
    if isinstance(record, ControllerStatus):
        if (record.clinic, record.controller) != (clinic, ident):
            raise MalformedMessage(
                "topic_mismatch",
                f"status is {record.clinic}/{record.controller}, topic says {clinic}/{ident}",
            )
        lines = controller_status_lines(record)
        return Points(lines, record.ts_ns, offline=None if record.online else record)
    if (record.clinic, record.device) != (clinic, ident):
        raise MalformedMessage(
            "topic_mismatch",
            f"payload is {record.clinic}/{record.device}, topic says {clinic}/{ident}",
        )
    if isinstance(record, TelemetryBatch):
        return Points(telemetry_lines(record), max(row[0] for row in record.samples))
    if isinstance(record, EventRecord):
        if record.controller is None:
            return Points(event_lines(record), record.ts_ns)
        key = (record.device, "events", record.seq)
        return Points(event_lines(record), record.ts_ns, (clinic, record.controller), (key,))
    return Points(status_lines(record), record.ts_ns)


def _validate(model: type[_M], payload: bytes) -> _M:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise MalformedMessage("bad_json", str(errors[0]["msg"])) from None
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(payload)'}: {e['msg']}" for e in errors[:5]
        )
        raise MalformedMessage("schema", detail) from None


# --- telemetry ---------------------------------------------------------------------

_TS, _DEVICE_MS, _DEPTH_SET, _DEPTH, _SPEED, _CURRENT, _TEMP, _BATTERY, _STROKES, _FLAGS = range(
    len(SAMPLE_FIELDS)
)
_ARMED = int(TelemetryFlag.ARMED)
_RUNNING = int(TelemetryFlag.MOTOR_RUNNING)
_CONTACT = int(TelemetryFlag.SKIN_CONTACT)
assert _ARMED | _RUNNING | _CONTACT == 7, "telemetry_lines indexes _FLAGS_TEXT by flags & 7"
_FLAGS_TEXT: Final = tuple(
    f"armed={'true' if f & _ARMED else 'false'},"
    f"motor_running={'true' if f & _RUNNING else 'false'},"
    f"skin_contact={'true' if f & _CONTACT else 'false'}"
    for f in range(8)
)
# Text of temperatures (centi-degrees) and battery voltages (mV) seen so far.
_TEXT_CACHE: Final = 10_000
_TEMPERATURES: dict[int, str] = {}
_VOLTAGES: dict[int, str] = {}


def telemetry_lines(batch: TelemetryBatch) -> list[str]:
    """One ``telemetry`` point per sample plus one ``telemetry_batches`` point.

    This is the hot path (100 samples/s per pen), so the lines are assembled
    directly; tests prove them equal to :func:`controller.influx.format_line`.
    """
    tags = _tags({"clinic": batch.clinic, "device": batch.device})
    head = f"{TELEMETRY},{tags} "
    context = ""
    if batch.session is not None:
        context += f",session={_string(batch.session)}"
    if batch.zone is not None:
        context += f",zone={_string(batch.zone)}"
    # Unpacking a row and looking its flag and float texts up (they repeat from sample
    # to sample) costs a third of formatting each value in place: ingest shares two
    # cores with InfluxDB, so its CPU per point decides the ingest ratio.
    flags_text, temps, volts = _FLAGS_TEXT, _TEMPERATURES, _VOLTAGES
    lines = []
    for (
        ts,
        device_ms,
        depth_set,
        depth,
        speed,
        current,
        temp,
        battery,
        strokes,
        flags,
    ) in batch.samples:
        t = temps.get(temp)
        if t is None:
            if len(temps) > _TEXT_CACHE:
                temps.clear()
            t = temps[temp] = repr(temp / 100)
        v = volts.get(battery)
        if v is None:
            if len(volts) > _TEXT_CACHE:
                volts.clear()
            v = volts[battery] = repr(battery / 1000)
        lines.append(
            f"{head}device_ms={device_ms}i,depth_set_um={depth_set}i,depth_um={depth}i,"
            f"speed_hz={speed}i,current_ma={current}i,temperature_c={t},battery_v={v},"
            f"strokes={strokes}i,flags={flags}i,{flags_text[flags & 7]}{context} {ts}"
        )
    first, last = batch.samples[0], batch.samples[-1]
    lines.append(
        f"{TELEMETRY_BATCHES},{tags} seq={batch.seq}i,samples={len(batch.samples)}i,"
        f"last_ts_ns={last[_TS]}i{context} {first[_TS]}"
    )
    return lines


def telemetry_fields(row: list[int]) -> dict[str, FieldValue]:
    """The fields of one sample row, in the order :func:`telemetry_lines` writes them."""
    flags = row[_FLAGS]
    return {
        "device_ms": row[_DEVICE_MS],
        "depth_set_um": row[_DEPTH_SET],
        "depth_um": row[_DEPTH],
        "speed_hz": row[_SPEED],
        "current_ma": row[_CURRENT],
        "temperature_c": row[_TEMP] / 100,
        "battery_v": row[_BATTERY] / 1000,
        "strokes": row[_STROKES],
        "flags": flags,
        "armed": bool(flags & _ARMED),
        "motor_running": bool(flags & _RUNNING),
        "skin_contact": bool(flags & _CONTACT),
    }


# --- events ------------------------------------------------------------------------


def event_lines(event: EventRecord) -> list[str]:
    """The ``events`` point of every event and the dashboard measurements it feeds."""
    base = {"clinic": event.clinic, "device": event.device}
    values = event_values(event.values)
    context: dict[str, FieldValue] = {}
    for name in ("session", "therapist", "plan", "zone", "code", "message"):
        _put(context, name, getattr(event, name))
    ratio = _depth_ratio(values)
    if ratio is not None:
        values["depth_ratio"] = ratio

    ts = event.ts_ns
    event_fields: dict[str, FieldValue] = {"seq": event.seq, **context, **values}
    lines = [format_line(EVENTS, {**base, "kind": event.kind}, event_fields, ts)]
    if event.kind in SESSION_KINDS:
        lines.append(
            format_line(
                SESSIONS,
                {**base, "kind": event.kind, "therapist": event.therapist or ""},
                {"seq": event.seq, **_without(context, "therapist"), **values},
                ts,
            )
        )
    if event.zone is not None and event.kind in ZONE_KINDS:
        lines.append(
            format_line(
                ZONES,
                {**base, "kind": event.kind, "zone": event.zone},
                {"seq": event.seq, **_without(context, "zone"), **values},
                ts,
            )
        )
    if event.kind in SAFETY_KINDS:
        lines.append(
            format_line(
                SAFETY,
                {**base, "kind": event.kind, "code": event.code or ""},
                {"seq": event.seq, **_without(context, "code"), **values},
                ts,
            )
        )
    if "cartridge" in values:
        fields: dict[str, FieldValue] = {"seq": event.seq, **values}
        _put(fields, "session", event.session)
        lines.append(format_line(CARTRIDGES, {**base, "kind": event.kind}, fields, ts))
    return lines


def event_values(values: Mapping[str, int | float | bool | str]) -> dict[str, FieldValue]:
    """An event's ``values`` as fields of stable type (see the module docstring)."""
    out: dict[str, FieldValue] = {}
    for key, value in values.items():
        name = f"v_{key}" if key in _EVENT_FIELDS else key
        if key == "cartridge" or key.endswith("_id"):
            out[name] = value if isinstance(value, str) else str(value)
        elif isinstance(value, bool | str):
            out[name] = value
        else:
            out[name] = float(value)
    return out


def _depth_ratio(values: Mapping[str, FieldValue]) -> float | None:
    """depth_um / limit_um when an event carries both: 'depth used against the limit'."""
    depth, limit = values.get("depth_um"), values.get("limit_um")
    if isinstance(depth, float) and isinstance(limit, float) and limit > 0:
        return depth / limit
    return None


# --- status ------------------------------------------------------------------------


def status_lines(status: DeviceStatus) -> list[str]:
    """A ``device_status`` point per retained status message (online, state, link)."""
    fields: dict[str, FieldValue] = {"online": status.online, "state": status.state}
    _put(fields, "firmware", status.firmware)
    _put(fields, "session", status.session)
    _put(fields, "controller", status.controller)
    for key, value in status.link.items():
        fields[f"link_{key}"] = float(value)
    return [
        format_line(
            DEVICE_STATUS, {"clinic": status.clinic, "device": status.device}, fields, status.ts_ns
        )
    ]


def controller_status_lines(status: ControllerStatus) -> list[str]:
    """A ``controller_status`` point per controller status message (or last will).

    The will is made when the controller connects and carries no time of its own
    (``ts_ns`` 0): it is filed under the time ingest reads it.
    """
    ts = status.ts_ns or time.time_ns()
    return [
        format_line(
            CONTROLLER_STATUS,
            {"clinic": status.clinic, "controller": status.controller},
            {"online": status.online},
            ts,
        )
    ]


#: The topic stream the audit anchor publishes on (controller/audit_anchor.py).
AUDIT_HEAD_STREAM: Final = "audit-head"


def audit_head_lines(clinic: str, controller: str, payload: bytes) -> list[str]:
    """An ``audit_head`` point per published audit-log head (docs/SECURITY.md).

    ``agrees`` is 1, or 0 when the controller's log no longer held the head it had
    published (cut or rewritten): the Safety events dashboard shows those.
    """
    try:
        head = PublishedHead.parse(payload)
    except ValueError as exc:
        raise MalformedMessage("schema", str(exc)) from None
    if (head.clinic, head.controller) != (clinic, controller):
        raise MalformedMessage(
            "topic_mismatch",
            f"audit head is {head.clinic}/{head.controller}, topic says {clinic}/{controller}",
        )
    fields: dict[str, FieldValue] = {
        "seq": head.head.seq,
        "hash": head.head.hash,
        "agrees": 1 if head.agrees else 0,
    }
    return [
        format_line(
            AUDIT_HEAD,
            {"clinic": clinic, "controller": controller},
            fields,
            int(head.at * 1_000_000_000),
        )
    ]


def pen_offline_lines(
    status: ControllerStatus, last: Mapping[str, tuple[bool, str | None]]
) -> list[str]:
    """``device_status`` points taking offline the pens a dead or stopped controller served.

    ``last`` maps each device of the clinic to its newest status (online, controller);
    the pens still online under ``status.controller`` get an offline point, state
    ``controller_offline``.
    """
    ts = status.ts_ns or time.time_ns()
    return [
        format_line(
            DEVICE_STATUS,
            {"clinic": status.clinic, "device": device},
            {"online": False, "state": "controller_offline", "controller": status.controller},
            ts,
        )
        for device, (online, controller) in sorted(last.items())
        if online and controller == status.controller
    ]


# --- helpers -----------------------------------------------------------------------

_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})


def _tags(tags: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v.translate(_TAG_ESCAPES)}" for k, v in sorted(tags.items()))


def _string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _put(fields: dict[str, FieldValue], name: str, value: FieldValue | None) -> None:
    if value is not None:
        fields[name] = value


def _without(fields: Mapping[str, FieldValue], *names: str) -> dict[str, FieldValue]:
    return {k: v for k, v in fields.items() if k not in names}
