"""A controller process serving a farm of simulated pens: the reaction and capacity rig.

The pens run in a child process (``devtools.bench.pen_farm``), the controller's
safety core runs here, each on its own core, talking over real pseudo-terminals;
the farm runs at real-time priority where allowed (see ``prioritise_pens``).
With MQTT or an API flood, the core's edge runs as under ``penctl serve``: a
process of its own, started and supervised by the core (controller/edge/); a
flood comes from a third process (``devtools.bench.api_flood``). A slow disk is
a journal whose every commit takes ``slow_disk_s`` longer. A few
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
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from controller.config import ServiceSettings, load_settings
from controller.cpus import move_off_core, unpin
from controller.edge.supervisor import EdgeSupervisor
from controller.errors import ActionRefused
from controller.live import PenView
from controller.policy import TreatmentPolicy, load_policy
from controller.safety.context import LinkStatus
from controller.service import ControllerService
from controller.sessions import Actor, EventKind, Role
from devtools.bench.pen_farm import IDLE_SWAP_S
from devtools.stack.processes import free_port, wait_for_port
from devtools.therapist import EventFeed, Therapist

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
    flood: dict[str, Any] = field(default_factory=dict)
    loop_lag_max: float = 0.0
    farm_priority: str = "normal"

    @property
    def lease_expiries(self) -> int:
        """Leases that ran out at a pen: a renewal the core did not send in time."""
        return int(self.farm.get("lease_expiries", 0))

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
    *,
    flood: bool = False,
    slow_disk_s: float = 0.0,
    core_cpus: Sequence[int] = (),
) -> FleetResult:
    """Run the rig for ``duration`` seconds of measurement and return what it saw.

    ``observer()``, if given, runs beside the measurement and is cancelled after it.
    ``flood``: a hostile client floods the tablet API throughout. ``slow_disk_s``:
    every journal commit takes that much longer. ``core_cpus``: the core runs
    there alone (its ``core_cpus`` setting); the pen farm, the edge and the flood
    run on the other CPUs, as the pens and the client would on other hardware.
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
        # A slow disk delays every re-arming by a few commits: the farm must not take
        # that for a session's end and swap the cartridge under the arming.
        "--idle-swap",
        str(IDLE_SWAP_S + 5 * slow_disk_s),
        stdout=asyncio.subprocess.PIPE,
    )
    move_off_core(farm.pid, core_cpus)
    # Only beside a pinned core: unpinned (capacity), a real-time farm of hundreds of
    # pens would take a whole CPU from whatever the scheduler put there, the core too.
    priority = prioritise_pens(farm.pid) if core_cpus else "normal"
    assert farm.stdout is not None
    with tempfile.TemporaryDirectory(prefix="penctl-bench-") as tmp:
        try:
            lines = await asyncio.wait_for(_read_until(farm.stdout, "ready"), 60)
            urls = [line.split()[2] for line in lines if line.startswith("pen ")]
            api_port = free_port() if flood else 0
            settings = load_settings(
                None,
                state_dir=Path(tmp) / "state",
                pens=[{"url": url, "name": f"p{i + 1:03d}"} for i, url in enumerate(urls)],
                mqtt={"enabled": mqtt_port is not None, "port": mqtt_port or 1883},
                api={"enabled": flood, "port": api_port, "demo_users": True},
                core_cpus=list(core_cpus),
            )
            # With its channel even where no edge runs: a deployed core always has one,
            # and pays for it on every sample.
            service = ControllerService(settings, policy=bench_policy(Path(tmp)))
            if slow_disk_s:
                _slow_journal(service, slow_disk_s)
            await service.start()
            edge = None
            try:
                if settings.runs_edge:
                    edge = await _start_edge(settings, service.socket_path)
                flooded: dict[str, Any] = {}
                if flood:
                    url = f"http://127.0.0.1:{api_port}"
                    observer = _flooding(url, duration, observer, flooded, core_cpus)
                result = await _measure(service, farm.stdout, pens, breachers, duration, observer)
                result.flood = flooded
                result.farm_priority = priority
                return result
            finally:
                if edge is not None:
                    await edge.stop()
                await service.stop()
                unpin()  # the benchmarks after this one run anywhere again
        finally:
            if farm.returncode is None:
                farm.terminate()
            await farm.wait()


#: The pen farm's real-time priority (SCHED_FIFO), when the machine allows it.
PENS_RT_PRIORITY = 10


def prioritise_pens(pid: int) -> str:
    """Let the pen farm run the moment a frame reaches it; what it got, for the rows.

    The farm stands for pens, each a microcontroller of its own; on this machine it
    shares a CPU with the edge and the flood. At an ordinary priority a busy edge
    delays the farm's reading of a Stop by a time slice, and that delay, which the
    pens would never see, lands in the reaction figure. Real-time scheduling keeps
    the apparatus out of what is measured (the farm uses about a quarter of a CPU).
    Without the privilege it falls back to a raised niceness, or leaves it as is.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(PENS_RT_PRIORITY))
        return f"SCHED_FIFO {PENS_RT_PRIORITY}"
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, pid, -10)
        return "nice -10"
    except OSError:
        return "normal (no privilege to raise it)"


async def _start_edge(settings: ServiceSettings, socket: str) -> EdgeSupervisor:
    edge = EdgeSupervisor(settings, socket)
    await edge.start()
    if settings.api.enabled:
        await wait_for_port("127.0.0.1", settings.api.port, within=60)
    return edge


def _slow_journal(service: ControllerService, delay_s: float) -> None:
    """Every journal commit ``delay_s`` late (on the writer's thread, as a slow disk is)."""
    write = service.journal.write
    pause = threading.Event()

    def slow(rows: Any) -> None:
        pause.wait(delay_s)
        write(rows)

    service.journal.write = slow  # type: ignore[method-assign]


#: The hostile client stands for a tablet or a laptop on the clinic's network: its own
#: CPU would not be the controller's. On this one machine it runs niced, so what the
#: flood measures is what the edge's work costs the core, not the attacker's CPU.
FLOOD_NICENESS = 15


def _flooding(
    url: str,
    seconds: float,
    observer: Observer | None,
    summary: dict[str, Any],
    core_cpus: Sequence[int] = (),
) -> Observer:
    """An observer that floods ``url`` from another process for ``seconds`` (beside
    ``observer``); the flood's own summary lands in ``summary``."""

    async def read(stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            if raw.startswith(b"flood {"):
                summary.update(json.loads(raw[6:]))

    async def run() -> None:
        flood = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "devtools.bench.api_flood",
            "--url",
            url,
            "--seconds",
            str(seconds),
            "--nice",
            str(FLOOD_NICENESS),
            stdout=asyncio.subprocess.PIPE,
        )
        move_off_core(flood.pid, core_cpus)
        assert flood.stdout is not None
        try:
            await asyncio.gather(read(flood.stdout), observer() if observer else asyncio.sleep(0))
        finally:
            # Cancelled as the measurement ends, about when the flood ends too: its summary.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(read(flood.stdout), 10)
            if flood.returncode is None:
                flood.terminate()
            await flood.wait()

    return run


async def _measure(
    service: ControllerService,
    farm_out: asyncio.StreamReader,
    pens: int,
    breachers: int,
    duration: float,
    observer: Observer | None = None,
) -> FleetResult:
    ports = list(service.pens)
    async with asyncio.timeout(60):
        for port in ports:
            await service.wait_for_pen(port, _ready, within=60)
    feed = EventFeed(service)
    therapists = [feed.therapist(port, THERAPIST) for port in ports[:breachers]]
    async with feed:
        sessions = [await _start_session(therapist) for therapist in therapists]
        result = FleetResult(pens=pens, seconds=duration)
        keepers = [
            asyncio.create_task(_keep_treating(therapist, sid))
            for therapist, sid in zip(therapists, sessions, strict=True)
        ]
        lag = asyncio.create_task(_loop_lag(result))
        reader = asyncio.create_task(_read_reactions(farm_out, result))
        watcher = asyncio.create_task(observer() if observer else asyncio.sleep(0))
        baseline = _link_totals(service)
        started = time.perf_counter()
        try:
            await asyncio.sleep(duration)
        finally:
            tasks = (*keepers, lag, reader, watcher)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    result.seconds = time.perf_counter() - started
    totals = _link_totals(service)
    result.telemetry_received = totals[0] - baseline[0]
    result.telemetry_lost = totals[1] - baseline[1]
    result.crc_errors = totals[2] - baseline[2]
    return result


def _ready(view: PenView) -> bool:
    return view.link is LinkStatus.UP and view.cartridge_id is not None


def _link_totals(service: ControllerService) -> tuple[int, int, int]:
    received = lost = crc = 0
    for pen in service.pens.values():
        stats = pen.link.conn.stats
        received += stats.frames_received
        lost += stats.unreliable_lost
        crc += stats.crc_errors
    return received, lost, crc


async def _start_session(therapist: Therapist) -> str:
    sid = therapist.open_session(f"bench-{therapist.port}", "bench")
    await _arm(therapist, sid)
    return sid


async def _arm(therapist: Therapist, sid: str) -> None:
    """Whatever state the session is in, get its pen armed again.

    Reads only the pen's view (cheap), never a copy of the session: the rig runs
    in the controller's process and must not stall it.
    """
    view = therapist.view()
    zone = view.zone_id
    if zone is None or view.passes_left == 0:
        zone = ZONES[(ZONES.index(zone) + 1) % len(ZONES)] if zone else ZONES[0]
    await therapist.prepare(sid, zone, DEPTH_UM)
    await therapist.arm(sid)


async def _keep_treating(therapist: Therapist, sid: str) -> None:
    """Play the therapist of one breaching pen: re-arm it as soon as it has been
    stopped, and after SESSION_PASSES passes end the session and start the next
    client's with the fresh cartridge the farm puts in (so sessions stay the size
    they have in a clinic). Events that arrive while it taps are not answered."""
    passes = 0
    while True:
        event = await therapist.next_event()
        if event.kind is EventKind.PASS_ENDED and event.session_id == sid:
            passes += 1
        elif event.kind is EventKind.CARTRIDGE_INSERTED and passes >= SESSION_PASSES:
            with contextlib.suppress(ActionRefused, TimeoutError):
                sid = await _start_session(therapist)
                passes = 0
            therapist.drain()
        elif event.kind is EventKind.DISARMED and event.session_id == sid:
            if passes >= SESSION_PASSES:
                with contextlib.suppress(ActionRefused):
                    therapist.end_session(sid)
            else:
                with contextlib.suppress(ActionRefused, TimeoutError):
                    await _arm(therapist, sid)
                therapist.drain()


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
