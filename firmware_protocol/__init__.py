"""The pen wire protocol, sans-I/O: framing, the message catalogue and the link state machine.

Bytes in, events out; messages in, bytes out; time is always an argument. See
PROTOCOL.md beside this file for the byte-level specification.
"""

from .connection import (
    Connected,
    Delivered,
    DeviceConnection,
    Event,
    HandshakeRefused,
    HostConnection,
    LinkBusyError,
    LinkConfig,
    LinkFailed,
    LinkState,
    LinkStats,
    MessageReceived,
    NotReadyError,
    PeerRebooted,
    ProtocolViolation,
)
from .framing import Frame, FrameDecoder, FrameKind, encode_frame
from .messages import PROTOCOL_VERSION, SCHEMA_HASH, decode_message, encode_message

__all__ = [
    "PROTOCOL_VERSION",
    "SCHEMA_HASH",
    "Connected",
    "Delivered",
    "DeviceConnection",
    "Event",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "HandshakeRefused",
    "HostConnection",
    "LinkBusyError",
    "LinkConfig",
    "LinkFailed",
    "LinkState",
    "LinkStats",
    "MessageReceived",
    "NotReadyError",
    "PeerRebooted",
    "ProtocolViolation",
    "decode_message",
    "encode_frame",
    "encode_message",
]
