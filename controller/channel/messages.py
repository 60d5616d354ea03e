"""What travels on the core-edge channel: frame kinds and their bodies. Pure codecs.

The safety core (pens, registry, journal) and the edge (tablet API, MQTT
publisher, reports) are separate processes. The core *tells*: state, events and
telemetry flow to the edge, which keeps a mirror; the edge *asks* only one
thing: to apply a therapist or manager action (``REQUEST``), answered by
``RESPONSE``. Everything the edge shows is built edge-side from what it was
told, so a flood of reads never reaches the core.

=========  ===============  ======================================================
kind       direction        body
=========  ===============  ======================================================
HELLO      core -> edge     JSON: who the core is, its pens, its stream position
SNAPSHOT   core -> edge     JSON: pens and live sessions (may come in several)
STATE      core -> edge     JSON: pens and sessions an outcome changed, once durable
STREAM     core -> edge     JSON header + binary: numbered events and telemetry
STATS      core -> edge     JSON: link statistics of every pen
RESPONSE   core -> edge     JSON: the answer to one REQUEST
REQUEST    edge -> core     JSON: one action, with an id
ACK        edge -> core     JSON: the stream is durable at the edge up to ``upto``
=========  ===============  ======================================================

Actions are decoded strictly: a malformed REQUEST gets an error RESPONSE and
changes nothing (the core never trusts the edge's input more than a tablet's).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from controller.contract import EventKind
from controller.sessions import (
    AcknowledgeFault,
    Action,
    Actor,
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    OverrideZone,
    PauseSession,
    ResumeSession,
    Role,
    SelectZone,
    SessionEvent,
    SetStrokeRate,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from controller.sessions.actions import RecordSignIn, SignInResult, TakeOverSession


class Kind(enum.IntEnum):
    HELLO = 1
    SNAPSHOT = 2
    STATE = 3
    STREAM = 4
    STATS = 5
    RESPONSE = 6
    REQUEST = 20
    ACK = 21


class ChannelDecodeError(ValueError):
    """A frame body that does not fit its kind; ``kind`` names which."""

    def __init__(self, kind: int, detail: str) -> None:
        super().__init__(f"channel frame kind {kind}: {detail}")
        self.kind = kind
        self.detail = detail


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


def decode_json(kind: int, body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ChannelDecodeError(kind, f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ChannelDecodeError(kind, "not a JSON object")
    return value


# --- actions -----------------------------------------------------------------------------

#: Every action the edge may ask for, by name.
ACTIONS: Final[dict[str, type[Any]]] = {
    cls.__name__: cls
    for cls in (
        CreateSession,
        StartSession,
        SelectZone,
        SetZoneDepth,
        SetStrokeRate,
        ArmPen,
        DisarmPen,
        StopPen,
        PauseSession,
        ResumeSession,
        AcknowledgeFault,
        EndSession,
        OverrideZone,
        TakeOverSession,
        RecordSignIn,
    )
}


def encode_action(action: Action) -> dict[str, Any]:
    body: dict[str, Any] = {"type": type(action).__name__}
    for f in dataclasses.fields(action):
        value = getattr(action, f.name)
        if isinstance(value, Actor):
            value = {"actor_id": value.actor_id, "role": str(value.role)}
        elif isinstance(value, enum.Enum):
            value = value.value
        body[f.name] = value
    return body


_FIELD_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "session_id": (str,),
    "port": (str,),
    "client_ref": (str,),
    "plan_id": (str,),
    "zone_id": (str,),
    "reason": (str,),
    "depth_um": (int,),
    "rate_hz": (int,),
    "max_depth_um": (int, type(None)),
    "max_passes": (int, type(None)),
    "source": (str,),
    "actor_id": (str, type(None)),
    "attempts": (int,),
}
#: Fields whose text is one of an enumeration's values.
_ENUM_FIELDS: Final[dict[str, type[enum.Enum]]] = {"result": SignInResult, "role": Role}
_MAX_TEXT: Final = 2000


def decode_action(body: Mapping[str, Any]) -> Action:
    """The action described by ``body``; ChannelDecodeError if anything does not fit."""
    cls = ACTIONS.get(str(body.get("type")))
    if cls is None:
        raise ChannelDecodeError(Kind.REQUEST, f"unknown action {body.get('type')!r}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is not dataclasses.MISSING:
                continue
            raise ChannelDecodeError(Kind.REQUEST, f"{cls.__name__}: {f.name} is missing")
        value = body[f.name]
        if f.name == "actor":
            values["actor"] = _decode_actor(value)
            continue
        if f.name in _ENUM_FIELDS:
            values[f.name] = _decode_enum(f.name, value, _ENUM_FIELDS[f.name])
            continue
        allowed = _FIELD_TYPES.get(f.name)
        if (
            allowed is None
            or not isinstance(value, allowed)
            or isinstance(value, bool)
            or (isinstance(value, str) and len(value) > _MAX_TEXT)
        ):
            raise ChannelDecodeError(Kind.REQUEST, f"{cls.__name__}: bad {f.name}")
        values[f.name] = value
    extra = set(body) - {f.name for f in dataclasses.fields(cls)} - {"type"}
    if extra:
        raise ChannelDecodeError(Kind.REQUEST, f"{cls.__name__}: unknown {sorted(extra)}")
    action: Action = cls(**values)
    return action


def _decode_enum(name: str, value: Any, kind: type[enum.Enum]) -> Any:
    if value is None and name == "role":
        return None
    try:
        return kind(value)
    except ValueError:
        raise ChannelDecodeError(Kind.REQUEST, f"bad {name} {value!r}") from None


def _decode_actor(value: Any) -> Actor:
    if not isinstance(value, dict) or set(value) != {"actor_id", "role"}:
        raise ChannelDecodeError(Kind.REQUEST, "actor must be {actor_id, role}")
    actor_id, role = value["actor_id"], value["role"]
    if not isinstance(actor_id, str) or not 0 < len(actor_id) <= 64:
        raise ChannelDecodeError(Kind.REQUEST, "bad actor_id")
    try:
        return Actor(actor_id, Role(role))
    except ValueError:
        raise ChannelDecodeError(Kind.REQUEST, f"bad role {role!r}") from None


# --- events --------------------------------------------------------------------------------


def encode_event(event: SessionEvent, index: int) -> dict[str, Any]:
    """An event with its decision index (the order the registry decided it in)."""
    return {
        "i": index,
        "kind": str(event.kind),
        "at": event.at,
        "port": event.port,
        "session_id": event.session_id,
        "detail": dict(event.detail),
    }


def decode_event(body: Mapping[str, Any]) -> tuple[int, SessionEvent]:
    try:
        event = SessionEvent(
            EventKind(body["kind"]),
            float(body["at"]),
            str(body["port"]),
            body["session_id"],
            dict(body["detail"]),
        )
        return int(body["i"]), event
    except (KeyError, TypeError, ValueError) as exc:
        raise ChannelDecodeError(Kind.STREAM, f"bad event ({exc})") from None


# --- the stream: events and telemetry, numbered, acknowledged by the edge ----------------------

#: One telemetry record: pen index (into the header's pen list), host receive time, and
#: the Telemetry message's payload exactly as the pen sent it.
_RECORD_HEAD: Final = struct.Struct("!Hd")
_BODY_SPLIT: Final = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    pen: int
    received_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One numbered piece of the stream: events (in decision order) and telemetry.

    ``pens`` maps a record's pen index to (port, serial, session id, zone id) as they
    were when the samples were taken.
    """

    seq: int
    events: tuple[tuple[int, SessionEvent], ...] = ()
    pens: tuple[tuple[str, str | None, str | None, str | None], ...] = ()
    records: tuple[TelemetryRecord, ...] = ()


def encode_stream(item: StreamItem, payload_size: int) -> bytes:
    """JSON header, then the telemetry records packed back to back."""
    header = encode_json(
        {
            "seq": item.seq,
            "events": [encode_event(e, i) for i, e in item.events],
            "pens": [list(p) for p in item.pens],
            "n": len(item.records),
            "size": payload_size,
        }
    )
    parts = [_BODY_SPLIT.pack(len(header)), header]
    pack = _RECORD_HEAD.pack
    for record in item.records:
        parts.append(pack(record.pen, record.received_at))
        parts.append(record.payload)
    return b"".join(parts)


def decode_stream(body: bytes) -> StreamItem:
    try:
        (length,) = _BODY_SPLIT.unpack_from(body, 0)
        header = decode_json(Kind.STREAM, body[4 : 4 + length])
        seq, count, size = int(header["seq"]), int(header["n"]), int(header["size"])
        events = tuple(decode_event(e) for e in header["events"])
        pens = tuple((str(p[0]), p[1], p[2], p[3]) for p in header["pens"] if isinstance(p, list))
    except (struct.error, KeyError, TypeError, ValueError) as exc:
        raise ChannelDecodeError(Kind.STREAM, f"bad stream header ({exc})") from None
    offset = 4 + length
    step = _RECORD_HEAD.size + size
    if len(body) - offset != count * step:
        raise ChannelDecodeError(Kind.STREAM, "telemetry records do not match the header")
    records = []
    for _ in range(count):
        pen, at = _RECORD_HEAD.unpack_from(body, offset)
        start = offset + _RECORD_HEAD.size
        records.append(TelemetryRecord(pen, at, body[start : start + size]))
        offset += step
    return StreamItem(seq, events, pens, tuple(records))


def telemetry_payloads(records: Sequence[TelemetryRecord]) -> list[bytes]:
    return [r.payload for r in records]
