"""The durable outbox: FIFO, bounds and overflow policy, survival of kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from controller.telemetry.outbox import NewMessage, Outbox, OverflowPolicy


def _msg(i: int, droppable: bool = True) -> NewMessage:
    return NewMessage(f"t/{i}", f"payload-{i:04d}".encode(), droppable=droppable)


def test_fifo_acknowledge_and_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert box.put_many(_msg(i) for i in range(10)) == 10
    first = box.pending(4)
    assert [m.topic for m in first] == ["t/0", "t/1", "t/2", "t/3"]
    assert [m.topic for m in box.pending(2, after_id=first[-1].id)] == ["t/4", "t/5"]
    box.acknowledge([m.id for m in first])
    assert box.counters.depth == 6
    assert box.counters.bytes == 6 * len(b"payload-0000")
    box.close()
    reopened = Outbox(tmp_path / "o.db")
    assert reopened.counters.depth == 6
    assert [m.topic for m in reopened.pending(10)] == [f"t/{i}" for i in range(4, 10)]


def test_drop_oldest_never_drops_events(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_messages=5, policy=OverflowPolicy.DROP_OLDEST)
    box.put(_msg(0, droppable=False))
    box.put_many(_msg(i) for i in range(1, 9))
    topics = [m.topic for m in box.pending(10)]
    assert topics == ["t/0", "t/5", "t/6", "t/7", "t/8"]
    assert box.counters.dropped_oldest == 4
    assert box.counters.rejected == 0
    # Only events left: a new event evicts nothing and is refused, and says so.
    events = Outbox(tmp_path / "e.db", max_messages=2)
    assert events.put_many(_msg(i, droppable=False) for i in range(3)) == 2
    assert events.counters.rejected == 1


def test_reject_new_keeps_the_oldest(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_messages=3, policy=OverflowPolicy.REJECT_NEW)
    assert box.put_many(_msg(i) for i in range(5)) == 3
    assert box.counters.rejected == 2
    assert box.put(_msg(9, droppable=False))  # an event still gets in, evicting telemetry
    assert [m.topic for m in box.pending(10)] == ["t/1", "t/2", "t/9"]


def test_byte_bound(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=3 * len(b"payload-0000"))
    box.put_many(_msg(i) for i in range(4))
    assert box.counters.depth == 3
    assert not box.put(NewMessage("big", b"x" * 10_000))


def test_survives_kill_9(tmp_path: Path) -> None:
    """Every message put() returned for is there after SIGKILL of the writer."""
    path = tmp_path / "o.db"
    writer = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from controller.telemetry.outbox import NewMessage, Outbox
        box = Outbox(Path({str(path)!r}))
        i = 0
        while True:
            box.put(NewMessage("t", str(i).encode()))
            print(i, flush=True)
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    last = -1
    for line in proc.stdout:
        last = int(line)
        if last >= 2000:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    box = Outbox(path)
    payloads = [int(m.payload) for m in box.pending(1_000_000)]
    assert payloads[: last + 1] == list(range(last + 1))  # nothing confirmed is lost
    assert payloads == list(range(len(payloads)))  # and nothing is torn or reordered


def test_stream_numbers_are_gapless_and_survive_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")

    def build(seq: int) -> NewMessage:
        return NewMessage("t", str(seq).encode())

    box.put_sequenced([("a", build), ("a", build), ("b", build)])
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert box.next_seq("a") == 2
    box.put_sequenced([("a", build)])
    assert [m.payload for m in box.pending(10)] == [b"0", b"1", b"0", b"2"]


def test_requeue_recent_puts_back_the_last_acknowledged_seconds(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", replay_s=2.0)
    box.put_many(_msg(i) for i in range(6))
    ids = [m.id for m in box.pending(10)]
    box.acknowledge(ids[:2], now=100.0)  # older than the window once the rest is acked
    box.acknowledge(ids[2:4], now=105.0)
    box.acknowledge(ids[4:5], now=106.5)
    assert box.counters.depth == 1
    box.close()
    # Reopened much later (the broker was down a long time): the window is measured
    # from the last acknowledgement, not from now.
    box = Outbox(tmp_path / "o.db", replay_s=2.0)
    assert box.requeue_recent() == 3
    assert [m.topic for m in box.pending(10)] == ["t/2", "t/3", "t/4", "t/5"]
    assert (box.counters.depth, box.counters.requeued) == (4, 3)
    assert box.counters.bytes == 4 * len(b"payload-0000")
    assert box.requeue_recent() == 0  # nothing acknowledged since
    box.acknowledge([m.id for m in box.pending(10)], now=200.0)
    assert box.counters.depth == 0


def test_without_a_replay_window_acknowledged_means_gone(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", replay_s=0)
    box.put_many(_msg(i) for i in range(3))
    box.acknowledge([m.id for m in box.pending(10)])
    assert box.requeue_recent() == 0
    assert box.pending(10) == []
