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
#: CRC-32/ISO-HDLC of any byte string followed by its own CRC (little-endian). Checking
#: bytes 2 .. end of a frame against this constant verifies the CRC without reading it.
CRC_RESIDUE = 0x2144DF1C


class FrameKind(enum.IntEnum):
    """What a frame is for; decides how SEQ is read."""

    RELIABLE = 0  # SEQ: sender's reliable sequence number; receiver must ACK
    UNRELIABLE = 1  # SEQ: sender's unreliable stream counter; never ACKed
    ACK = 2  # SEQ: last reliable sequence number accepted in order (cumulative)
    NAK = 3  # SEQ: the reliable sequence number the receiver expects next
    SYNC = 4  # SEQ: sender's initial reliable sequence number (handshake)


_MAX_KIND = max(FrameKind)


class Frame(NamedTuple):
    """One frame that passed its CRC check."""

    kind: int
    seq: int
    msg_type: int
    payload: bytes


_new_frame = tuple.__new__  # builds a Frame without NamedTuple.__new__'s argument parsing


def encode_frame(kind: int, seq: int, msg_type: int, payload: bytes = b"") -> bytes:
    """Return the bytes of one frame. Raises ValueError on an oversize payload.

    ``seq`` is taken modulo 2**16; ``kind`` and ``msg_type`` must fit a byte
    (``struct.error`` otherwise).
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
    body = HEADER.pack(len(payload), kind, seq & 0xFFFF, msg_type) + payload
    return SYNC + body + crc32(body).to_bytes(4, "little")


@dataclass
class DecoderStats:
    """Counters of one FrameDecoder. ``bytes_in == discarded_bytes + frame bytes + pending``."""

    frames: int = 0
    bytes_in: int = 0
    discarded_bytes: int = 0  # bytes that were not part of an accepted frame
    crc_errors: int = 0  # candidate frames whose CRC failed
    header_errors: int = 0  # candidate frames with an impossible LEN or KIND


class FrameDecoder:
    """Incremental decoder. Feed any chunking of a byte stream; frames come out in order.

    Decoding a stream in arbitrary chunks yields exactly the frames that decoding it
    whole yields (a property the tests check): every decision about a candidate
    frame is taken only once all of its bytes are present.
    """

    def __init__(self) -> None:
        # Unconsumed bytes: at most one partial frame (< MAX_FRAME) or a lone 0xA5.
        self._tail = b""
        self.stats = DecoderStats()

    @property
    def pending(self) -> int:
        """Bytes held back until more input decides them (a partial frame)."""
        return len(self._tail)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume bytes; return the frames completed by them."""
        stats = self.stats
        stats.bytes_in += len(data)
        # Scan one immutable bytes object: joining the short tail is cheaper than
        # keeping a bytearray and deleting consumed bytes from its front.
        buf = self._tail + data if self._tail else bytes(data)
        n = len(buf)
        out: list[Frame] = []
        append = out.append
        find = buf.find
        pos = 0
        discarded = 0
        while True:
            i = find(SYNC, pos)
            if i < 0:
                # Keep a trailing first sync byte (its partner may be in the next chunk),
                # unless it is the last byte of the frame just accepted.
                keep = 1 if n > pos and buf[n - 1] == 0xA5 else 0
                discarded += n - keep - pos
                pos = n - keep
                break
            discarded += i - pos
            pos = i
            if n - i < HEADER_SIZE:
                break
            length = buf[i + 2]
            if length > MAX_PAYLOAD or buf[i + 3] > _MAX_KIND:
                stats.header_errors += 1
                discarded += 1
                pos = i + 1
                continue
            end = i + OVERHEAD + length
            if end > n:
                break
            if crc32(buf[i + 2 : end]) != CRC_RESIDUE:
                stats.crc_errors += 1
                discarded += 1
                pos = i + 1
                continue
            seq = buf[i + 4] | buf[i + 5] << 8
            append(_new_frame(Frame, (buf[i + 3], seq, buf[i + 6], buf[i + HEADER_SIZE : end - 4])))
            pos = end
        self._tail = buf[pos:] if pos < n else b""
        stats.discarded_bytes += discarded
        stats.frames += len(out)
        return out
