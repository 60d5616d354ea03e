"""Counting per device and stream, against the sequence numbers the controller assigned.

The controller's outbox numbers each (device, stream) from 0 without gaps, so
``next_seq`` is exactly how many messages it made of that stream; InfluxDB's
``telemetry_batches`` (one point per batch) and ``events`` (one per event) carry
``seq``. A number missing there is a lost message; a number stored at two
timestamps would be a duplicate (redelivery rewrites the same point, so that is
the only way a duplicate can show).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from controller.influx import InfluxClient, InfluxSettings
from controller.telemetry.outbox import Outbox
from devtools.stack.processes import ServerProcess

STREAMS = {"telemetry": "telemetry_batches", "events": "events"}


@dataclass
class StreamCount:
    assigned: int  # numbers the controller gave out
    stored: int  # distinct numbers in InfluxDB
    points: int  # points in InfluxDB (more than stored: duplicates)
    first: int | None  # lowest number stored

    @property
    def lost(self) -> int:
        return self.assigned - self.stored

    @property
    def duplicated(self) -> int:
        return self.points - self.stored


def assigned(outbox: Outbox, devices: list[str]) -> dict[str, int]:
    """``"<device>/<stream>"`` -> how many numbers the controller gave out (outbox open)."""
    return {f"{d}/{s}": outbox.next_seq(d, s) for s in STREAMS for d in devices}


async def count_streams(influxd: ServerProcess, numbers: dict[str, int]) -> dict[str, StreamCount]:
    """``"<device>/<stream>"`` -> its count, for every entry of ``assigned()``."""
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database="pen")
    out: dict[str, StreamCount] = {}
    async with InfluxClient(settings) as client:
        for key, given in numbers.items():
            device, stream = key.split("/")
            measurement = STREAMS[stream]
            where = f"WHERE \"device\" = '{device}'"
            series = await client.query(
                f'SELECT COUNT("seq"), COUNT(DISTINCT("seq")), MIN("seq") '
                f'FROM "{measurement}" {where}'
            )
            row = series[0]["values"][0] if series else [0, 0, 0, None]
            out[key] = StreamCount(
                assigned=given,
                stored=int(row[2]),
                points=int(row[1]),
                first=None if row[3] is None else int(row[3]),
            )
    return out


def totals(counts: dict[str, StreamCount]) -> dict[str, int]:
    return {
        "assigned": sum(c.assigned for c in counts.values()),
        "stored": sum(c.stored for c in counts.values()),
        "lost": sum(c.lost for c in counts.values()),
        "duplicated": sum(c.duplicated for c in counts.values()),
    }


@dataclass
class PlainSubscriber:
    """A monitoring client on ``pen/v1/#`` (not shared), as issue 13 found one: it makes
    Mosquitto answer PUBACK 'success' whether or not ingest's subscription exists."""

    port: int
    payloads: list[tuple[str, bytes]] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    connects: int = 0

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5
                ) as client:
                    await client.subscribe("pen/v1/#", qos=1)
                    self.connects += 1
                    self.subscribed.set()
                    async for message in client.messages:
                        payload: Any = message.payload
                        self.payloads.append((str(message.topic), bytes(payload)))
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.1)

    def documents(self) -> list[tuple[str, Any]]:
        out = []
        for topic, payload in self.payloads:
            with contextlib.suppress(ValueError):
                out.append((topic, json.loads(payload)))
        return out
