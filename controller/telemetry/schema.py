"""The MQTT contract between the controller and ingest: topics and payloads.

Topics (``root`` defaults to ``pen/v1``; the version is part of the root so a
v2 can run beside v1 on the same broker)::

    {root}/{clinic}/device/{device}/status       retained, JSON DeviceStatus; refreshed
                                                 every few seconds with fresh link counters
    {root}/{clinic}/device/{device}/events       JSON EventRecord, QoS 1
    {root}/{clinic}/device/{device}/telemetry    JSON TelemetryBatch, QoS 1 (still accepted
                                                 by ingest; controllers send bundles)
    {root}/{clinic}/controller/{controller}/status
                                                 retained, JSON ControllerStatus;
                                                 the controller's last will says offline
    {root}/{clinic}/controller/{controller}/telemetry
                                                 JSON TelemetryBundle, QoS 1: the
                                                 batches of several of its pens
    {root}/{clinic}/controller/{controller}/ack  JSON Ack, QoS 1, from ingest: what is
                                                 durably in InfluxDB (docs/MQTT.md)

The controller publishes telemetry as bundles: a Python MQTT client spends
~85-125 µs on every message however small (paho's packet and MQTT 5 property
decoding, one event-loop turn each), which at 10 samples per pen-batch capped
ingest at ~35 k samples/s; a bundle of a controller's pens for one flush
carries hundreds of samples for the same fixed cost. Each batch inside keeps
its own device and ``seq``, so the per-device stream contract is unchanged.

Ids in topics and payloads are pseudonymous (pen serials, clinic and session
ids, keyed hashes of client references); never a name, never free text (events
carry reason codes; the sentences stay in the controller's audit log). Every
telemetry and event stream carries ``seq``, counting per (device, stream) from 0
without gaps, so a consumer that sees a jump knows exactly how many messages it
missed. ``seq`` survives a controller restart (it is kept in the outbox database).

Timestamps (``ts_ns``, nanoseconds since the Unix epoch) are assigned once, by the
controller, and travel in the payload, so a redelivered message produces the very
same InfluxDB points: writes are idempotent.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_ROOT = "pen/v1"
MAX_BUNDLE_BATCHES = 1000
MAX_VALUE_CHARS = 8192  # an event value string; shaping never cuts one (telemetry/events.py)

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]

#: Column order of TelemetryBatch.samples rows.
SAMPLE_FIELDS: tuple[str, ...] = (
    "ts_ns",
    "device_ms",
    "depth_set_um",
    "depth_um",
    "speed_hz",
    "current_ma",
    "temperature_cdeg",
    "battery_mv",
    "strokes",
    "flags",
)

# The session registry's event kinds (controller.sessions.EventKind), as on the wire.
EventKind = Literal[
    "session_created",
    "state_changed",
    "zone_selected",
    "depth_set",
    "speed_set",
    "arming",
    "armed",
    "disarmed",
    "pass_started",
    "pass_ended",
    "zone_completed",
    "override_applied",
    "stop_sent",
    "refused",
    "fault",
    "cartridge_inserted",
    "cartridge_removed",
    "pen_connected",
    "pen_disconnected",
    "session_report",
]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1  # payload schema version
    clinic: Identifier
    device: Identifier


class TelemetryBatch(_Payload):
    """Consecutive telemetry samples of one pen."""

    seq: int = Field(ge=0)
    session: Identifier | None = None
    zone: Identifier | None = None
    samples: list[list[int]] = Field(min_length=1, max_length=10_000)

    @field_validator("samples")
    @classmethod
    def _rows_are_complete(cls, rows: list[list[int]]) -> list[list[int]]:
        width = len(SAMPLE_FIELDS)
        for i, row in enumerate(rows):
            if len(row) != width:
                raise ValueError(f"sample {i} has {len(row)} values, expected {width}")
            if row[0] <= 0:
                raise ValueError(f"sample {i} has no timestamp")
        return rows


#: The streams that ingest acknowledges end to end, keyed by (device, stream, seq).
AckedStream = Literal["telemetry", "events"]


class TelemetryBundle(BaseModel):
    """Telemetry batches of several pens of one controller, in one MQTT message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    clinic: Identifier
    controller: Identifier
    batches: list[TelemetryBatch] = Field(min_length=1, max_length=MAX_BUNDLE_BATCHES)

    @model_validator(mode="after")
    def _batches_of_its_clinic(self) -> TelemetryBundle:
        others = sorted({b.clinic for b in self.batches} - {self.clinic})
        if others:
            raise ValueError(f"a bundle of clinic {self.clinic} holds batches of {others}")
        return self


class EventRecord(_Payload):
    """A session or safety event: passes, refusals, stops, overrides, faults."""

    seq: int = Field(ge=0)
    ts_ns: int = Field(gt=0)
    kind: EventKind
    # Whom ingest acknowledges the event to (docs/MQTT.md); absent: nobody waits for it.
    controller: Identifier | None = None
    session: Identifier | None = None
    therapist: Identifier | None = None
    plan: Identifier | None = None
    zone: Identifier | None = None
    code: str | None = Field(default=None, max_length=64)
    message: str | None = Field(default=None, max_length=500)
    values: dict[str, int | float | bool | str] = Field(default_factory=dict)

    @field_validator("values")
    @classmethod
    def _values_are_small(
        cls, values: dict[str, int | float | bool | str]
    ) -> dict[str, int | float | bool | str]:
        if len(values) > 32:
            raise ValueError("at most 32 values")
        for key, value in values.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", key):
                raise ValueError(f"value name {key!r} is not snake_case")
            if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
                raise ValueError(f"value {key!r} is longer than {MAX_VALUE_CHARS} characters")
        return values


class DeviceStatus(_Payload):
    """A pen's retained status, refreshed while its controller runs."""

    ts_ns: int = Field(gt=0)
    online: bool
    state: str = Field(max_length=32)
    # The controller serving the pen: its offline status (or last will) takes the
    # pen offline too (ingest derives it; docs/MQTT.md).
    controller: Identifier | None = None
    firmware: str | None = Field(default=None, max_length=32)
    session: Identifier | None = None
    link: dict[str, int | float] = Field(default_factory=dict)


class ControllerStatus(BaseModel):
    """A controller's retained status; its last will is the same with ``online`` false."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    clinic: Identifier
    controller: Identifier
    online: bool
    ts_ns: int = Field(ge=0)


class AckRange(BaseModel):
    """Sequence numbers of one device's stream that a worker wrote: ``[first, last]`` pairs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Identifier
    stream: AckedStream
    seqs: list[tuple[int, int]] = Field(min_length=1)

    @field_validator("seqs")
    @classmethod
    def _ordered_pairs(cls, seqs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for first, last in seqs:
            if not 0 <= first <= last:
                raise ValueError(f"bad range [{first}, {last}]")
        return seqs


class Ack(BaseModel):
    """What one ingest worker has durably written (or dead-lettered) for one controller.

    A set, not a high-water mark: several workers share the subscription and each
    acknowledges only what it wrote itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    clinic: Identifier
    controller: Identifier
    worker: Identifier
    ts_ns: int = Field(gt=0)
    ranges: list[AckRange] = Field(min_length=1)


def device_topic(root: str, clinic: str, device: str, stream: str) -> str:
    return f"{root}/{clinic}/device/{device}/{stream}"


def controller_status_topic(root: str, clinic: str, controller: str) -> str:
    return f"{root}/{clinic}/controller/{controller}/status"


def controller_telemetry_topic(root: str, clinic: str, controller: str) -> str:
    return f"{root}/{clinic}/controller/{controller}/telemetry"


def ack_topic(root: str, clinic: str, controller: str) -> str:
    return f"{root}/{clinic}/controller/{controller}/ack"


TopicKind = Literal["device", "controller"]


def parse_topic(topic: str, root: str = DEFAULT_ROOT) -> tuple[str, TopicKind, str, str] | None:
    """(clinic, "device" or "controller", its id, stream) of a topic, or None."""
    prefix = root + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 4:
        return None
    clinic, kind, ident, stream = parts
    if kind == "device":
        return clinic, "device", ident, stream
    if kind == "controller":
        return clinic, "controller", ident, stream
    return None


def dump(model: BaseModel) -> bytes:
    """Compact JSON with the short aliases, as it goes on the wire."""
    return model.model_dump_json(by_alias=True, exclude_none=True).encode()


def sample_row(ts_ns: int, values: Any) -> list[int]:
    """A TelemetryBatch row from a timestamp and a firmware Telemetry message."""
    return [
        ts_ns,
        values.device_ms,
        values.depth_set_um,
        values.depth_um,
        values.speed_hz,
        values.current_ma,
        values.temperature_cdeg,
        values.battery_mv,
        values.strokes,
        values.flags,
    ]
