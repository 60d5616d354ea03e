"""Frame codec: layout, CRC, resynchronisation, chunking and byte accounting."""

from __future__ import annotations

from binascii import crc32

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol.framing import (
    CRC_RESIDUE,
    MAX_FRAME,
    MAX_PAYLOAD,
    OVERHEAD,
    Frame,
    FrameDecoder,
    FrameKind,
    encode_frame,
)

frames_st = st.builds(
    Frame,
    kind=st.sampled_from(list(FrameKind)).map(int),
    seq=st.integers(0, 0xFFFF),
    msg_type=st.integers(0, 255),
    payload=st.binary(max_size=MAX_PAYLOAD),
)


def enc(frame: Frame) -> bytes:
    return encode_frame(frame.kind, frame.seq, frame.msg_type, frame.payload)


def decode_all(data: bytes) -> tuple[list[Frame], FrameDecoder]:
    decoder = FrameDecoder()
    return decoder.feed(data), decoder


def assert_accounting(decoder: FrameDecoder, frames: list[Frame]) -> None:
    frame_bytes = sum(OVERHEAD + len(f.payload) for f in frames)
    s = decoder.stats
    assert s.discarded_bytes + frame_bytes + decoder.pending == s.bytes_in
    assert s.frames == len(frames)
    assert decoder.pending < MAX_FRAME


def test_crc_is_crc32_iso_hdlc() -> None:
    assert crc32(b"123456789") == 0xCBF43926  # the catalogued check value


def test_frame_layout_matches_the_spec() -> None:
    frame = encode_frame(FrameKind.RELIABLE, 0x0102, 0x10, b"\xee\x02")
    assert frame.hex(" ").upper() == "A5 5A 02 00 02 01 10 EE 02 6C E6 5A FA"
    body = frame[2:-4]
    assert int.from_bytes(frame[-4:], "little") == crc32(body)
    assert crc32(frame[2:]) == CRC_RESIDUE


@given(frames_st)
def test_crc_residue_holds_for_every_frame(frame: Frame) -> None:
    assert crc32(enc(frame)[2:]) == CRC_RESIDUE


def test_oversize_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="MAX_PAYLOAD"):
        encode_frame(FrameKind.RELIABLE, 0, 1, bytes(MAX_PAYLOAD + 1))


def test_sequence_number_is_taken_modulo_2_16() -> None:
    frames, _ = decode_all(encode_frame(FrameKind.ACK, 0x1_0005, 0))
    assert frames == [Frame(FrameKind.ACK, 5, 0, b"")]


@given(st.lists(frames_st, max_size=8))
def test_round_trip_back_to_back(frames: list[Frame]) -> None:
    decoded, decoder = decode_all(b"".join(enc(f) for f in frames))
    assert decoded == frames
    assert decoder.stats.discarded_bytes == 0
    assert_accounting(decoder, decoded)


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_nor_yield_a_frame_that_is_not_there(data: bytes) -> None:
    decoded, decoder = decode_all(data)
    for frame in decoded:
        raw = enc(frame)
        assert raw in data
        assert crc32(raw[2:]) == CRC_RESIDUE
    assert_accounting(decoder, decoded)


@st.composite
def damaged_streams(draw: st.DrawFn) -> tuple[bytes, list[Frame], list[bytes]]:
    """Valid frames with garbage between them and bit flips anywhere.

    Returns the damaged stream, the frames whose bytes survived intact, and the
    encodings of every original frame.
    """
    frames = draw(st.lists(frames_st, min_size=1, max_size=6))
    parts: list[bytes] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for frame in frames:
        garbage = draw(st.binary(max_size=12))
        raw = enc(frame)
        parts += [garbage, raw]
        start = pos + len(garbage)
        spans.append((start, start + len(raw)))
        pos = start + len(raw)
    stream = bytearray(b"".join(parts))
    flips = draw(st.lists(st.integers(0, len(stream) * 8 - 1), max_size=6))
    for bit in flips:
        stream[bit // 8] ^= 1 << (bit % 8)
    hit = {bit // 8 for bit in flips}
    intact = [
        f for f, (a, b) in zip(frames, spans, strict=True) if not any(a <= i < b for i in hit)
    ]
    return bytes(stream), intact, [enc(f) for f in frames]


@settings(max_examples=300)
@given(damaged_streams())
def test_bit_flipped_frames_are_rejected_and_intact_ones_survive(
    case: tuple[bytes, list[Frame], list[bytes]],
) -> None:
    stream, intact, _ = case
    # Trailing padding lets a candidate with a corrupted, too-large LEN be decided.
    data = stream + bytes(MAX_FRAME)
    decoded, decoder = decode_all(data)
    for frame in decoded:
        raw = enc(frame)
        assert raw in data
        assert crc32(raw[2:]) == CRC_RESIDUE
    # Every intact frame is found, in order (a damaged neighbour never hides it).
    it = iter(decoded)
    assert all(any(f == g for g in it) for f in intact)
    assert_accounting(decoder, decoded)
    assert decoder.pending == 0


@given(st.lists(frames_st, min_size=1, max_size=5), st.data())
def test_truncated_stream_yields_exactly_the_complete_frames(
    frames: list[Frame], data: st.DataObject
) -> None:
    raws = [enc(f) for f in frames]
    stream = b"".join(raws)
    cut = data.draw(st.integers(0, len(stream)))
    decoded, decoder = decode_all(stream[:cut])
    ends = [sum(len(r) for r in raws[: i + 1]) for i in range(len(raws))]
    assert decoded == [f for f, end in zip(frames, ends, strict=True) if end <= cut]
    assert_accounting(decoder, decoded)


def test_split_at_every_boundary_equals_whole() -> None:
    stream = (
        b"\x00\xa5"
        + enc(Frame(0, 0xFFFF, 0x82, bytes(range(21))))
        + b"\xa5\x5a\xff"  # sync then an impossible LEN
        + enc(Frame(2, 7, 0, b""))
        + b"\xa5"
        + enc(Frame(4, 1, 0x01, b"\xa5\x5a\xa5\x5a\x01"))  # sync bytes inside a payload
        + b"\xa5"
    )
    whole, whole_decoder = decode_all(stream)
    assert len(whole) == 3
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        parts = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert parts == whole, cut
        assert decoder.stats == whole_decoder.stats, cut
        assert decoder.pending == whole_decoder.pending == 1  # the trailing A5


@settings(max_examples=200)
@given(
    st.lists(st.one_of(frames_st.map(enc), st.binary(max_size=20)), max_size=10),
    st.lists(st.integers(1, 40), min_size=1, max_size=50),
)
def test_chunked_decoding_equals_whole(pieces: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(pieces)
    whole, whole_decoder = decode_all(stream)
    decoder = FrameDecoder()
    chunked: list[Frame] = []
    pos = 0
    i = 0
    while pos < len(stream):
        size = sizes[i % len(sizes)]
        chunked += decoder.feed(memoryview(stream)[pos : pos + size])
        pos += size
        i += 1
    assert chunked == whole
    assert decoder.stats == whole_decoder.stats
    assert decoder.pending == whole_decoder.pending
    assert_accounting(decoder, chunked)


def test_one_byte_at_a_time() -> None:
    frame = Frame(1, 42, 0x82, b"x" * MAX_PAYLOAD)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for b in b"junk" + enc(frame) + enc(frame):
        out += decoder.feed(bytes([b]))
    assert out == [frame, frame]
    assert decoder.stats.discarded_bytes == 4


def test_frame_ending_in_a5_is_not_kept_as_a_sync_byte() -> None:
    # Regression: a frame whose last CRC byte is 0xA5 left that byte behind as a
    # possible sync start, counted -1 discarded bytes, and a following 0x5A then
    # made a phantom candidate out of it.
    payload = next(
        p for i in range(10_000) if enc(Frame(1, 0, 0x82, p := i.to_bytes(2, "little")))[-1] == 0xA5
    )
    frame = enc(Frame(1, 0, 0x82, payload))
    decoder = FrameDecoder()
    assert decoder.feed(frame) == [Frame(1, 0, 0x82, payload)]
    assert decoder.pending == 0
    assert decoder.stats.discarded_bytes == 0
    assert decoder.feed(b"\x5a\x00\x00") == []
    assert decoder.stats.crc_errors + decoder.stats.header_errors == 0
    assert decoder.stats.discarded_bytes == 3


def test_header_errors_and_crc_errors_are_counted_and_skipped_one_byte() -> None:
    good = enc(Frame(0, 1, 0x10, b"\x01\x02"))
    bad_len = b"\xa5\x5a\x41\x00\x00\x00\x10"  # LEN 65
    bad_kind = b"\xa5\x5a\x00\x05\x00\x00\x10"  # KIND 5
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0x80
    decoded, decoder = decode_all(bad_len + bad_kind + bytes(bad_crc) + good)
    assert decoded == [Frame(0, 1, 0x10, b"\x01\x02")]
    assert decoder.stats.header_errors == 2
    assert decoder.stats.crc_errors == 1
    assert decoder.stats.discarded_bytes == len(bad_len) + len(bad_kind) + len(bad_crc)


def test_frame_hidden_inside_a_rejected_candidate_is_found() -> None:
    # A corrupted header claims a long payload that swallows the real frame after it;
    # after the CRC fails the decoder rescans from one byte on and finds it.
    inner = enc(Frame(2, 9, 0, b""))
    data = b"\xa5\x5a\x30\x00\x00\x00\x10" + inner + bytes(60)
    decoded, decoder = decode_all(data)
    assert decoded == [Frame(2, 9, 0, b"")]
    assert decoder.stats.crc_errors == 1


def test_garbage_only_keeps_memory_bounded() -> None:
    decoder = FrameDecoder()
    for _ in range(200):
        assert decoder.feed(b"\xa5\x5a\x40\x00" + bytes(500)) == []
        assert decoder.pending < MAX_FRAME
    assert decoder.stats.discarded_bytes + decoder.pending == decoder.stats.bytes_in
