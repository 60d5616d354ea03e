"""The core-edge channel's framing: any split of the byte stream gives the same frames."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.channel.framing import FrameReader, FrameTooLargeError, encode_frame

frames_st = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=20)


@given(frames=frames_st, cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_frames_survive_any_split(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(kind, body) for kind, body in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    reader = FrameReader(max_frame=1024)
    got: list[tuple[int, bytes]] = []
    for a, b in itertools.pairwise(points):
        got += reader.feed(stream[a:b])
    assert got == frames
    assert reader.buffered == 0


def test_an_oversized_frame_is_refused_before_its_body_arrives() -> None:
    reader = FrameReader(max_frame=100)
    with pytest.raises(FrameTooLargeError) as info:
        reader.feed(encode_frame(1, bytes(200))[:5])
    assert info.value.size == 201 and info.value.limit == 100


def test_an_empty_length_is_refused() -> None:
    reader = FrameReader(max_frame=100)
    with pytest.raises(FrameTooLargeError):
        reader.feed(b"\0\0\0\0\x01")
