"""Codec benchmark: frames per second encoded and decoded (product.md §10).

Telemetry frames are what a pen sends 100 times a second, so they are what is
measured. Decoding is fed in 64-byte reads, the packet size of USB full-speed
CDC (what a pen's serial port delivers), and in 4 KiB reads for comparison.
Every figure is the median of several runs; ``extra`` holds the spread.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable

from firmware_protocol.connection import (
    DeviceConnection,
    HostConnection,
    MessageReceived,
)
from firmware_protocol.framing import FrameDecoder, FrameKind, encode_frame
from firmware_protocol.messages import (
    Identity,
    Telemetry,
    decode_message,
    encode_message,
)
from simulated_pen.firmware import FirmwareConfig, declared_identity

from .framework import BenchContext, Row, rate, repeat_rates

DESCRIPTION = "wire codec: telemetry frames per second encoded and decoded"
#: Frame-level decoding must sustain this (frames/s, the issue's requirement).
DECODE_TARGET = 500_000
USB_READ = 64
BIG_READ = 4096


def _telemetry(rng: random.Random, n: int) -> list[Telemetry]:
    """Plausible, varied samples (values change the bytes, not the work)."""
    return [
        Telemetry(
            device_ms=10 * i,
            depth_set_um=1000,
            depth_um=rng.randrange(950, 1050),
            speed_hz=rng.randrange(95, 105),
            current_ma=rng.randrange(300, 600),
            temperature_cdeg=rng.randrange(3000, 3800),
            battery_mv=rng.randrange(3700, 4100),
            strokes=i,
            flags=0x57,
            runs=1,
        )
        for i in range(n)
    ]


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _timed(n: int, body: Callable[[], object]) -> float:
    start = time.perf_counter()
    body()
    return rate(n, time.perf_counter() - start)


def run(ctx: BenchContext) -> list[Row]:
    n = 20_000 if ctx.quick else 200_000
    repeats = 2 if ctx.quick else 5
    messages = _telemetry(random.Random(1), n)
    payloads = [encode_message(m) for m in messages]
    stream = b"".join(
        encode_frame(FrameKind.UNRELIABLE, i & 0xFFFF, Telemetry.TYPE, p)
        for i, p in enumerate(payloads)
    )
    frame_bytes = len(stream) // n
    small, big = _chunks(stream, USB_READ), _chunks(stream, BIG_READ)
    link_chunks = _chunks(_link_stream(messages), USB_READ)
    common = {"frames": n, "frame_bytes": frame_bytes}

    def encode_frames() -> None:
        unrel, tel = FrameKind.UNRELIABLE, Telemetry.TYPE
        for i, p in enumerate(payloads):
            encode_frame(unrel, i & 0xFFFF, tel, p)

    def encode_messages() -> None:
        unrel, tel = FrameKind.UNRELIABLE, Telemetry.TYPE
        for i, m in enumerate(messages):
            encode_frame(unrel, i & 0xFFFF, tel, encode_message(m))

    def decode_frames(chunks: list[bytes]) -> Callable[[], None]:
        def body() -> None:
            feed = FrameDecoder().feed
            got = 0
            for c in chunks:
                got += len(feed(c))
            assert got == n, "the decoder lost frames"

        return body

    def decode_messages() -> None:
        feed = FrameDecoder().feed
        got = 0
        for c in small:
            for f in feed(c):
                decode_message(f.msg_type, f.payload)
                got += 1
        assert got == n

    def link_receive() -> None:
        host = _ready_host()
        got = 0
        for c in link_chunks:
            for event in host.receive_data(c, 0.0):
                got += isinstance(event, MessageReceived)
        assert got == n, "the link lost telemetry"

    cases: list[tuple[str, Callable[[], object], dict[str, object]]] = [
        ("encode frame", encode_frames, {}),
        ("encode message+frame", encode_messages, {}),
        (
            f"decode frames ({USB_READ} B reads)",
            decode_frames(small),
            {"read_bytes": USB_READ, "target": DECODE_TARGET, "higher_is_better": True},
        ),
        (f"decode frames ({BIG_READ} B reads)", decode_frames(big), {"read_bytes": BIG_READ}),
        (f"decode frame+message ({USB_READ} B)", decode_messages, {"read_bytes": USB_READ}),
        (
            f"host link receive ({USB_READ} B)",
            link_receive,
            {"read_bytes": USB_READ, "path": "HostConnection.receive_data"},
        ),
    ]
    rows = []
    for name, body, extra in cases:
        with ctx.progress.task(name, repeats) as advance:
            value, spread = repeat_rates(functools.partial(_timed, n, body), repeats, advance)
        rows.append(Row(name, round(value), "frames/s", {**common, **extra, **spread}))
    return rows


def _identity() -> Identity:
    return declared_identity(FirmwareConfig(), serial="BENCH", boot_id=1)


def _pair() -> tuple[HostConnection, DeviceConnection]:
    host, device = HostConnection(), DeviceConnection(_identity())
    host.start_handshake(1, 0.0)
    device.receive_data(host.data_to_send(), 0.0)
    host.receive_data(device.data_to_send(), 0.0)
    return host, device


def _link_stream(messages: list[Telemetry]) -> bytes:
    """What a pen's DeviceConnection writes for these samples on a fresh link."""
    _, device = _pair()
    for m in messages:
        device.send(m, 0.0)
    return device.data_to_send()


def _ready_host() -> HostConnection:
    host, _ = _pair()
    return host
