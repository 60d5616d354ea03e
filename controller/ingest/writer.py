"""One batch of received messages into InfluxDB: write, set aside what cannot be, acknowledge.

:meth:`BatchWriter.write` is what every concurrent writer of a worker runs for
one batch: write its lines (retrying while InfluxDB is unavailable, bisecting to
find single lines InfluxDB refuses), commit dead letters, derive the offline
statuses of the pens of controllers that went offline, and say which stream
entries of which controller are now durable (:func:`acks`). Acknowledging them
to the broker (PUBACK, in arrival order) and to the controllers (the ack topic)
is the worker's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt
import structlog

from ..influx import InfluxClient, InfluxError, InfluxRejected, InfluxUnavailable
from ..telemetry.schema import Ack, AckRange, ControllerStatus
from .deadletters import DeadLetter, DeadLetterStore
from .points import AckKey, MalformedMessage, Points, pen_offline_lines

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Received:
    """One message as the batcher parsed it: its points, or why it has none."""

    message: aiomqtt.Message
    points: Points | None
    malformed: MalformedMessage | None


class Counters(Protocol):
    """The counters a writer updates (controller.ingest.worker.IngestCounters)."""

    points_written: int
    written_at_ns: int
    write_retries: int
    write_rejections: int
    malformed: int
    rejected_points: int
    dead_letters: int
    newest_ts_ns: int
    pens_marked_offline: int
    by_reason: dict[str, int]


class BatchWriter:
    """Writes batches for one worker; safe to run several ``write()`` at once."""

    def __init__(
        self,
        influx: InfluxClient,
        dead: DeadLetterStore,
        counters: Counters,
        *,
        backoff_initial_s: float,
        backoff_max_s: float,
    ) -> None:
        self.influx = influx
        self.dead = dead
        self.counters = counters
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s

    async def write(self, batch: list[Received]) -> dict[tuple[str, str], list[AckKey]]:
        """Write one batch; returns the stream entries now durable, per (clinic, controller)."""
        lines: list[str] = []
        origin: list[int] = []  # batch index of each line
        newest = 0
        for i, received in enumerate(batch):
            if received.points is not None:
                lines.extend(received.points.lines)
                origin.extend([i] * len(received.points.lines))
                newest = max(newest, received.points.newest_ts_ns)
        refused = await self._write_bisecting(lines, 0)
        self._dead_letter(batch, lines, origin, refused)
        if len(refused) < len(lines):
            self.counters.newest_ts_ns = max(self.counters.newest_ts_ns, newest)
        for received in batch:
            if received.points is not None and received.points.offline is not None:
                await self._pens_offline(received.points.offline)
        # Written or dead-lettered: either way final, so acknowledged to the controller.
        durable: dict[tuple[str, str], list[AckKey]] = defaultdict(list)
        for received in batch:
            points = received.points
            if points is not None and points.controller is not None:
                durable[points.controller].extend(points.keys)
        return dict(durable)

    def _dead_letter(
        self,
        batch: list[Received],
        lines: list[str],
        origin: list[int],
        refused: list[tuple[int, str]],
    ) -> None:
        letters = [
            DeadLetter(
                str(r.message.topic), _payload(r.message), r.malformed.reason, r.malformed.detail
            )
            for r in batch
            if r.malformed is not None
        ]
        letters += [
            DeadLetter(
                str(batch[origin[i]].message.topic),
                _payload(batch[origin[i]].message),
                "rejected",
                f"{reason}\nline: {lines[i]}",
            )
            for i, reason in refused
        ]
        if not letters:
            return
        self.dead.add(letters)  # committed before anything is acknowledged
        for letter in letters:
            self.counters.by_reason[letter.reason] = (
                self.counters.by_reason.get(letter.reason, 0) + 1
            )
            log.warning(
                "dead_letter", topic=letter.topic, reason=letter.reason, detail=letter.detail[:300]
            )
        self.counters.malformed += sum(1 for r in batch if r.malformed is not None)
        self.counters.rejected_points += len(refused)
        self.counters.dead_letters += len(letters)

    async def _pens_offline(self, status: ControllerStatus) -> None:
        """A controller is offline (stopped, or its last will): so are the pens it served.

        InfluxDB is the memory shared by every worker of the group, so whichever
        worker receives the will finds the pens there: those whose newest status
        is online under this controller.
        """
        clinic = status.clinic.replace("'", "\\'")
        while True:
            try:
                series = await self.influx.query(
                    'SELECT LAST("online"), LAST("controller") FROM "device_status" '
                    f'WHERE "clinic" = \'{clinic}\' GROUP BY "device"'
                )
                break
            except InfluxUnavailable as exc:
                self.counters.write_retries += 1
                log.warning("influx_query_retry", error=str(exc)[:300])
                await asyncio.sleep(self.backoff_max_s)
            except InfluxError as exc:  # no status written yet, for instance
                log.info("no pen statuses to take offline", error=str(exc)[:300])
                return
        last: dict[str, tuple[bool, str | None]] = {}
        for s in series:
            device = s.get("tags", {}).get("device")
            row = s["values"][0] if s.get("values") else None
            if device and row:
                last[device] = (bool(row[1]), row[2])
        lines = pen_offline_lines(status, last)
        if lines:
            await self._write_retrying(lines)
            self.counters.pens_marked_offline += len(lines)
            log.info(
                "pens offline with their controller", controller=status.controller, pens=len(lines)
            )

    async def _write_bisecting(self, lines: list[str], offset: int) -> list[tuple[int, str]]:
        """Write lines; on InfluxRejected split to find the refused ones.

        Returns (index, reason) of each line InfluxDB refused on its own. The other
        lines are written (InfluxDB 1.x may already have written them in a partial
        write; writing them again is harmless).
        """
        if not lines:
            return []
        try:
            await self._write_retrying(lines)
            return []
        except InfluxRejected as exc:
            self.counters.write_rejections += 1
            if len(lines) == 1:
                return [(offset, str(exc))]
        half = len(lines) // 2
        return await self._write_bisecting(lines[:half], offset) + await self._write_bisecting(
            lines[half:], offset + half
        )

    async def _write_retrying(self, lines: list[str]) -> None:
        """Write until InfluxDB takes it; raises InfluxRejected only for bad data."""
        delay = self.backoff_initial_s
        while True:
            try:
                # Not "+= await": with concurrent writers that would lose updates.
                written = await self.influx.write(lines)
                self.counters.points_written += written
                self.counters.written_at_ns = time.time_ns()
                return
            except InfluxUnavailable as exc:
                problem = str(exc)
            except InfluxRejected as exc:
                if exc.status in (401, 403):
                    # Credentials, not data: dead-lettering would throw good points away.
                    problem = f"not authorised, waiting for an operator: {exc}"
                elif exc.status == 404 and "database not found" in exc.detail:
                    problem = str(exc)
                    with contextlib.suppress(InfluxError):
                        await self.influx.create_database()
                else:
                    raise
            self.counters.write_retries += 1
            log.warning(
                "influx_write_retry", error=problem[:300], points=len(lines), retry_in_s=delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)


def acks(durable: Mapping[tuple[str, str], Iterable[AckKey]], worker: str, ts_ns: int) -> list[Ack]:
    """One Ack per controller: the written entries of each of its streams, as ranges."""
    out = []
    for (clinic, controller), keys in sorted(durable.items()):
        seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
        for device, stream, seq in keys:
            seqs[(device, stream)].append(seq)
        if not seqs:
            continue
        out.append(
            Ack(
                clinic=clinic,
                controller=controller,
                worker=worker,
                ts_ns=ts_ns,
                ranges=[
                    AckRange.model_validate(
                        {"device": device, "stream": stream, "seqs": ranges(numbers)}
                    )
                    for (device, stream), numbers in sorted(seqs.items())
                ],
            )
        )
    return out


def ranges(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged ``[first, last]`` runs of a set of integers."""
    out: list[tuple[int, int]] = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def _payload(message: aiomqtt.Message) -> bytes:
    payload: Any = message.payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode()
