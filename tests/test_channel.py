"""LossyChannel: seeded, pure fault injection for one direction of a cable."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulated_pen.channel import LossyChannel


def drain(ch: LossyChannel) -> bytes:
    out = b""
    while (t := ch.next_delivery()) is not None:
        out += ch.pull(t)
    return out


def test_clean_channel_delivers_everything_in_order_at_now_plus_delay() -> None:
    ch = LossyChannel(random.Random(1), delay=0.005)
    ch.push(b"abc", 1.0)
    ch.push(b"def", 1.001)
    assert ch.next_delivery() == pytest.approx(1.005)
    assert ch.pull(1.0049) == b""
    assert ch.pull(1.005) == b"abc"
    assert ch.next_delivery() == pytest.approx(1.006)
    assert ch.pull(5.0) == b"def"
    assert ch.next_delivery() is None
    assert ch.pull(6.0) == b""
    s = ch.stats
    assert (s.bytes_in, s.bytes_out, s.dropped, s.corrupted, s.duplicated, s.reordered) == (
        6,
        6,
        0,
        0,
        0,
        0,
    )


def test_zero_delay_is_available_at_once() -> None:
    ch = LossyChannel(random.Random(1))
    ch.push(b"x", 3.0)
    assert ch.next_delivery() == 3.0
    assert ch.pull(3.0) == b"x"


def test_same_seed_same_damage() -> None:
    def run(seed: int) -> tuple[bytes, object]:
        ch = LossyChannel(
            random.Random(seed),
            drop=0.05,
            corrupt=0.05,
            duplicate=0.2,
            reorder=0.2,
            delay=0.01,
            jitter=0.01,
        )
        out = b""
        for i in range(200):
            ch.push(bytes([i]) * 10, i * 0.002)
            out += ch.pull(i * 0.002)
        return out + drain(ch), ch.stats

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_uses_no_global_random_state() -> None:
    state = random.getstate()
    ch = LossyChannel(random.Random(3), drop=0.5, corrupt=0.5, duplicate=0.5, reorder=0.5)
    for i in range(100):
        ch.push(b"0123456789", i)
    drain(ch)
    assert random.getstate() == state


def test_drop_everything() -> None:
    ch = LossyChannel(random.Random(1), drop=1.0)
    ch.push(b"hello", 0.0)
    assert ch.next_delivery() is None
    assert ch.stats.dropped == 5
    assert ch.stats.bytes_out == 0


def test_drop_rate_is_per_byte() -> None:
    ch = LossyChannel(random.Random(11), drop=0.1)
    for i in range(1000):
        ch.push(bytes(100), float(i))
    assert 0.09 * 100_000 < ch.stats.dropped < 0.11 * 100_000
    assert len(drain(ch)) == 100_000 - ch.stats.dropped


def test_corruption_flips_exactly_one_bit_per_counted_byte() -> None:
    ch = LossyChannel(random.Random(5), corrupt=0.02)
    sent = bytes(random.Random(0).randbytes(50_000))
    for i in range(0, len(sent), 50):
        ch.push(sent[i : i + 50], 0.0)
    got = drain(ch)
    assert len(got) == len(sent)
    diffs = [a ^ b for a, b in zip(sent, got, strict=True) if a != b]
    assert all(d & (d - 1) == 0 for d in diffs)  # a single bit each
    assert len(diffs) == ch.stats.corrupted
    assert 0.015 * len(sent) < ch.stats.corrupted < 0.025 * len(sent)


def test_duplicate_delivers_a_chunk_twice_in_a_row() -> None:
    ch = LossyChannel(random.Random(1), duplicate=1.0)
    ch.push(b"ab", 0.0)
    ch.push(b"cd", 0.0)
    assert drain(ch) == b"ababcdcd"
    assert ch.stats.duplicated == 2
    assert ch.stats.duplicated_bytes == 4


def test_reorder_swaps_with_the_previous_chunk_in_flight() -> None:
    ch = LossyChannel(random.Random(1), reorder=1.0, delay=0.010)
    ch.push(b"1", 0.000)  # nothing in flight before it: cannot be reordered
    ch.push(b"2", 0.001)  # overtakes 1
    assert ch.pull(0.0105) == b"2"
    assert ch.pull(0.0115) == b"1"
    assert ch.stats.reordered == 1


def test_reorder_needs_something_in_flight() -> None:
    ch = LossyChannel(random.Random(1), reorder=1.0)
    for i in range(5):
        ch.push(bytes([i]), float(i))
        assert ch.pull(float(i)) == bytes([i])
    assert ch.stats.reordered == 0


def test_jitter_alone_never_reorders() -> None:
    ch = LossyChannel(random.Random(2), delay=0.001, jitter=0.050)
    sent = [bytes([i]) for i in range(200)]
    got = b""
    for i, chunk in enumerate(sent):
        ch.push(chunk, i * 0.001)
        got += ch.pull(i * 0.001)
        t = ch.next_delivery()
        assert t is None or t >= i * 0.001
    assert got + drain(ch) == b"".join(sent)


@given(
    st.integers(0, 2**32),
    st.lists(st.binary(max_size=40), max_size=40),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_byte_accounting(
    seed: int, chunks: list[bytes], drop: float, corrupt: float, dup: float, reorder: float
) -> None:
    ch = LossyChannel(
        random.Random(seed),
        drop=drop,
        corrupt=corrupt,
        duplicate=dup,
        reorder=reorder,
        delay=0.003,
        jitter=0.002,
    )
    out = b""
    for i, chunk in enumerate(chunks):
        ch.push(chunk, i * 0.001)
        assert ch.stats.bytes_in == sum(len(c) for c in chunks[: i + 1])
        out += ch.pull(i * 0.001)
    out += drain(ch)
    s = ch.stats
    assert s.bytes_out == len(out) == s.bytes_in - s.dropped + s.duplicated_bytes
    assert ch.in_flight == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"drop": -0.1}, {"corrupt": 1.5}, {"duplicate": 2}, {"reorder": -1}, {"delay": -1.0}],
)
def test_invalid_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"probability|negative"):
        LossyChannel(random.Random(0), **kwargs)
