"""Scenarios: a part of the local stack SIGKILLed mid-session, restarted by the stack (issue 13).

The local stack (devtools.stack.supervisor.LocalStack, as ``penctl demo`` runs it)
supervises mosquitto, influxd and the ingest worker. Four simulated pens treat
through a controller that publishes to the stack's broker as user ``controller``
(the stack's password file and ACL); one part is SIGKILLed twice, each time while
a pass is treated. Asserted, for each part:

* the stack restarts it, after the policy's backoff (0.25 s, then 0.5 s: the
  second death comes before the first replacement ran long enough to count as
  healthy), on the same port and state (same ingest worker id), its exit status
  read as SIGKILL;
* the treatment goes on: every pass counted, no session interrupted, faulted,
  stopped or disarmed, no pen link lost; the controller never stops;
* what was published meanwhile reaches InfluxDB once the part is back: counted
  per device and stream against the numbers the controller assigned
  (streams.py), 0 lost, 0 duplicated, every sample;
* a clean stop then ends every process the stack ever started.

Figures: restart delay (SIGKILL to the replacement ready), how long the exit
took to be noticed, acknowledgements flowing again, backoffs, lost, duplicated.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.contract import EventKind
from controller.influx import InfluxClient, InfluxSettings
from controller.safety.context import SessionState
from controller.telemetry.outbox import Outbox
from devtools.stack.supervision import Restart, SupervisedProcess
from devtools.stack.supervisor import MQTT_USERS, LocalStack

from ..controller_rig import eventually, start_rig, stop_rig
from .conftest import Record
from .figures import Figures
from .streams import assigned, count_streams, totals

PENS = 4
KILLS = 2
#: Hold each pass this long: the part is dead or restarting for most of it.
PASS_HOLD_S = 1.0
#: Nothing a telemetry part does may show up in a session as one of these.
DISTURBANCES = {
    EventKind.STATE_CHANGED,
    EventKind.FAULT,
    EventKind.STOP_SENT,
    EventKind.REFUSED,
    EventKind.DISARMED,
    EventKind.PEN_DISCONNECTED,
}


def _mqtt() -> dict[str, Any]:
    user, password = MQTT_USERS["controller"]
    # The stack's broker takes the demo's users only. Acknowledgement timeouts as in
    # the other end-to-end scenarios: the defaults suit a clinic, a test wants a verdict.
    return {
        "username": user,
        "password": password,
        "ack_timeout_s": 1.0,
        "ack_timeout_max_s": 4.0,
        "reorder_s": 1.0,
    }


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    """The local stack as the demo runs it: mosquitto, influxd, one ingest worker."""
    state = tmp_path / "stack"
    state.mkdir()
    stack = LocalStack(state)
    try:
        port, url = await stack.start_servers(0, 0)
        await stack.start_ingest(port, url)
        yield stack
    finally:
        await stack.stop()  # the test stops it first; this is for a test that failed


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def _back(
    child: SupervisedProcess, number: int, outbox: Outbox
) -> tuple[Restart, int, float]:
    """Once ``child``'s ``number``-th restart is ready: the restart, what the outbox
    held then, and when ingest next acknowledged something (data flowing again)."""
    restart = await asyncio.wait_for(child.restarted(number), 30)
    waiting, acked = outbox.counters.depth, outbox.counters.acknowledged
    await eventually(lambda: outbox.counters.acknowledged > acked, 30, "acknowledged again")
    return restart, waiting, time.monotonic()


@pytest.mark.parametrize("part", ["ingest", "mosquitto", "influxd"])
async def test_a_killed_part_is_restarted_and_the_treatment_goes_on(
    stack: LocalStack, tmp_path: Path, record: Record, part: str
) -> None:
    child = stack.children[part]
    broker, influxd = stack.servers["mosquitto"], stack.servers["influxd"]
    config_before = (stack.state_dir / "ingest.toml").read_text()
    rig, collector = await start_rig(tmp_path, pens=PENS, mqtt_port=broker.port, mqtt=_mqtt())
    assert rig.edge is not None and rig.edge.publisher is not None
    publisher, outbox = rig.edge.publisher, rig.edge.publisher.outbox
    kills: list[dict[str, float]] = []
    pids: set[int] = {c.pid for c in stack.children.values() if c.pid is not None}
    try:
        sids = [await rig.start_treating("cheeks", 1000, index=i) for i in range(PENS)]
        mark = len(rig.events)
        await eventually(lambda: outbox.counters.acknowledged >= 20, 30, "ingest acknowledging")
        began = time.monotonic()
        for n in range(KILLS):
            pid = child.pid
            assert pid is not None
            samples_before = rig.service.counters.telemetry
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            # A pass while the part is dead or restarting: counted all the same. Meanwhile
            # the part comes back, and acknowledgements from ingest flow again.
            _, (restart, waiting, flowing_at) = await asyncio.gather(
                rig.one_pass(index=n, hold=PASS_HOLD_S), _back(child, n + 1, outbox)
            )
            pids.add(restart.new_pid)
            kills.append(
                {
                    "exit_seen_ms": round((restart.exited_at - killed_at) * 1000, 1),
                    "backoff_s": restart.backoff_s,
                    "restart_delay_s": round(restart.ready_at - killed_at, 3),
                    "acknowledged_again_s": round(flowing_at - killed_at, 3),
                    "waiting_in_outbox_at_restart": waiting,
                    "samples_meanwhile": rig.service.counters.telemetry - samples_before,
                }
            )
        await rig.one_pass(index=KILLS)  # and the treatment carries on after it
        window = time.monotonic() - began
        disturbed = [e.kind for e in rig.events[mark:] if e.kind in DISTURBANCES]
        sessions = [rig.service.session(sid) for sid in sids]
        states = [s.state if s else None for s in sessions]
        passes = [s.zones["cheeks"].passes_done if s else -1 for s in sessions]
        await rig.finish(sids)
        await eventually(lambda: outbox.counters.depth == 0, 90, "all acknowledged")
        devices = sorted(p.serial for p in rig.service.pens.values() if p.serial)
        numbers = assigned(outbox, devices)
        samples = rig.service.counters.telemetry
        resent = publisher.window.counters
    finally:
        await stop_rig(rig, collector)
    counts = await count_streams(influxd, numbers)
    url = f"http://127.0.0.1:{influxd.port}"
    async with InfluxClient(InfluxSettings(url=url, database="pen")) as client:
        stored_samples = await client.count("telemetry", "depth_um")
    await stack.stop()
    left = sorted(pid for pid in pids if _alive(pid))
    sums = totals(counts)
    figures = record(
        Figures(
            scenario=f"{part} SIGKILLed, restarted by the local stack",
            injected=f"SIGKILL to the stack's {part} mid-session, during a pass; "
            "the stack's supervision restarts it",
            faults=KILLS,
            window_s=round(window, 2),
            unit="stream messages (telemetry batches + events), per device and stream",
            sent=sums["assigned"],
            received=sums["stored"],
            lost=sums["lost"],
            duplicated=sums["duplicated"],
            detail={
                "pens": PENS,
                "kills": kills,
                "restarts": [r.status for r in child.restarts],
                "passes": passes,
                "session_states": [str(s) for s in states],
                "disturbances": [str(k) for k in disturbed],
                "samples_sent": samples,
                "samples_stored": stored_samples,
                "resent_after_reconnect": resent.resent_reconnect,
                "resent_lost": resent.resent_lost,
                "resent_timeout": resent.resent_timeout,
                "processes_left_after_stop": left,
                "streams": {k: vars(c) for k, c in counts.items()},
            },
        )
    )
    # Restarted by the stack, by its policy, in the same place.
    assert [r.status for r in child.restarts] == ["killed by SIGKILL"] * KILLS
    assert [r.backoff_s for r in child.restarts] == [0.25, 0.5]
    assert all(k["exit_seen_ms"] < 200 for k in kills), kills  # awaited (was: polled at 0.5 s)
    assert (stack.state_dir / "ingest.toml").read_text() == config_before  # same worker id
    # The treatment went on: every pass counted, nothing interrupted.
    assert passes == [1 if i <= KILLS else 0 for i in range(PENS)]
    assert states == [SessionState.ACTIVE] * PENS
    assert disturbed == []
    assert all(k["samples_meanwhile"] > 0 for k in kills)
    assert all(k["waiting_in_outbox_at_restart"] > 0 for k in kills)  # the outage held data
    # What was published meanwhile reached InfluxDB once the part was back.
    assert all(c.assigned > 0 for c in counts.values()), counts
    assert (figures.lost, figures.duplicated) == (0, 0), counts
    assert all(c.first == 0 for c in counts.values())
    assert stored_samples == samples
    # A clean stop leaves no process behind, restarted ones included.
    assert left == []
