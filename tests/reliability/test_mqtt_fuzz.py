"""Scenario: fuzzed MQTT payloads into the ingest worker, among good ones.

Malformed messages of every kind (random bytes, truncated JSON, JSON of the wrong
shape, a required field of the wrong type, a device not matching its topic) are
published between good telemetry batches to a real mosquitto, ingested into a real
influxd. Counted: good and malformed messages published, dead letters, points
stored. Asserted: every malformed one dead-lettered and counted, the worker alive,
every good sample stored exactly once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from controller.ingest import IngestWorker
from controller.telemetry.schema import device_topic
from devtools.stack.processes import ServerProcess

from ..test_ingest import (
    ROOT,
    SAMPLES,
    Message,
    await_count,
    count,
    eventually,
    make_settings,
    now_t0,
    publish,
    running,
    telemetry_stream,
)
from .conftest import Record
from .figures import Figures

BAD = 200


def _mutations(rng: random.Random) -> list[Callable[[Message], Message]]:
    def random_bytes(m: Message) -> Message:
        return Message(m.topic, b"\xff" + rng.randbytes(rng.randrange(0, 200)))

    def truncated(m: Message) -> Message:
        return Message(m.topic, m.payload[: rng.randrange(1, len(m.payload))])

    def wrong_shape(m: Message) -> Message:
        shape = rng.choice([[], 7, "text", None, [json.loads(m.payload)]])
        return Message(m.topic, json.dumps(shape).encode())

    def wrong_type(m: Message) -> Message:
        doc = json.loads(m.payload)
        doc[rng.choice(["seq", "samples", "clinic", "device"])] = rng.choice(["x", None, {}])
        return Message(m.topic, json.dumps(doc).encode())

    def other_device(m: Message) -> Message:
        doc = json.loads(m.payload)
        topic = device_topic(ROOT, doc["clinic"], "pen-elsewhere", "telemetry")
        return Message(topic, m.payload)

    return [random_bytes, truncated, wrong_shape, wrong_type, other_device]


async def test_malformed_payloads_are_dead_lettered_and_good_ones_land_once(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path, record: Record
) -> None:
    rng = random.Random(99)
    t0 = now_t0()
    good = telemetry_stream(clinics=2, devices=2, batches=50, t0=t0)  # 200 msgs, 2000 samples
    # The malformed ones are damaged copies of batches that are never sent intact.
    spare = telemetry_stream(clinics=1, devices=1, batches=BAD, t0=t0, first=1000)
    mutations = _mutations(rng)
    kinds: dict[str, int] = {}
    bad = []
    for m in spare:
        mutate = rng.choice(mutations)
        kinds[mutate.__name__] = kinds.get(mutate.__name__, 0) + 1
        bad.append(mutate(m))
    mixed = [*good, *bad]
    rng.shuffle(mixed)
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "ingest"))
    async with running(worker) as task:
        await publish(mosquitto.port, mixed)
        await eventually(lambda: worker.counters.acked >= len(mixed), 30, "all acknowledged")
        await await_count(influxd, "telemetry", len(good) * SAMPLES, 30, field="depth_um")
        alive = not task.done()
    stored = await count(influxd, "telemetry", "depth_um")
    figures = record(
        Figures(
            scenario="fuzzed MQTT payloads",
            injected="malformed payloads among good telemetry batches: "
            + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())),
            faults=BAD,
            unit="telemetry samples in good messages",
            sent=len(good) * SAMPLES,
            received=stored,
            lost=max(0, len(good) * SAMPLES - stored),
            duplicated=max(0, stored - len(good) * SAMPLES),
            detail={
                "good_messages": len(good),
                "malformed_messages": BAD,
                "dead_letters": worker.counters.dead_letters,
                "malformed_counted": worker.counters.malformed,
                "by_reason": worker.counters.by_reason,
                "acked": worker.counters.acked,
                "worker_alive": alive,
            },
        )
    )
    assert figures.detail["worker_alive"]
    assert figures.detail["dead_letters"] == figures.detail["malformed_counted"] == BAD
    assert (figures.lost, figures.duplicated) == (0, 0)
    assert figures.received == figures.sent
