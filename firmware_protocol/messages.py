"""The message catalogue: every message the host and the pen exchange, in one table.

Each message is a frozen dataclass whose fields map one-to-one, in order, onto a
little-endian ``struct`` format. The catalogue table at the bottom of this module
is the single source of truth: type ids, directions, delivery classes and field
layouts all come from it, and so does the schema hash that both ends compare in
the handshake. Change any row and the hash changes, so a host and a pen built
from different catalogues refuse to arm rather than misread each other.

Units are integers: micrometres, milliseconds, milliamps, millivolts, hundredths
of a degree Celsius, hertz.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, ClassVar

PROTOCOL_VERSION = 2

#: Bytes of Identity that every protocol version sends first, in the same layout
#: (version 1's whole Identity): enough for a host to name a pen of another version.
IDENTITY_PREFIX_SIZE = 32

COUNTER_MOD = 2**32


def counter_diff(newer: int, older: int) -> int:
    """``(newer - older) mod 2**32``: how far a wrapping u32 counter moved from ``older``.

    The pen's counters (runs, strokes, cartridge strokes, device_ms) are u32 and wrap;
    every comparison of two readings must go through this, never a plain subtraction.
    """
    return (newer - older) % COUNTER_MOD


class Direction(enum.Enum):
    HOST_TO_DEVICE = "host->device"
    DEVICE_TO_HOST = "device->host"


class Delivery(enum.Enum):
    SYNC = "sync"  # handshake frames, outside the sequence spaces
    RELIABLE = "reliable"  # acknowledged, retransmitted, applied exactly once
    UNRELIABLE = "unreliable"  # numbered, never acknowledged; loss is counted


class StopReason(enum.IntEnum):
    """Why the motor stopped or the pen disarmed (MotorStopped.reason, Disarmed.reason)."""

    BUTTON_RELEASED = 1
    LIFT_OFF = 2  # skin contact lost for longer than the lift-off grace time
    HOST_STOP = 3
    HOST_DISARM = 4
    LEASE_EXPIRED = 5
    STALL = 6
    OVER_CURRENT = 7
    OVER_TEMPERATURE = 8
    LOW_BATTERY = 9
    CARTRIDGE_REMOVED = 10
    DEPTH_CEILING = 11  # measured depth above the pen's absolute maximum
    REBOOT = 12
    LINK_LOST = 13  # the pen gave up the link (it disarms; nobody hears it until Status)
    NEW_HOST = 14  # the pen accepted a Hello from a new host
    DEPTH_LIMIT = 15  # measured depth above the arming's max_depth_um + depth_accuracy_um


#: Reasons that latch a fault: the pen stays stopped until the host re-arms it.
FAULT_REASONS = frozenset(
    {
        StopReason.STALL,
        StopReason.OVER_CURRENT,
        StopReason.OVER_TEMPERATURE,
        StopReason.LOW_BATTERY,
        StopReason.CARTRIDGE_REMOVED,
        StopReason.DEPTH_CEILING,
        StopReason.DEPTH_LIMIT,
    }
)


class RefusalCode(enum.IntEnum):
    """Why the pen refused a command (CommandRefused.reason)."""

    NO_CARTRIDGE = 1
    NO_DEPTH = 2  # arm before any depth was set
    DEPTH_ABOVE_CEILING = 3
    SPEED_OUT_OF_RANGE = 4
    LOW_BATTERY = 5
    OVER_TEMPERATURE = 6
    BAD_LEASE = 7  # lease of 0 ms or above the pen's maximum
    BAD_TOKEN = 8  # renew for a lease that is not the current one
    BAD_PAYLOAD = 9  # frame was fine, message body was not
    UNKNOWN_MESSAGE = 10
    RATE_OUT_OF_RANGE = 11
    SETPOINT_MISMATCH = 12  # Arm.depth_um differs from the pen's own setpoint
    BAD_LIMIT = 13  # Arm.max_depth_um below Arm.depth_um, or above the pen's ceiling
    ARMED = 14  # SetDepth while armed: the approved setpoint may not change under an arming
    MOTOR_RUNNING = 15  # Arm while the motor runs


class HostStopReason(enum.IntEnum):
    """Why the host sent Stop; the pen records it, the host's audit log explains it."""

    THERAPIST = 1
    DEPTH_OVERSHOOT = 2
    PUNCTURE_BUDGET = 3
    PASS_LIMIT = 4
    SESSION_END = 5
    LINK_LOSS = 6
    FAULT = 7
    OTHER = 255


class TelemetryFlag(enum.IntFlag):
    ARMED = 0x01
    MOTOR_RUNNING = 0x02
    SKIN_CONTACT = 0x04
    BUTTON_PRESSED = 0x08
    CARTRIDGE_PRESENT = 0x10
    FAULT_LATCHED = 0x20
    DEPTH_SET = 0x40  # the pen holds a setpoint; depth_set_um means something only with it


class Message:
    """Base of every catalogue message. TYPE and FORMAT are set by the catalogue."""

    __slots__ = ()
    TYPE: ClassVar[int] = 0
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<")
    DIRECTION: ClassVar[Direction]
    DELIVERY: ClassVar[Delivery]

    def encode(self) -> bytes:
        """The payload bytes. struct.error on a field out of range for its wire type."""
        return self.FORMAT.pack(*_VALUES[type(self)](self))


# --- host -> device -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Opens a link. The nonce tells a new host apart from a duplicated old Hello."""

    protocol_version: int
    host_nonce: int


@dataclass(frozen=True, slots=True)
class SetDepth(Message):
    depth_um: int


@dataclass(frozen=True, slots=True)
class SetSpeed(Message):
    rate_hz: int


@dataclass(frozen=True, slots=True)
class Arm(Message):
    """Arm for lease_ms; the host keeps the pen armed by sending Renew(token).

    ``depth_um`` is the setpoint the host approved (the pen refuses the Arm unless it is
    its own); ``max_depth_um`` is the deepest this arming may ever drive (the zone limit).
    """

    lease_ms: int
    token: int
    depth_um: int
    max_depth_um: int


@dataclass(frozen=True, slots=True)
class Renew(Message):
    token: int


@dataclass(frozen=True, slots=True)
class Disarm(Message):
    pass


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """Stop the motor and disarm at once. reason is a HostStopReason."""

    reason: int


@dataclass(frozen=True, slots=True)
class SetTelemetryRate(Message):
    rate_hz: int


@dataclass(frozen=True, slots=True)
class SetLiftOffGrace(Message):
    grace_ms: int


@dataclass(frozen=True, slots=True)
class QueryStatus(Message):
    pass


@dataclass(frozen=True, slots=True)
class Reset(Message):
    """Reboot the pen (a new boot id; the host must handshake again)."""


# --- device -> host -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity(Message):
    """The pen's answer to Hello, and its announcement after boot (host_nonce 0).

    The first ten fields (IDENTITY_PREFIX_SIZE bytes) are the same in every protocol
    version; the rest are the pen's accuracy and limits.
    """

    protocol_version: int
    serial: bytes  # ASCII, NUL-padded to 12 bytes
    fw_major: int
    fw_minor: int
    fw_patch: int
    boot_id: int
    schema_hash: int
    max_depth_um: int
    max_lease_ms: int
    host_nonce: int
    depth_accuracy_um: int
    min_speed_hz: int
    max_speed_hz: int
    default_speed_hz: int
    max_telemetry_rate_hz: int
    default_telemetry_rate_hz: int
    max_lift_off_grace_ms: int
    default_lift_off_grace_ms: int
    arm_battery_mv: int  # refuses to arm below
    low_battery_mv: int  # stops below
    max_temperature_cdeg: int  # stops above
    rearm_temperature_cdeg: int  # refuses to arm above

    @property
    def serial_text(self) -> str:
        return self.serial.rstrip(b"\0").decode("ascii", "replace")

    @property
    def firmware_version(self) -> str:
        return f"{self.fw_major}.{self.fw_minor}.{self.fw_patch}"


@dataclass(frozen=True, slots=True)
class Telemetry(Message):
    device_ms: int
    depth_set_um: int
    depth_um: int  # measured
    speed_hz: int  # measured stroke rate
    current_ma: int
    temperature_cdeg: int
    battery_mv: int
    strokes: int  # since boot, wraps
    flags: int  # TelemetryFlag
    runs: int  # motor runs since boot, wraps


@dataclass(frozen=True, slots=True)
class MotorStarted(Message):
    device_ms: int
    depth_set_um: int
    max_depth_um: int  # the arming's maximum
    runs: int  # the run counter after counting this run
    strokes: int  # stroke counter at start
    cartridge_id: int
    cartridge_strokes: int


@dataclass(frozen=True, slots=True)
class MotorStopped(Message):
    device_ms: int
    reason: int  # StopReason
    runs: int
    strokes: int  # stroke counter at stop
    peak_depth_um: int  # deepest measured depth during the run
    cartridge_strokes: int


@dataclass(frozen=True, slots=True)
class Armed(Message):
    token: int
    lease_ms: int
    depth_um: int
    max_depth_um: int
    runs: int
    strokes: int
    cartridge_id: int
    cartridge_strokes: int


@dataclass(frozen=True, slots=True)
class Disarmed(Message):
    reason: int  # StopReason


@dataclass(frozen=True, slots=True)
class CartridgeInserted(Message):
    cartridge_id: int
    cartridge_strokes: int  # what the cartridge's chip remembers


@dataclass(frozen=True, slots=True)
class CartridgeRemoved(Message):
    cartridge_id: int
    cartridge_strokes: int


@dataclass(frozen=True, slots=True)
class CommandRefused(Message):
    msg_type: int
    reason: int  # RefusalCode


@dataclass(frozen=True, slots=True)
class Status(Message):
    flags: int  # TelemetryFlag
    depth_set_um: int
    speed_hz: int
    cartridge_id: int  # 0 when no cartridge
    fault: int  # StopReason of the latched fault, 0 when none
    lease_left_ms: int
    token: int  # the current arming's token, 0 when disarmed
    arm_max_depth_um: int  # the current arming's maximum, 0 when disarmed
    runs: int
    strokes: int
    cartridge_strokes: int
    telemetry_rate_hz: int
    lift_off_grace_ms: int
    device_ms: int


# --- the catalogue --------------------------------------------------------------

H2D, D2H = Direction.HOST_TO_DEVICE, Direction.DEVICE_TO_HOST
SYNC, REL, UNREL = Delivery.SYNC, Delivery.RELIABLE, Delivery.UNRELIABLE

#: Identity: the prefix every version shares, then the pen's accuracy and limits.
_IDENTITY_PREFIX_FMT = "<B12sBBBIIHHI"
_IDENTITY_FMT = _IDENTITY_PREFIX_FMT + "HHHHHHHHHHhh"

# fmt: off
CATALOGUE: tuple[tuple[int, type[Message], str, Direction, Delivery], ...] = (
    # type  message            struct format    direction  delivery
    (0x01,  Hello,             "<BI",           H2D,       SYNC),
    (0x10,  SetDepth,          "<H",            H2D,       REL),
    (0x11,  SetSpeed,          "<H",            H2D,       REL),
    (0x12,  Arm,               "<HHHH",         H2D,       REL),
    (0x13,  Renew,             "<H",            H2D,       UNREL),
    (0x14,  Disarm,            "<",             H2D,       REL),
    (0x15,  Stop,              "<B",            H2D,       REL),
    (0x16,  SetTelemetryRate,  "<H",            H2D,       REL),
    (0x17,  SetLiftOffGrace,   "<H",            H2D,       REL),
    (0x18,  QueryStatus,       "<",             H2D,       REL),
    (0x19,  Reset,             "<",             H2D,       REL),
    (0x81,  Identity,          _IDENTITY_FMT,   D2H,       SYNC),
    (0x82,  Telemetry,         "<IHHHHhHIBI",   D2H,       UNREL),
    (0x83,  MotorStarted,      "<IHHIIQI",      D2H,       REL),
    (0x84,  MotorStopped,      "<IBIIHI",       D2H,       REL),
    (0x85,  Armed,             "<HHHHIIQI",     D2H,       REL),
    (0x86,  Disarmed,          "<B",            D2H,       REL),
    (0x87,  CartridgeInserted, "<QI",           D2H,       REL),
    (0x88,  CartridgeRemoved,  "<QI",           D2H,       REL),
    (0x89,  CommandRefused,    "<BB",           D2H,       REL),
    (0x8A,  Status,            "<BHHQBHHHIIIHHI", D2H,     REL),
)
# fmt: on

CatalogueRow = tuple[int, type[Message], str, Direction, Delivery]

BY_TYPE: dict[int, type[Message]] = {}
# Field values in wire order, per class; dataclasses.astuple deep-copies and is ~20x slower.
_VALUES: dict[type[Message], Callable[[Message], tuple[Any, ...]]] = {}


def field_names(cls: type[Message]) -> tuple[str, ...]:
    """The message's field names, in wire order."""
    return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]


def schema_text(catalogue: Iterable[CatalogueRow] = CATALOGUE) -> str:
    """The canonical text the schema hash is computed over: one line per catalogue row.

    ``<type id as 0xNN>|<name>|<struct format>|<direction>|<delivery>|<field,field,...>``
    """
    lines = []
    for type_id, cls, fmt, direction, delivery in catalogue:
        row = f"{type_id:#04x}|{cls.__name__}|{fmt}|{direction.value}|{delivery.value}|"
        lines.append(row + ",".join(field_names(cls)) + "\n")
    return "".join(lines)


def schema_hash(catalogue: Iterable[CatalogueRow] = CATALOGUE) -> int:
    """First four bytes, read as a little-endian u32, of SHA-256 over ``schema_text``."""
    digest = hashlib.sha256(schema_text(catalogue).encode("ascii")).digest()
    return int.from_bytes(digest[:4], "little")


def _getter(names: tuple[str, ...]) -> Callable[[Message], tuple[Any, ...]]:
    if not names:
        return lambda m: ()
    if len(names) == 1:
        get_one = attrgetter(names[0])
        return lambda m: (get_one(m),)
    return attrgetter(*names)


def _install() -> int:
    for type_id, cls, fmt, direction, delivery in CATALOGUE:
        s = struct.Struct(fmt)
        names = field_names(cls)
        # A format whose field count disagrees with the dataclass is a bug in this table.
        n_codes = len(s.unpack(bytes(s.size)))
        if n_codes != len(names):
            raise AssertionError(f"{cls.__name__}: format {fmt!r} has {n_codes} fields")
        if type_id in BY_TYPE:
            raise AssertionError(f"type id {type_id:#04x} used twice")
        cls.TYPE, cls.FORMAT, cls.DIRECTION, cls.DELIVERY = type_id, s, direction, delivery
        _VALUES[cls] = _getter(names)
        BY_TYPE[type_id] = cls
    return schema_hash(CATALOGUE)


#: First four bytes (little-endian u32) of SHA-256 over the catalogue rows (``schema_text``).
SCHEMA_HASH: int = _install()


class MessageDecodeError(ValueError):
    """A frame passed its CRC but its body is not a valid message."""

    def __init__(self, msg_type: int, reason: RefusalCode, detail: str) -> None:
        super().__init__(detail)
        self.msg_type = msg_type
        self.reason = reason


def decode_message(msg_type: int, payload: bytes) -> Message:
    """Build the message for a type id and payload; MessageDecodeError if impossible."""
    cls = BY_TYPE.get(msg_type)
    if cls is None:
        raise MessageDecodeError(
            msg_type, RefusalCode.UNKNOWN_MESSAGE, f"unknown message type {msg_type:#04x}"
        )
    fmt = cls.FORMAT
    if len(payload) != fmt.size:
        raise MessageDecodeError(
            msg_type,
            RefusalCode.BAD_PAYLOAD,
            f"{cls.__name__} needs {fmt.size} payload bytes, got {len(payload)}",
        )
    return cls(*fmt.unpack(payload))


def encode_message(message: Message) -> bytes:
    """Payload bytes of a message. struct.error (a ValueError) on out-of-range fields."""
    try:
        return message.encode()
    except struct.error as exc:
        raise ValueError(f"{type(message).__name__}: {exc}") from exc


_IDENTITY_PREFIX = struct.Struct(_IDENTITY_PREFIX_FMT)
if _IDENTITY_PREFIX.size != IDENTITY_PREFIX_SIZE:  # pragma: no cover - a bug in this module
    raise AssertionError("the Identity prefix must stay 32 bytes")
#: Identity payload size by protocol version (version 1 had only the prefix).
IDENTITY_SIZE_BY_VERSION: dict[int, int] = {1: IDENTITY_PREFIX_SIZE, 2: Identity.FORMAT.size}


def decode_identity_prefix(payload: bytes) -> Identity:
    """An Identity built from the prefix every protocol version sends first.

    For naming a pen that speaks another protocol version, whose Identity may be
    longer or shorter than this version's: the fields after the prefix are 0.
    MessageDecodeError when the payload is shorter than the prefix.
    """
    if len(payload) < IDENTITY_PREFIX_SIZE:
        raise MessageDecodeError(
            Identity.TYPE,
            RefusalCode.BAD_PAYLOAD,
            f"Identity needs at least {IDENTITY_PREFIX_SIZE} payload bytes, got {len(payload)}",
        )
    prefix = _IDENTITY_PREFIX.unpack_from(payload)
    rest = len(field_names(Identity)) - len(prefix)
    return Identity(*prefix, *([0] * rest))


def encode_identity(identity: Identity) -> bytes:
    """The Identity payload as a pen speaking ``identity.protocol_version`` sends it.

    Version 1 sent only the 32-byte prefix; this version and unknown later ones the
    whole current layout. ValueError on out-of-range fields.
    """
    payload = encode_message(identity)
    if identity.protocol_version == 1:
        return payload[:IDENTITY_PREFIX_SIZE]
    return payload
