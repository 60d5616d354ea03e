"""Length-prefixed frames on the local channel between the safety core and the edge.

Sans-I/O: bytes in, frames out; frames in, bytes out. A frame is

    | 4 bytes: N, big-endian | 1 byte: kind | N - 1 bytes: body |

Why a hand-made framing over a Unix socket rather than a message library: the
channel joins two processes of the same program on one machine, the framing is
these few lines and is tested on its own, and the hot data (telemetry) is
already binary, so a general serialiser (msgpack, protobuf) would add a
dependency without removing work from the core.

A peer that announces a frame larger than ``max_frame`` is broken or hostile:
:class:`FrameTooLargeError` is raised and the connection must be closed.
"""

from __future__ import annotations

import struct
from typing import Final

_HEAD: Final = struct.Struct("!IB")
HEADER_SIZE: Final = _HEAD.size


class FrameTooLargeError(ValueError):
    """The peer announced a frame above the limit; ``size`` says how large."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a channel frame of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


def encode_frame(kind: int, body: bytes) -> bytes:
    """One frame: length, kind, body."""
    return _HEAD.pack(len(body) + 1, kind) + body


class FrameReader:
    """Accumulates received bytes and returns the complete frames, in order."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add ``data``; return every frame it completes as (kind, body)."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, bytes]] = []
        start = 0
        end = len(buffer)
        while end - start >= HEADER_SIZE:
            size, kind = _HEAD.unpack_from(buffer, start)
            if size < 1 or size > self.max_frame:
                raise FrameTooLargeError(size, self.max_frame)
            stop = start + 4 + size
            if stop > end:
                break
            frames.append((kind, bytes(buffer[start + HEADER_SIZE : stop])))
            start = stop
        if start:
            del buffer[:start]
        return frames
