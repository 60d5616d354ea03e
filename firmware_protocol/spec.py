"""The generated parts of PROTOCOL.md, rendered from the code so the two cannot drift.

PROTOCOL.md marks each generated section with ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->``; a test compares them with ``render_sections()``.
After changing the catalogue, an enum or LinkConfig, rewrite them with::

    python -m firmware_protocol.spec            # rewrite PROTOCOL.md in place
    python -m firmware_protocol.spec --check    # exit 1 if it is stale
"""

from __future__ import annotations

import enum
import re
import struct
import sys
from binascii import crc32
from collections.abc import Callable
from pathlib import Path

from .framing import CRC_RESIDUE, MAX_FRAME, MAX_PAYLOAD, OVERHEAD, FrameKind, encode_frame
from .link_config import LinkConfig
from .link_states import TRANSITIONS
from .messages import (
    CATALOGUE,
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    HostStopReason,
    RefusalCode,
    SetDepth,
    StopReason,
    TelemetryFlag,
    field_names,
    schema_text,
)

PROTOCOL_MD = Path(__file__).with_name("PROTOCOL.md")

_C_TYPES = {"B": "uint8", "H": "uint16", "h": "int16", "I": "uint32", "Q": "uint64"}

#: Unit and meaning of every message field, keyed by (message, field). A test checks that
#: every catalogue field is here, so a new field cannot reach the wire undocumented.
FIELD_DOCS: dict[tuple[str, str], str] = {
    ("Hello", "protocol_version"): "protocol version the host speaks",
    ("Hello", "host_nonce"): "random, non-zero, new for every link the host opens",
    ("SetDepth", "depth_um"): "µm; needle depth setpoint, 0 .. Identity.max_depth_um",
    ("SetSpeed", "rate_hz"): "Hz; stroke rate, Identity.min_speed_hz .. max_speed_hz",
    ("Arm", "lease_ms"): "ms; lease length, 1 .. Identity.max_lease_ms (host default 250)",
    ("Arm", "token"): "host-chosen id of this arming; Renew must quote it",
    ("Arm", "depth_um"): "µm; the setpoint the host approved; must equal the pen's own",
    ("Arm", "max_depth_um"): "µm; the deepest this arming may ever drive (the zone limit), "
    "depth_um .. Identity.max_depth_um",
    ("Renew", "token"): "token of the current arming; any other value is ignored",
    ("Stop", "reason"): "HostStopReason",
    ("SetTelemetryRate", "rate_hz"): "Hz; telemetry rate, 0 (off) .. "
    "Identity.max_telemetry_rate_hz",
    ("SetLiftOffGrace", "grace_ms"): "ms; how long skin contact may be lost before LIFT_OFF, "
    "0 .. Identity.max_lift_off_grace_ms",
    ("Identity", "protocol_version"): "protocol version the pen speaks",
    ("Identity", "serial"): "ASCII serial number, NUL-padded",
    ("Identity", "fw_major"): "firmware version, major",
    ("Identity", "fw_minor"): "firmware version, minor",
    ("Identity", "fw_patch"): "firmware version, patch",
    ("Identity", "boot_id"): "random, non-zero, new at every boot",
    ("Identity", "schema_hash"): "hash of the message catalogue the firmware was built from",
    ("Identity", "max_depth_um"): "µm; the pen's absolute depth ceiling",
    ("Identity", "max_lease_ms"): "ms; longest lease the pen accepts",
    ("Identity", "host_nonce"): "the Hello's nonce being answered; 0 in an announcement",
    ("Identity", "depth_accuracy_um"): "µm; a depth reading is within this of the true depth; "
    "the pen stops when a reading exceeds a limit by more",
    ("Identity", "min_speed_hz"): "Hz; slowest stroke rate SetSpeed accepts",
    ("Identity", "max_speed_hz"): "Hz; fastest stroke rate SetSpeed accepts",
    ("Identity", "default_speed_hz"): "Hz; stroke rate at boot",
    ("Identity", "max_telemetry_rate_hz"): "Hz; highest rate SetTelemetryRate accepts",
    ("Identity", "default_telemetry_rate_hz"): "Hz; telemetry rate at boot",
    ("Identity", "max_lift_off_grace_ms"): "ms; longest grace SetLiftOffGrace accepts",
    ("Identity", "default_lift_off_grace_ms"): "ms; lift-off grace at boot",
    ("Identity", "arm_battery_mv"): "mV; Arm is refused (LOW_BATTERY) below this",
    ("Identity", "low_battery_mv"): "mV; the armed pen stops (LOW_BATTERY) below this",
    ("Identity", "max_temperature_cdeg"): "0.01 °C; the armed pen stops (OVER_TEMPERATURE) "
    "above this",
    ("Identity", "rearm_temperature_cdeg"): "0.01 °C; Arm is refused (OVER_TEMPERATURE) above this",
    ("Telemetry", "device_ms"): "ms since boot (wraps)",
    ("Telemetry", "depth_set_um"): "µm; the pen's setpoint; meaningful only with DEPTH_SET",
    ("Telemetry", "depth_um"): "µm; measured depth",
    ("Telemetry", "speed_hz"): "Hz; measured stroke rate",
    ("Telemetry", "current_ma"): "mA; motor current",
    ("Telemetry", "temperature_cdeg"): "0.01 °C; temperature (signed)",
    ("Telemetry", "battery_mv"): "mV; battery voltage",
    ("Telemetry", "strokes"): "strokes since boot (wraps)",
    ("Telemetry", "flags"): "TelemetryFlag bits",
    ("Telemetry", "runs"): "motor runs since boot (wraps)",
    ("MotorStarted", "device_ms"): "ms since boot (wraps)",
    ("MotorStarted", "depth_set_um"): "µm; setpoint the run started with",
    ("MotorStarted", "max_depth_um"): "µm; the arming's max_depth_um",
    ("MotorStarted", "runs"): "motor runs since boot, this run counted (wraps)",
    ("MotorStarted", "strokes"): "strokes since boot at the start (wraps)",
    ("MotorStarted", "cartridge_id"): "the cartridge the run uses",
    ("MotorStarted", "cartridge_strokes"): "strokes on that cartridge at the start (wraps)",
    ("MotorStopped", "device_ms"): "ms since boot (wraps)",
    ("MotorStopped", "reason"): "StopReason",
    ("MotorStopped", "runs"): "motor runs since boot, this run counted (wraps)",
    ("MotorStopped", "strokes"): "strokes since boot at the stop (wraps)",
    ("MotorStopped", "peak_depth_um"): "µm; deepest measured depth during the run",
    ("MotorStopped", "cartridge_strokes"): "strokes on the run's cartridge at the stop (wraps)",
    ("Armed", "token"): "the Arm's token",
    ("Armed", "lease_ms"): "ms; the lease granted",
    ("Armed", "depth_um"): "µm; the setpoint armed (the Arm's depth_um)",
    ("Armed", "max_depth_um"): "µm; the arming's maximum (the Arm's max_depth_um)",
    ("Armed", "runs"): "motor runs since boot (wraps)",
    ("Armed", "strokes"): "strokes since boot (wraps)",
    ("Armed", "cartridge_id"): "the inserted cartridge",
    ("Armed", "cartridge_strokes"): "strokes on the inserted cartridge (wraps)",
    ("Disarmed", "reason"): "StopReason",
    ("CartridgeInserted", "cartridge_id"): "the cartridge's unique id (non-zero)",
    ("CartridgeInserted", "cartridge_strokes"): "strokes the cartridge's chip has recorded, "
    "on any pen (wraps)",
    ("CartridgeRemoved", "cartridge_id"): "id of the cartridge that left",
    ("CartridgeRemoved", "cartridge_strokes"): "strokes on it when it left (wraps)",
    ("CommandRefused", "msg_type"): "type id of the refused command",
    ("CommandRefused", "reason"): "RefusalCode",
    ("Status", "flags"): "TelemetryFlag bits",
    ("Status", "depth_set_um"): "µm; the pen's setpoint; meaningful only with DEPTH_SET",
    ("Status", "speed_hz"): "Hz; stroke rate setting",
    ("Status", "cartridge_id"): "inserted cartridge, 0 when none",
    ("Status", "fault"): "StopReason of the latched fault, 0 when none",
    ("Status", "lease_left_ms"): "ms; lease time left (rounded down), 0 when disarmed",
    ("Status", "token"): "the current arming's token, 0 when disarmed",
    ("Status", "arm_max_depth_um"): "µm; the current arming's max_depth_um, 0 when disarmed",
    ("Status", "runs"): "motor runs since boot (wraps)",
    ("Status", "strokes"): "strokes since boot (wraps)",
    ("Status", "cartridge_strokes"): "strokes on the inserted cartridge, 0 when none (wraps)",
    ("Status", "telemetry_rate_hz"): "Hz; telemetry rate setting",
    ("Status", "lift_off_grace_ms"): "ms; lift-off grace setting",
    ("Status", "device_ms"): "ms since boot when the Status was taken (wraps)",
}


def _fields(fmt: str) -> list[tuple[int, int, str]]:
    """(offset, size, C type) of each field of a little-endian struct format."""
    out = []
    offset = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
        n = int(count) if count else 1
        if code == "s":
            out.append((offset, n, f"char[{n}]"))
            offset += n
            continue
        size = struct.calcsize("<" + code)
        for _ in range(n):
            out.append((offset, size, _C_TYPES[code]))
            offset += size
    return out


def _hex(data: bytes) -> str:
    return " ".join(f"{b:02X}" for b in data)


def catalogue_table() -> str:
    lines = [
        "| type | message | direction | delivery | payload bytes |",
        "|---|---|---|---|---|",
    ]
    for type_id, cls, fmt, direction, delivery in CATALOGUE:
        size = struct.calcsize(fmt)
        lines.append(
            f"| `0x{type_id:02X}` | {cls.__name__} | {direction.value} "
            f"| {delivery.value} | {size} |"
        )
    return "\n".join(lines)


def field_layouts() -> str:
    parts = []
    for type_id, cls, fmt, _, _ in CATALOGUE:
        names = field_names(cls)
        size = struct.calcsize(fmt)
        head = f"#### `0x{type_id:02X}` {cls.__name__} ({size} byte{'' if size == 1 else 's'})"
        if not names:
            parts.append(f"{head}\n\nNo payload (LEN = 0).")
            continue
        rows = ["| offset | size | type | field | unit, meaning |", "|---|---|---|---|---|"]
        for (offset, size, ctype), name in zip(_fields(fmt), names, strict=True):
            doc = FIELD_DOCS[(cls.__name__, name)]
            rows.append(f"| {offset} | {size} | {ctype} | `{name}` | {doc} |")
        parts.append(head + "\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def _enum_table(cls: type[enum.Enum], fmt: Callable[[int], str]) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    rows = [
        f"**{cls.__name__}**" + (f": {doc}" if doc else ""),
        "",
        "| value | name |",
        "|---|---|",
    ]
    for member in cls:
        rows.append(f"| {fmt(member.value)} | `{member.name}` |")
    return "\n".join(rows)


def enum_tables() -> str:
    return "\n\n".join(
        [
            _enum_table(StopReason, str),
            _enum_table(RefusalCode, str),
            _enum_table(HostStopReason, str),
            _enum_table(TelemetryFlag, lambda v: f"`0x{v:02X}`"),
        ]
    )


def frame_example() -> str:
    msg = SetDepth(750)
    payload = msg.encode()
    seq = 0x0102
    frame = encode_frame(FrameKind.RELIABLE, seq, SetDepth.TYPE, payload)
    body = frame[2:-4]
    crc = crc32(body)
    ack = encode_frame(FrameKind.ACK, seq, 0)
    lines = [
        f"`SetDepth(depth_um=750)` sent reliably with SEQ = 0x{seq:04X}:",
        "",
        "```",
        _hex(frame),
        "```",
        "",
        "| bytes | field | value |",
        "|---|---|---|",
        f"| `{_hex(frame[0:2])}` | SYNC | |",
        f"| `{_hex(frame[2:3])}` | LEN | {len(payload)} |",
        f"| `{_hex(frame[3:4])}` | KIND | {FrameKind.RELIABLE.value} (RELIABLE) |",
        f"| `{_hex(frame[4:6])}` | SEQ | 0x{seq:04X} (little-endian) |",
        f"| `{_hex(frame[6:7])}` | MSG | 0x{SetDepth.TYPE:02X} (SetDepth) |",
        f"| `{_hex(payload)}` | PAYLOAD | depth_um = 750 (little-endian uint16) |",
        f"| `{_hex(frame[-4:])}` | CRC | 0x{crc:08X} = CRC-32 of `{_hex(body)}` |",
        "",
        "The pen's acknowledgement of it (KIND = ACK, SEQ = 0x0102, MSG = 0, no payload):",
        "",
        "```",
        _hex(ack),
        "```",
        "",
        f"CRC-32/ISO-HDLC check value: CRC of ASCII `123456789` = "
        f"`0x{crc32(b'123456789'):08X}`. Residue: the CRC computed over a frame's bytes "
        f"from LEN through its own CRC field is always `0x{CRC_RESIDUE:08X}`.",
    ]
    return "\n".join(lines)


def schema_section() -> str:
    return "\n".join(
        [
            f"PROTOCOL_VERSION = {PROTOCOL_VERSION}; SCHEMA_HASH = `0x{SCHEMA_HASH:08X}` "
            f"(on the wire, little-endian: `{_hex(SCHEMA_HASH.to_bytes(4, 'little'))}`).",
            "",
            "The hash is the first four bytes, read as a little-endian uint32, of the SHA-256 "
            "of this ASCII text (one line per message, each ending in LF):",
            "",
            "```",
            schema_text().rstrip("\n"),
            "```",
        ]
    )


def timing_table() -> str:
    c = LinkConfig()
    rows = [
        "| constant | default | meaning |",
        "|---|---|---|",
        f"| MAX_PAYLOAD | {MAX_PAYLOAD} bytes | largest payload; a frame is "
        f"{OVERHEAD} .. {MAX_FRAME} bytes |",
        f"| window | {c.window} | reliable messages in flight, unacknowledged, per direction |",
        f"| backlog | {c.backlog} | messages queued behind a full window (implementation limit) |",
        f"| ack_timeout | {c.ack_timeout * 1000:g} ms | first retransmit timeout |",
        f"| max_timeout | {c.max_timeout * 1000:g} ms | retransmit timeout ceiling (doubling) |",
        f"| max_retries | {c.max_retries} | resends without progress before the link fails |",
        f"| hello_timeout | {c.hello_timeout * 1000:g} ms | Hello resend interval |",
        f"| hello_retries | {c.hello_retries} | Hello resends before the handshake fails |",
        f"| announce_interval | {c.announce_interval * 1000:g} ms | least time between two "
        "announcements by a pen without a link |",
        "| peer_silence_timeout | off in the core; 300 ms in the controller | host only: no "
        "valid frame for this long while READY fails the link (telemetry at 100 Hz makes "
        "silence a reliable sign of a dead pen) |",
        "",
        "Derived: waits for an ACK are "
        + ", ".join(f"{t * 1000:g}" for t in c.retransmit_timeouts())
        + f" ms, so a reliable message sent into a dead link fails the link after "
        f"{c.reliable_failure_time() * 1000:g} ms; an unanswered handshake fails after "
        f"{c.handshake_failure_time() * 1000:g} ms.",
    ]
    return "\n".join(rows)


def state_table() -> str:
    rows = ["| end | state | input | next state |", "|---|---|---|---|"]
    for (role, state, event), new in TRANSITIONS.items():
        rows.append(f"| {role.value} | {state.name} | {event.value} | {new.name} |")
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "frame-example": frame_example,
    "catalogue": catalogue_table,
    "fields": field_layouts,
    "enums": enum_tables,
    "schema": schema_section,
    "timing": timing_table,
    "states": state_table,
}

_SECTION_RE = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)"
    r"(?P<body>.*?)"
    r"(<!-- END GENERATED: (?P=name) -->)",
    re.DOTALL,
)


def render_sections() -> dict[str, str]:
    """Every generated section's text, by name."""
    return {name: render() for name, render in SECTIONS.items()}


def read_sections(text: str) -> dict[str, str]:
    """The generated sections found in a PROTOCOL.md text, by name (bodies stripped)."""
    return {m["name"]: m["body"].strip("\n") for m in _SECTION_RE.finditer(text)}


def update(text: str) -> str:
    """``text`` with every generated section replaced by its current rendering."""
    sections = render_sections()

    def replace(m: re.Match[str]) -> str:
        return f"{m[1]}{sections[m['name']]}\n{m[4]}"

    return _SECTION_RE.sub(replace, text)


def main(argv: list[str]) -> int:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    new = update(text)
    if "--check" in argv:
        if new != text:
            print(f"{PROTOCOL_MD} is stale: run python -m firmware_protocol.spec", file=sys.stderr)
            return 1
        return 0
    if new != text:
        PROTOCOL_MD.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
