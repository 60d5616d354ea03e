"""Frame codec: bytes <-> frames, with resynchronisation after garbage.

Wire layout of one frame (all integers little-endian)::

    offset  size  field
    0       1     SYNC0   0xA5
    1       1     SYNC1   0x5A
    2       1     LEN     payload length, 0..MAX_PAYLOAD
    3       1     KIND    FrameKind
    4       2     SEQ     u16, meaning depends on KIND
    6       1     MSG     message type id (0 for ACK/NAK)
    7       LEN   PAYLOAD
    7+LEN   4     CRC     CRC-32/ISO-HDLC (zlib) over bytes 2 .. 6+LEN

The decoder scans for the two sync bytes, checks LEN and KIND before waiting for
the rest of a frame (so a corrupt header cannot stall it for long), and accepts a
frame only when its CRC matches. On any failure it skips one byte past the sync
and scans again: that is the whole resynchronisation rule. Every byte that is not
part of an accepted frame is counted as discarded.

This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import struct
from binascii import crc32
from dataclasses import dataclass
from typing import NamedTuple

SYNC = b"\xa5\x5a"
MAX_PAYLOAD = 64
HEADER = struct.Struct("<BBHB")  # LEN, KIND, SEQ, MSG (after the sync bytes)
HEADER_SIZE = 2 + HEADER.size  # 7
CRC_SIZE = 4
OVERHEAD = HEADER_SIZE + CRC_SIZE  # 11
MAX_FRAME = OVERHEAD + MAX_PAYLOAD
# Never buffer more than this many undecodable bytes; a decoder fed only garbage
# keeps its memory bounded.
_MAX_BUFFER = 4 * MAX_FRAME


class FrameKind(enum.IntEnum):
    """What a frame is for; decides how SEQ is read."""

    RELIABLE = 0  # SEQ: sender's reliable sequence number; receiver must ACK
    UNRELIABLE = 1  # SEQ: sender's unreliable stream counter; never ACKed
    ACK = 2  # SEQ: last reliable sequence number accepted in order (cumulative)
    NAK = 3  # SEQ: the reliable sequence number the receiver expects next
    SYNC = 4  # SEQ: sender's initial reliable sequence number (handshake)


_VALID_KINDS = frozenset(int(k) for k in FrameKind)


class Frame(NamedTuple):
    """One frame that passed its CRC check."""

    kind: int
    seq: int
    msg_type: int
    payload: bytes


_new_frame = tuple.__new__


def encode_frame(kind: int, seq: int, msg_type: int, payload: bytes = b"") -> bytes:
    """Return the bytes of one frame. Raises ValueError on an oversize payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
    body = HEADER.pack(len(payload), kind, seq & 0xFFFF, msg_type) + payload
    return SYNC + body + crc32(body).to_bytes(4, "little")


@dataclass
class DecoderStats:
    frames: int = 0
    bytes_in: int = 0
    discarded_bytes: int = 0  # bytes that were not part of an accepted frame
    crc_errors: int = 0  # candidate frames whose CRC failed
    header_errors: int = 0  # candidate frames with an impossible LEN or KIND


class FrameDecoder:
    """Incremental decoder. Feed any chunking of a byte stream; frames come out in order.

    Decoding a stream in arbitrary chunks yields exactly the frames that decoding it
    whole yields (a property the tests check).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.stats = DecoderStats()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume bytes; return the frames completed by them."""
        stats = self.stats
        stats.bytes_in += len(data)
        buf = self._buf
        buf += data
        out: list[Frame] = []
        append = out.append
        find = buf.find
        unpack = HEADER.unpack_from
        n = len(buf)
        pos = 0
        with memoryview(buf) as view:
            while True:
                i = find(SYNC, pos)
                if i < 0:
                    # Keep a trailing first sync byte: its partner may be in the next chunk.
                    keep = 1 if n and buf[n - 1] == 0xA5 else 0
                    stats.discarded_bytes += n - keep - pos
                    pos = n - keep
                    break
                if i > pos:
                    stats.discarded_bytes += i - pos
                    pos = i
                if n - i < HEADER_SIZE:
                    break
                length, kind, seq, msg_type = unpack(buf, i + 2)
                if length > MAX_PAYLOAD or kind not in _VALID_KINDS:
                    stats.header_errors += 1
                    stats.discarded_bytes += 1
                    pos = i + 1
                    continue
                end = i + OVERHEAD + length
                if end > n:
                    break
                crc_at = end - CRC_SIZE
                if crc32(view[i + 2 : crc_at]) != int.from_bytes(view[crc_at:end], "little"):
                    stats.crc_errors += 1
                    stats.discarded_bytes += 1
                    pos = i + 1
                    continue
                payload = bytes(view[i + HEADER_SIZE : crc_at])
                append(_new_frame(Frame, (kind, seq, msg_type, payload)))
                pos = end
        if pos:
            del buf[:pos]
        if len(buf) > _MAX_BUFFER:  # cannot happen with MAX_PAYLOAD checks, kept as a guard
            stats.discarded_bytes += len(buf)
            buf.clear()
        stats.frames += len(out)
        return out
