"""Names shared by the controller's stages (sessions, API, telemetry, ingest): one home each.

A fact that two stages must agree on is written here once and imported; a test
checks that the wire schemas use these names rather than copies.
"""

from __future__ import annotations

import enum
import re
from typing import Final

#: Identifiers the tablet and the wire carry (session ids, client references, zone ids):
#: letters, digits, ``. _ : -``, at most 64. Pseudonymous by rule: never a name.
ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}$"
ID_RE: Final = re.compile(ID_PATTERN)

#: The pen's absolute maximum depth (product.md §3): no policy, override or pen may exceed it.
DEVICE_CEILING_UM: Final = 2500
#: Stroke rate range of the pen hardware (product.md §3).
DEVICE_MIN_SPEED_HZ: Final = 50
DEVICE_MAX_SPEED_HZ: Final = 150


class EventKind(enum.StrEnum):
    """What a session event reports (tablet WebSocket, MQTT events stream, InfluxDB)."""

    SESSION_CREATED = "session_created"
    STATE_CHANGED = "state_changed"
    ZONE_SELECTED = "zone_selected"
    DEPTH_SET = "depth_set"
    SPEED_SET = "speed_set"
    ARMING = "arming"
    ARMED = "armed"
    DISARMED = "disarmed"
    PASS_STARTED = "pass_started"
    PASS_ENDED = "pass_ended"
    ZONE_COMPLETED = "zone_completed"
    OVERRIDE_APPLIED = "override_applied"
    STOP_SENT = "stop_sent"
    REFUSED = "refused"
    FAULT = "fault"
    CARTRIDGE_INSERTED = "cartridge_inserted"
    CARTRIDGE_REMOVED = "cartridge_removed"
    PEN_CONNECTED = "pen_connected"
    PEN_DISCONNECTED = "pen_disconnected"
    SESSION_REPORT = "session_report"
