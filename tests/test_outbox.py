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
    box.delivered([m.id for m in first])
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

    def build(seqs: list[int]) -> NewMessage:
        return NewMessage("t", ",".join(map(str, seqs)).encode())

    box.put_numbered([("a", "telemetry"), ("a", "telemetry"), ("b", "telemetry")], build)
    box.put_numbered([("a", "events")], build)
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert box.next_seq("a", "telemetry") == 2
    box.put_numbered([("a", "telemetry")], build)
    assert [m.payload for m in box.pending(10)] == [b"0,1,0", b"0", b"2"]
    assert all(m.acked_end_to_end for m in box.pending(10))


def _bundle(box: Outbox, *devices: str) -> None:
    box.put_numbered(
        [(d, "telemetry") for d in devices], lambda seqs: NewMessage("b", repr(seqs).encode())
    )


def test_a_numbered_message_leaves_when_its_last_key_is_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    _bundle(box, "p1", "p2")  # p1/0, p2/0
    _bundle(box, "p1", "p2")  # p1/1, p2/1
    box.put(NewMessage("status", b"s", retain=True))
    first, second, status = box.pending(10)
    box.delivered([first.id, second.id])  # a PUBACK is not enough for numbered messages
    assert box.counters.depth == 3
    assert box.acknowledge_keys("p1", "telemetry", [(0, 1)]) == []  # p2 still missing
    assert box.acknowledge_keys("p2", "telemetry", [(0, 0)]) == [first.id]
    assert box.acknowledge_keys("p2", "telemetry", [(0, 0)]) == []  # twice: ignored
    assert box.acknowledge_keys("p9", "events", [(0, 99)]) == []  # unknown: ignored
    box.close()
    box = Outbox(tmp_path / "o.db")  # what is still owed survives a restart
    assert [m.id for m in box.pending(10)] == [second.id, status.id]
    assert box.waiting_for_broker() == 1
    assert box.acknowledge_many([("p2", "telemetry", [(1, 1)])]) == [second.id]
    box.delivered([status.id])
    assert (box.counters.depth, box.counters.bytes) == (0, 0)
    assert (box.counters.acknowledged, box.counters.delivered) == (1, 1)


def test_a_dropped_bundle_takes_its_keys_along(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_messages=2)
    for _ in range(3):
        _bundle(box, "p1")
    assert box.counters.dropped_oldest == 1
    assert box.acknowledge_keys("p1", "telemetry", [(0, 0)]) == []  # gone with its message
    assert len(box.acknowledge_keys("p1", "telemetry", [(1, 2)])) == 2
    assert box.counters.depth == 0
    assert box.next_seq("p1", "telemetry") == 3  # the dropped number is not reused


def test_get_returns_only_what_still_waits(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    _bundle(box, "p1")
    _bundle(box, "p1")
    ids = [m.id for m in box.pending(10)]
    box.acknowledge_keys("p1", "telemetry", [(0, 0)])
    assert [m.id for m in box.get(ids)] == ids[1:]
