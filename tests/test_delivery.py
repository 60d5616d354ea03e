"""The delivery window without I/O: what is sent again, and when, on a fake clock."""

from __future__ import annotations

import pytest

from controller.telemetry.delivery import DeliveryWindow


def test_the_window_bounds_what_is_unacknowledged() -> None:
    w = DeliveryWindow(max_in_flight=3)
    assert w.room() == 3
    w.sent([1, 2], now=0.0)
    assert w.room() == 1
    w.acked([1], now=0.1)
    assert (w.room(), w.in_flight) == (2, 1)
    w.forget([2])  # delivered on PUBACK: no acknowledgement expected
    assert w.room() == 3


def test_a_message_older_than_an_acknowledged_one_is_lost_after_the_reorder_window() -> None:
    w = DeliveryWindow(reorder_s=2.0, rto_s=100.0, rto_max_s=100.0)
    w.sent([1], now=0.0)
    w.sent([2], now=1.0)
    w.acked([2], now=1.5)  # round trip 0.5 s
    assert w.due(2.4) == []  # 1 may still be on its way through another worker
    assert w.next_deadline() == pytest.approx(0.0 + 0.5 + 2.0)
    assert w.due(2.5) == [1]
    assert w.counters.resent_lost == 1
    w.sent([1], now=2.5)  # its clock restarts: not lost again at once
    assert w.due(2.6) == []


def test_messages_sent_together_are_not_lost_for_each_other() -> None:
    w = DeliveryWindow(reorder_s=0.1, rto_s=100.0, rto_max_s=100.0)
    w.sent([1, 2], now=0.0)
    w.acked([2], now=0.05)
    assert w.due(50.0) == []


def test_timeouts_back_off_while_nothing_is_acknowledged_and_reset_on_progress() -> None:
    w = DeliveryWindow(rto_s=5.0, rto_max_s=20.0)
    w.sent([1, 2], now=0.0)
    assert w.due(4.9) == []
    assert w.next_deadline() == 5.0
    assert w.due(5.0) == [1, 2]
    w.sent([1, 2], now=5.0)
    assert w.rto_s == 10.0
    assert w.due(14.9) == []
    assert w.due(15.0) == [1, 2]
    w.sent([1, 2], now=15.0)
    assert w.due(35.0) == [1, 2]  # capped at rto_max_s
    w.sent([1, 2], now=35.0)
    assert w.rto_s == 20.0
    w.sent([3], now=36.0)
    w.acked([3], now=36.1)
    assert w.rto_s == 5.0
    assert w.counters.resent_timeout == 6


def test_a_reconnect_forgets_everything_in_flight() -> None:
    w = DeliveryWindow(max_in_flight=10)
    w.sent([1, 2, 3], now=0.0)
    assert w.reset() == 3
    assert (w.in_flight, w.room(), w.next_deadline()) == (0, 10, None)
    w.acked([1], now=1.0)  # an ack for a message of the old connection: harmless
    assert w.counters.acked == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="delivery window"):
        DeliveryWindow(rto_s=10, rto_max_s=5)
