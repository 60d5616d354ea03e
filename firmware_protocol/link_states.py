"""The link's states and the inputs that move them: one table, read top to bottom.

Anything not listed leaves the state unchanged. ``spec.py`` renders the table into
PROTOCOL.md, so the specification is the table the code runs.
"""

from __future__ import annotations

import enum


class Role(enum.Enum):
    HOST = "host"
    DEVICE = "device"


class LinkState(enum.Enum):
    IDLE = "idle"
    HANDSHAKING = "handshaking"
    READY = "ready"
    REFUSED = "refused"
    FAILED = "failed"


class Input(enum.Enum):
    START_HANDSHAKE = "start_handshake"
    IDENTITY_OK = "identity_ok"
    IDENTITY_MISMATCH = "identity_mismatch"
    RETRIES_EXHAUSTED = "retries_exhausted"
    PEER_REBOOTED = "peer_rebooted"
    PEER_LOST_LINK = "peer_lost_link"  # host: the pen announced itself while READY
    HELLO = "hello"


H, D = Role.HOST, Role.DEVICE
S = LinkState
# fmt: off
TRANSITIONS: dict[tuple[Role, LinkState, Input], LinkState] = {
    (H, S.IDLE,        Input.START_HANDSHAKE):   S.HANDSHAKING,
    (H, S.HANDSHAKING, Input.IDENTITY_OK):       S.READY,
    (H, S.HANDSHAKING, Input.IDENTITY_MISMATCH): S.REFUSED,
    (H, S.HANDSHAKING, Input.RETRIES_EXHAUSTED): S.FAILED,
    (H, S.READY,       Input.RETRIES_EXHAUSTED): S.FAILED,
    (H, S.READY,       Input.PEER_LOST_LINK):    S.FAILED,
    (H, S.READY,       Input.PEER_REBOOTED):     S.IDLE,
    (H, S.REFUSED,     Input.START_HANDSHAKE):   S.HANDSHAKING,
    (H, S.FAILED,      Input.START_HANDSHAKE):   S.HANDSHAKING,
    (D, S.IDLE,        Input.HELLO):             S.READY,
    (D, S.READY,       Input.HELLO):             S.READY,
    (D, S.READY,       Input.RETRIES_EXHAUSTED): S.IDLE,
}
# fmt: on
