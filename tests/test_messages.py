"""Message catalogue: round trips, malformed payloads, the schema hash, the spec's tables."""

from __future__ import annotations

import dataclasses
import re
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol import spec
from firmware_protocol.framing import MAX_PAYLOAD
from firmware_protocol.messages import (
    BY_TYPE,
    CATALOGUE,
    FAULT_REASONS,
    IDENTITY_PREFIX_SIZE,
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    Arm,
    Delivery,
    Direction,
    Identity,
    Message,
    MessageDecodeError,
    RefusalCode,
    SetDepth,
    StopReason,
    Telemetry,
    TelemetryFlag,
    counter_diff,
    decode_identity_prefix,
    decode_message,
    encode_identity,
    encode_message,
    field_names,
    schema_hash,
)

_INT_RANGES = {
    "B": (0, 2**8 - 1),
    "H": (0, 2**16 - 1),
    "h": (-(2**15), 2**15 - 1),
    "I": (0, 2**32 - 1),
    "Q": (0, 2**64 - 1),
}


def _field_strategies(fmt: str) -> list[st.SearchStrategy[Any]]:
    out: list[st.SearchStrategy[Any]] = []
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
        if code == "s":
            out.append(st.binary(min_size=int(count), max_size=int(count)))
        else:
            lo, hi = _INT_RANGES[code]
            out += [st.integers(lo, hi)] * (int(count) if count else 1)
    return out


def _message_strategy(cls: type[Message], fmt: str) -> st.SearchStrategy[Message]:
    return st.tuples(*_field_strategies(fmt)).map(lambda values: cls(*values))


any_message = st.one_of(*(_message_strategy(cls, fmt) for _, cls, fmt, _, _ in CATALOGUE))


@settings(max_examples=400)
@given(any_message)
def test_every_catalogue_message_round_trips(message: Message) -> None:
    payload = encode_message(message)
    assert len(payload) == type(message).FORMAT.size <= MAX_PAYLOAD
    assert decode_message(message.TYPE, payload) == message


@pytest.mark.parametrize("row", CATALOGUE, ids=lambda row: row[1].__name__)
def test_extreme_field_values_round_trip(row: Any) -> None:
    type_id, cls, fmt, _, _ = row
    for pick in (0, 1):
        values: list[Any] = []
        for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
            if code == "s":
                values.append(bytes([0xFF * pick]) * int(count))
            else:
                values += [_INT_RANGES[code][pick]] * (int(count) if count else 1)
        message = cls(*values)
        assert decode_message(type_id, encode_message(message)) == message


def test_catalogue_is_consistent() -> None:
    ids = [row[0] for row in CATALOGUE]
    assert len(ids) == len(set(ids)) == len(BY_TYPE)
    for type_id, cls, fmt, direction, delivery in CATALOGUE:
        assert type_id == cls.TYPE
        assert cls.FORMAT.format == fmt
        # The spec promises the id range tells the direction.
        assert (type_id >= 0x80) == (direction is Direction.DEVICE_TO_HOST), cls.__name__
        assert (delivery is Delivery.SYNC) == (cls.__name__ in {"Hello", "Identity"})
        assert len(field_names(cls)) == len(cls.FORMAT.unpack(bytes(cls.FORMAT.size)))


@settings(max_examples=500)
@given(st.integers(0, 255), st.binary(max_size=MAX_PAYLOAD + 8))
def test_malformed_payloads_raise_decode_error_never_crash(msg_type: int, payload: bytes) -> None:
    cls = BY_TYPE.get(msg_type)
    if cls is not None and len(payload) == cls.FORMAT.size:
        message = decode_message(msg_type, payload)
        assert isinstance(message, cls)
        assert encode_message(message) == payload
        return
    with pytest.raises(MessageDecodeError) as info:
        decode_message(msg_type, payload)
    assert info.value.msg_type == msg_type
    if cls is None:
        assert info.value.reason is RefusalCode.UNKNOWN_MESSAGE
    else:
        assert info.value.reason is RefusalCode.BAD_PAYLOAD
        assert cls.__name__ in str(info.value)


def test_unknown_type_and_wrong_length_messages() -> None:
    with pytest.raises(MessageDecodeError, match="unknown message type 0x7f"):
        decode_message(0x7F, b"")
    with pytest.raises(MessageDecodeError, match="SetDepth needs 2 payload bytes, got 3"):
        decode_message(SetDepth.TYPE, b"\x00\x00\x00")


@pytest.mark.parametrize(
    "message",
    [SetDepth(-1), SetDepth(70_000), Arm(250, 2**16, 0, 0), SetDepth(1.5)],  # type: ignore[arg-type]
)
def test_unencodable_fields_raise_value_error(message: Message) -> None:
    with pytest.raises(ValueError, match=type(message).__name__):
        encode_message(message)


LIMITS = (20, 50, 150, 100, 1000, 100, 2000, 300, 3500, 3450, 4500, 4200)


def test_identity_serial_is_nul_padded_on_the_wire() -> None:
    ident = Identity(2, b"PEN-7", 1, 2, 3, 9, SCHEMA_HASH, 2500, 2000, 0, *LIMITS)
    back = decode_message(Identity.TYPE, encode_message(ident))
    assert isinstance(back, Identity)
    assert back.serial == b"PEN-7" + bytes(7)
    assert back.serial_text == "PEN-7"
    assert back.firmware_version == "1.2.3"


def test_schema_hash_is_computed_from_the_catalogue() -> None:
    assert schema_hash(CATALOGUE) == SCHEMA_HASH
    assert 0 <= SCHEMA_HASH < 2**32


def _variants() -> dict[str, list[Any]]:
    rows = [list(row) for row in CATALOGUE]
    i = next(k for k, row in enumerate(rows) if row[1] is Telemetry)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Telemetry2(Message):  # a renamed field, same layout
        device_ms: int
        depth_set_um: int
        depth_um: int
        speed_hz: int
        current_ma: int
        temperature_cdeg: int
        battery_mv: int
        strokes: int
        status_flags: int
        runs: int

    Telemetry2.__name__ = "Telemetry"
    out: dict[str, list[Any]] = {}
    for label, col, value in [
        ("type id", 0, 0x8F),
        ("format", 2, "<IHHHHHHIBI"),
        ("direction", 3, Direction.HOST_TO_DEVICE),
        ("delivery", 4, Delivery.RELIABLE),
        ("field name", 1, Telemetry2),
    ]:
        changed = [list(row) for row in rows]
        changed[i][col] = value
        out[label] = changed
    out["row removed"] = rows[:i] + rows[i + 1 :]
    out["rows reordered"] = [rows[i], *rows[:i], *rows[i + 1 :]]
    return out


@pytest.mark.parametrize(("label", "catalogue"), list(_variants().items()))
def test_schema_hash_changes_when_the_catalogue_changes(label: str, catalogue: Any) -> None:
    assert schema_hash(tuple(tuple(row) for row in catalogue)) != SCHEMA_HASH, label


# --- PROTOCOL.md cannot drift from the code ----------------------------------------


def test_protocol_md_generated_sections_match_the_code() -> None:
    found = spec.read_sections(spec.PROTOCOL_MD.read_text(encoding="utf-8"))
    expected = spec.render_sections()
    assert set(found) == set(expected), "a generated section is missing from PROTOCOL.md"
    for name, text in expected.items():
        assert found[name] == text, (
            f"PROTOCOL.md section {name!r} is stale: run python -m firmware_protocol.spec"
        )


def test_protocol_md_catalogue_table_lists_every_message() -> None:
    # Parse the table as a reader would, independently of the renderer.
    text = spec.PROTOCOL_MD.read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| `0x([0-9A-F]{2})` \| (\w+) \| ([\w>-]+) \| (\w+) \| (\d+) \|$", text, re.MULTILINE
    )
    table = {int(t, 16): (name, d, dl, int(size)) for t, name, d, dl, size in rows}
    code = {
        t: (cls.__name__, d.value, dl.value, struct.calcsize(fmt))
        for t, cls, fmt, d, dl in CATALOGUE
    }
    assert table == code
    assert f"0x{SCHEMA_HASH:08X}" in text


def test_every_field_is_documented() -> None:
    wanted = {(cls.__name__, name) for _, cls, _, _, _ in CATALOGUE for name in field_names(cls)}
    assert wanted == set(spec.FIELD_DOCS)


# --- version 2 layouts, exactly as the host half of issue 11 reads them --------------------


V2_LAYOUTS = {
    "Hello": ("<BI", ["protocol_version", "host_nonce"]),
    "Arm": ("<HHHH", ["lease_ms", "token", "depth_um", "max_depth_um"]),
    "Identity": (
        "<B12sBBBIIHHIHHHHHHHHHHhh",
        [
            "protocol_version",
            "serial",
            "fw_major",
            "fw_minor",
            "fw_patch",
            "boot_id",
            "schema_hash",
            "max_depth_um",
            "max_lease_ms",
            "host_nonce",
            "depth_accuracy_um",
            "min_speed_hz",
            "max_speed_hz",
            "default_speed_hz",
            "max_telemetry_rate_hz",
            "default_telemetry_rate_hz",
            "max_lift_off_grace_ms",
            "default_lift_off_grace_ms",
            "arm_battery_mv",
            "low_battery_mv",
            "max_temperature_cdeg",
            "rearm_temperature_cdeg",
        ],
    ),
    "Telemetry": (
        "<IHHHHhHIBI",
        [
            "device_ms",
            "depth_set_um",
            "depth_um",
            "speed_hz",
            "current_ma",
            "temperature_cdeg",
            "battery_mv",
            "strokes",
            "flags",
            "runs",
        ],
    ),
    "MotorStarted": (
        "<IHHIIQI",
        [
            "device_ms",
            "depth_set_um",
            "max_depth_um",
            "runs",
            "strokes",
            "cartridge_id",
            "cartridge_strokes",
        ],
    ),
    "MotorStopped": (
        "<IBIIHI",
        ["device_ms", "reason", "runs", "strokes", "peak_depth_um", "cartridge_strokes"],
    ),
    "Armed": (
        "<HHHHIIQI",
        [
            "token",
            "lease_ms",
            "depth_um",
            "max_depth_um",
            "runs",
            "strokes",
            "cartridge_id",
            "cartridge_strokes",
        ],
    ),
    "CartridgeInserted": ("<QI", ["cartridge_id", "cartridge_strokes"]),
    "CartridgeRemoved": ("<QI", ["cartridge_id", "cartridge_strokes"]),
    "Status": (
        "<BHHQBHHHIIIHHI",
        [
            "flags",
            "depth_set_um",
            "speed_hz",
            "cartridge_id",
            "fault",
            "lease_left_ms",
            "token",
            "arm_max_depth_um",
            "runs",
            "strokes",
            "cartridge_strokes",
            "telemetry_rate_hz",
            "lift_off_grace_ms",
            "device_ms",
        ],
    ),
}
V2_SIZES = {
    "Arm": 8, "Identity": 56, "Telemetry": 25, "MotorStarted": 28, "MotorStopped": 19,
    "Armed": 28, "CartridgeInserted": 12, "CartridgeRemoved": 12, "Status": 40,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(V2_LAYOUTS))
def test_version_2_layouts_are_exactly_the_agreed_ones(name: str) -> None:
    cls = next(row[1] for row in CATALOGUE if row[1].__name__ == name)
    fmt, names = V2_LAYOUTS[name]
    assert cls.FORMAT.format == fmt
    assert list(field_names(cls)) == names
    if name in V2_SIZES:
        assert cls.FORMAT.size == V2_SIZES[name]


def test_version_2_enumerations() -> None:
    assert PROTOCOL_VERSION == 2
    assert (StopReason.LINK_LOST, StopReason.NEW_HOST, StopReason.DEPTH_LIMIT) == (13, 14, 15)
    assert StopReason.DEPTH_LIMIT in FAULT_REASONS
    assert StopReason.LINK_LOST not in FAULT_REASONS
    assert StopReason.NEW_HOST not in FAULT_REASONS
    codes = (
        RefusalCode.SETPOINT_MISMATCH,
        RefusalCode.BAD_LIMIT,
        RefusalCode.ARMED,
        RefusalCode.MOTOR_RUNNING,
    )
    assert codes == (12, 13, 14, 15)
    assert TelemetryFlag.DEPTH_SET == 0x40


def test_the_identity_prefix_is_the_same_in_every_version() -> None:
    ident = Identity(2, b"PEN-7", 1, 2, 3, 9, SCHEMA_HASH, 2500, 2000, 77, *LIMITS)
    payload = encode_message(ident)
    prefix = decode_identity_prefix(payload)
    assert prefix == Identity(2, b"PEN-7" + bytes(7), 1, 2, 3, 9, SCHEMA_HASH, 2500, 2000, 77,
                              *([0] * len(LIMITS)))  # fmt: skip
    # A version 1 pen sends the prefix alone; its fields sit where version 2 has them.
    v1 = dataclasses.replace(ident, protocol_version=1)
    v1_payload = encode_identity(v1)
    assert len(v1_payload) == IDENTITY_PREFIX_SIZE == 32
    assert v1_payload[1:] == payload[1:IDENTITY_PREFIX_SIZE]
    assert decode_identity_prefix(v1_payload).serial_text == "PEN-7"
    assert encode_identity(ident) == payload
    with pytest.raises(MessageDecodeError, match="at least 32"):
        decode_identity_prefix(payload[:31])
    with pytest.raises(MessageDecodeError, match="Identity needs 56"):
        decode_message(Identity.TYPE, v1_payload)


@pytest.mark.parametrize(
    ("newer", "older", "diff"),
    [(5, 3, 2), (3, 3, 0), (0, 2**32 - 1, 1), (2, 2**32 - 3, 5), (3, 5, 2**32 - 2)],
)
def test_counter_diff_is_modulo_2_to_the_32(newer: int, older: int, diff: int) -> None:
    assert counter_diff(newer, older) == diff
