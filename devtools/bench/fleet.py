"""A controller process serving a farm of simulated pens: the reaction and capacity rig.

The pens run in a child process (``devtools.bench.pen_farm``), the controller
runs here, each on its own core, talking over real pseudo-terminals. A few
"breaching" pens are kept in treatment: each pass they send a breaching frame,
the controller stops them and faults their session, and this rig, playing the
therapist, acknowledges the fault and arms again, so reactions keep coming. The
other pens stream telemetry at 100 Hz, which the controller checks and (when a
broker is given) publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from controller.config import load_settings
from controller.policy import TreatmentPolicy, load_policy
from controller.safety.context import SessionState
from controller.service import ActionRefused, ControllerService
from controller.sessions import (
    AcknowledgeFault,
    Actor,
    ArmPen,
    CreateSession,
    EndSession,
    EventKind,
    ResumeSession,
    Role,
    SelectZone,
    SessionEvent,
    SetZoneDepth,
    StartSession,
)

THERAPIST = Actor("bench-therapist", Role.THERAPIST)
ZONES = [f"bench_{i:02d}" for i in range(1, 41)]
SESSION_PASSES = 20
DEPTH_UM = 1000


def bench_policy(directory: Path) -> TreatmentPolicy:
    """Many generous zones, so a breaching pen can be stopped hundreds of times."""
    # The product's packaged default, for its global limits; the zones are the bench's.
    source = resources.files("controller").joinpath("default_policy.toml")
    text = source.read_text("utf-8").split("[zones.", 1)[0]
    for zone in ZONES:
        text += f'\n[zones.{zone}]\nlabel = "{zone}"\nmax_depth_mm = 1.5\nmax_passes = 8\n'
    text += '\n[plans.bench]\nlabel = "bench"\nzones = [' + ", ".join(f'"{z}"' for z in ZONES)
    text += "]\n"
    path = directory / "bench_policy.toml"
    path.write_text(text)
    return load_policy(path)


@dataclass
class FleetResult:
    pens: int
    seconds: float
    reactions: list[float] = field(default_factory=list)
    telemetry_received: int = 0
    telemetry_lost: int = 0
    crc_errors: int = 0
    farm: dict[str, Any] = field(default_factory=dict)
    loop_lag_max: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.reactions:
            return float("nan")
        if len(self.reactions) == 1:
            return self.reactions[0]
        cuts = statistics.quantiles(self.reactions, n=1000, method="inclusive")
        return cuts[min(len(cuts) - 1, max(0, round(q * 1000) - 1))]


async def _read_until(stream: asyncio.StreamReader, marker: str) -> list[str]:
    lines: list[str] = []
    while True:
        raw = await stream.readline()
        if not raw:
            raise RuntimeError(f"pen farm ended before {marker!r}")
        line = raw.decode().strip()
        if line == marker:
            return lines
        lines.append(line)


Observer = Callable[[], Coroutine[Any, Any, None]]


async def run_fleet(
    pens: int,
    breachers: int,
    duration: float,
    mqtt_port: int | None = None,
    observer: Observer | None = None,
) -> FleetResult:
    """Run the rig for ``duration`` seconds of measurement and return what it saw.

    ``observer()``, if given, runs beside the measurement and is cancelled after it.
    """
    farm = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.bench.pen_farm",
        "--pens",
        str(pens),
        "--breachers",
        str(breachers),
        "--duration",
        str(duration + 15),
        stdout=asyncio.subprocess.PIPE,
    )
    assert farm.stdout is not None
    with tempfile.TemporaryDirectory(prefix="penctl-bench-") as tmp:
        try:
            lines = await asyncio.wait_for(_read_until(farm.stdout, "ready"), 60)
            urls = [line.split()[2] for line in lines if line.startswith("pen ")]
            settings = load_settings(
                None,
                state_dir=Path(tmp) / "state",
                pens=[{"url": url, "name": f"p{i + 1:03d}"} for i, url in enumerate(urls)],
                mqtt={"enabled": mqtt_port is not None, "port": mqtt_port or 1883},
            )
            service = ControllerService(settings, policy=bench_policy(Path(tmp)))
            await service.start()
            try:
                return await _measure(service, farm.stdout, pens, breachers, duration, observer)
            finally:
                await service.stop()
        finally:
            if farm.returncode is None:
                farm.terminate()
            await farm.wait()


async def _measure(
    service: ControllerService,
    farm_out: asyncio.StreamReader,
    pens: int,
    breachers: int,
    duration: float,
    observer: Observer | None = None,
) -> FleetResult:
    async with asyncio.timeout(60):
        for pen in service.pens.values():
            await pen.link.wait_ready()
        while any(service.registry.pen(p).cartridge_id is None for p in service.pens):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    ports = list(service.pens)[:breachers]
    sub = service.subscribe(100_000)
    sessions = {port: await _start_session(service, port) for port in ports}
    result = FleetResult(pens=pens, seconds=duration)
    keeper = asyncio.create_task(_keep_treating(service, sub.queue, sessions))
    lag = asyncio.create_task(_loop_lag(result))
    reader = asyncio.create_task(_read_reactions(farm_out, result))
    watcher = asyncio.create_task(observer() if observer else asyncio.sleep(0))
    baseline = _link_totals(service)
    started = time.perf_counter()
    try:
        await asyncio.sleep(duration)
    finally:
        for task in (keeper, lag, reader, watcher):
            task.cancel()
        await asyncio.gather(keeper, lag, reader, watcher, return_exceptions=True)
        service.unsubscribe(sub)
    result.seconds = time.perf_counter() - started
    totals = _link_totals(service)
    result.telemetry_received = totals[0] - baseline[0]
    result.telemetry_lost = totals[1] - baseline[1]
    result.crc_errors = totals[2] - baseline[2]
    return result


def _link_totals(service: ControllerService) -> tuple[int, int, int]:
    received = lost = crc = 0
    for pen in service.pens.values():
        stats = pen.link.conn.stats
        received += stats.frames_received
        lost += stats.unreliable_lost
        crc += stats.crc_errors
    return received, lost, crc


async def _start_session(service: ControllerService, port: str) -> str:
    sid = service.new_session_id()
    service.act(CreateSession(sid, port, f"bench-{port}", "bench", THERAPIST))
    service.act(StartSession(sid, THERAPIST))
    await _arm(service, sid)
    return sid


async def _arm(service: ControllerService, sid: str) -> None:
    """Whatever state the session is in, get its pen armed again.

    Reads only the gate context (cheap), never a copy of the session: the rig runs
    in the controller's process and must not stall it.
    """
    port = service.registry.port_of(sid)
    assert port is not None
    ctx = service.registry.gate_context(port)
    # Each act is its own turn of the event loop, as separate tablet requests are.
    if ctx.session_state is SessionState.FAULTED:
        service.act(AcknowledgeFault(sid, THERAPIST))
        await asyncio.sleep(0)
    elif ctx.session_state in (SessionState.INTERRUPTED, SessionState.PAUSED):
        service.act(ResumeSession(sid, THERAPIST))
        await asyncio.sleep(0)
    ctx = service.registry.gate_context(port)
    if ctx.zone is None or ctx.zone.passes_left == 0:
        used = ctx.zone.zone_id if ctx.zone else None
        zone = ZONES[(ZONES.index(used) + 1) % len(ZONES)] if used else ZONES[0]
        service.act(SelectZone(sid, zone, THERAPIST))
        await asyncio.sleep(0)
        ctx = service.registry.gate_context(port)
    if ctx.depth_setpoint_um is None:
        service.act(SetZoneDepth(sid, DEPTH_UM, THERAPIST))
        await asyncio.sleep(0)
    await service.act_and_wait(
        ArmPen(sid, THERAPIST), lambda e: e.kind == EventKind.ARMED and e.session_id == sid
    )


async def _keep_treating(
    service: ControllerService, queue: asyncio.Queue[Any], sessions: dict[str, str]
) -> None:
    """Play the therapist: re-arm a breaching pen as soon as it has been stopped, and
    after SESSION_PASSES passes end the session and start the next client's with the
    fresh cartridge the farm puts in (so sessions stay the size they have in a clinic)."""
    busy: dict[str, asyncio.Task[None]] = {}
    passes: dict[str, int] = dict.fromkeys(sessions, 0)

    async def rearm(port: str) -> None:
        with contextlib.suppress(ActionRefused, TimeoutError):
            await _arm(service, sessions[port])

    async def next_client(port: str) -> None:
        with contextlib.suppress(ActionRefused, TimeoutError):
            sessions[port] = await _start_session(service, port)
            passes[port] = 0

    try:
        while True:
            item = await queue.get()
            if not isinstance(item, SessionEvent) or item.port not in sessions:
                continue
            port = item.port
            if port in busy and not busy[port].done():
                continue
            if item.kind is EventKind.PASS_ENDED and item.session_id == sessions[port]:
                passes[port] += 1
            elif item.kind is EventKind.CARTRIDGE_INSERTED and passes[port] >= SESSION_PASSES:
                busy[port] = asyncio.create_task(next_client(port))
            elif item.kind is EventKind.DISARMED and item.session_id == sessions[port]:
                if passes[port] >= SESSION_PASSES:
                    with contextlib.suppress(ActionRefused):
                        service.act(EndSession(sessions[port], THERAPIST))
                else:
                    busy[port] = asyncio.create_task(rearm(port))
    finally:
        for task in busy.values():
            task.cancel()
        await asyncio.gather(*busy.values(), return_exceptions=True)


async def _read_reactions(stream: asyncio.StreamReader, result: FleetResult) -> None:
    while True:
        raw = await stream.readline()
        if not raw:
            return
        parts = raw.decode().split()
        if parts and parts[0] == "reaction":
            result.reactions.append(float(parts[2]))
        elif parts and parts[0] == "summary":
            result.farm = json.loads(raw.decode().split(" ", 1)[1])


async def _loop_lag(result: FleetResult) -> None:
    """How late the controller's event loop wakes up: the stall every pen shares."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(0.01)
        result.loop_lag_max = max(result.loop_lag_max, loop.time() - before - 0.01)
