"""``penctl demo``: the whole stack as local processes, with a scripted clinic.

What ``make run`` runs. Under one state directory (default ``var/demo``) it
starts, in this order:

* **mosquitto** and **influxd** as real processes (devtools.stack.processes),
  on 1883 and 8086 when those are free, else on free ports (printed). The broker
  uses the compose stack's password file and ACL (deploy/mosquitto), so the demo
  proves those too.
* **one ingest worker** as a ``penctl ingest`` subprocess, configured by a TOML
  file in the state directory. A subprocess, not a task in this loop: the
  controller's event loop checks every pen's telemetry for the safety monitor,
  and JSON decoding and HTTP writes of ingest batches must not stall it (on the
  clinic's two cores each process gets its own). It also runs the very command
  an operator deploys.
* **simulated pens** in this process (PenRunner, pseudo-terminals, automatic
  hand): they are what a developer pokes at, and the scripted faults need the
  pen object.
* **the controller** (ControllerService, MQTT as user ``controller``).

A scripted therapist per pen then treats clients one after another (plan
``full_face``, zones in turn at allowed depths; passes by the automatic hand).
The first pen's first client also sees a refusal (a depth above the zone's
limit) and a depth overshoot that the monitor stops (a fault, acknowledged);
on the second pen a manager allows one extra pass (an override).

Every child is killed on exit, whatever the reason (Ctrl-C, SIGTERM, SIGHUP,
``--duration``, an error). The ingest subprocess also dies with this process if
it is SIGKILLed (PR_SET_PDEATHSIG); the servers' pids are kept in
``children.pids`` so the next start on the same state directory reaps any a
SIGKILLed demo left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from controller.api import UserStore, create_app
from controller.api.server import ApiServer
from controller.config import load_settings
from controller.influx import InfluxClient, InfluxError, InfluxSettings
from controller.logs import configure_logging
from controller.policy import TreatmentPolicy
from controller.safety.context import LinkStatus, SessionState
from controller.service import ActionRefused, ControllerService
from controller.sessions import (
    AcknowledgeFault,
    Actor,
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    EventKind,
    OverrideZone,
    ResumeSession,
    Role,
    SelectZone,
    SessionEvent,
    SetZoneDepth,
    StartSession,
)
from devtools.stack.processes import ServerProcess, free_port, start_influxd, start_mosquitto

log = structlog.get_logger("devtools.demo")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MQTT_USERS = {
    "controller": ("controller", "controller-demo-password"),
    "ingest": ("ingest", "ingest-demo-password"),
}
# The tablet API's demo users (api.demo_users); never enabled in a clinic.
TABLET_USERS = (
    ("therapist", "demo-therapist"),
    ("manager", "demo-manager"),
    ("admin", "demo-admin"),
)
THERAPISTS = ("t-0001", "t-0002", "t-0003")
MANAGER = Actor("m-0001", Role.MANAGER)
PIDFILE = "children.pids"


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to penctl's parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run the whole stack locally with simulated pens and a scripted clinic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--state-dir", type=Path, default=Path("var/demo"), help="default var/demo")
    p.add_argument("--pens", type=int, default=4, metavar="N", help="simulated pens (default 4)")
    p.add_argument("--duration", type=float, metavar="S", help="run S seconds, then stop")
    p.add_argument("--seed", default="0", help="seed for the pens and the script (default 0)")
    p.add_argument(
        "--plan", default="full_face", help="treatment plan of every session (default full_face)"
    )
    p.add_argument(
        "--mqtt-port", type=int, default=1883, help="broker port, 0 = any free (default 1883)"
    )
    p.add_argument(
        "--influx-port", type=int, default=8086, help="InfluxDB port, 0 = any free (default 8086)"
    )
    p.add_argument(
        "--api-port",
        type=int,
        default=8080,
        help="tablet API port; a taken port falls back to a free one (default 8080)",
    )
    p.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console" if sys.stderr.isatty() else "json",
    )
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Handler of ``penctl demo``: 0 after a clean stop, 1 if a part failed, 2 on bad usage."""
    configure_logging(args.log_format)
    if args.pens < 1:
        print("penctl demo: --pens must be at least 1", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration <= 0:
        print("penctl demo: --duration must be positive", file=sys.stderr)
        return 2
    demo = Demo(
        state_dir=args.state_dir.resolve(),
        pens=args.pens,
        seed=args.seed,
        plan=args.plan,
        mqtt_port=args.mqtt_port,
        influx_port=args.influx_port,
        api_port=args.api_port,
        duration=args.duration,
    )
    return asyncio.run(demo.run())


def port_or_free(preferred: int) -> int:
    """``preferred`` if nothing listens there (0: any), else a free port."""
    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    return free_port()


def _die_with_parent() -> None:
    # Runs in the forked child before exec: SIGKILL it when the demo dies, even by
    # SIGKILL, so a killed demo never leaves a worker writing into InfluxDB.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def reap_leftovers(state_dir: Path) -> list[int]:
    """Kill children a SIGKILLed demo left behind (pids recorded in ``children.pids``).

    Only a process whose command line names this state directory is killed, so a
    recycled pid belonging to something else is left alone.
    """
    path = state_dir / PIDFILE
    killed: list[int] = []
    if not path.exists():
        return killed
    for word in path.read_text().split():
        with contextlib.suppress(ValueError, OSError):
            pid = int(word)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if str(state_dir).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    path.unlink(missing_ok=True)
    return killed


@dataclass
class Demo:
    """The local stack and its scripted clinic; ``await run()`` until stopped."""

    state_dir: Path
    pens: int = 4
    seed: str = "0"
    plan: str = "full_face"
    mqtt_port: int = 1883
    influx_port: int = 8086
    api_port: int = 8080
    duration: float | None = None
    tablet_url: str = ""
    #: Use running servers instead of starting them: (broker port, InfluxDB URL).
    #: Tests pass their own; the broker must accept the demo's users (or anyone).
    external_servers: tuple[int, str] | None = None
    started: float = field(default_factory=time.monotonic)
    first_data_s: float | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _servers: list[ServerProcess] = field(default_factory=list)
    _ingest: subprocess.Popen[bytes] | None = None
    _status: int = 0

    def stop(self, status: int = 0) -> None:
        self._status = self._status or status
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stop)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if killed := reap_leftovers(self.state_dir):
            log.warning("killed processes a previous demo left behind", pids=killed)
        runner: Any = None
        service: ControllerService | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            mqtt_port, influx_url = self.external_servers or self._start_servers()
            self._start_ingest(mqtt_port, influx_url)
            # Imported here: the simulator is a development tool, not a controller dependency.
            from simulated_pen.runner import PenRunner

            runner = PenRunner(seed=self.seed, auto_hand=True)
            slots = await runner.start(self.pens, "pty")
            user, password = MQTT_USERS["controller"]
            settings = load_settings(
                None,
                state_dir=self.state_dir / "controller",
                pens=[{"url": s.address, "name": f"room{i + 1}"} for i, s in enumerate(slots)],
                mqtt={"port": mqtt_port, "username": user, "password": password},
                influx={"url": influx_url},
            )
            service = ControllerService(settings)
            if service.policy is None or service.policy.plan(self.plan) is None:
                raise ValueError(f"no plan {self.plan!r} in the treatment policy")
            api = _tablet_api(service, self.api_port)
            await service.start()
            await api.start()
            self.tablet_url = api.url + "/"
            tasks.append(asyncio.create_task(_stop_api_when_cancelled(api)))
            self._banner(mqtt_port, influx_url, [(s.serial, s.address) for s in slots])
            tasks.append(asyncio.create_task(self._watch_first_data(influx_url)))
            tasks.append(asyncio.create_task(self._watch_ingest()))
            for i, slot in enumerate(slots):
                therapist = _Therapist(
                    service, runner, slot.pen, f"room{i + 1}", i, self.seed, self.plan
                )
                tasks.append(asyncio.create_task(therapist.run(), name=f"therapist-room{i + 1}"))
            if self.duration is not None:
                loop.call_later(self.duration, self.stop)
            await self._stop.wait()
            log.info("demo stopping", uptime_s=round(time.monotonic() - self.started, 1))
        except Exception:
            log.exception("demo failed")
            self._status = 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if service is not None:
                with contextlib.suppress(Exception):
                    await service.stop()
            if runner is not None:
                runner.close()
            self._stop_children()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)  # an embedding program (a test) keeps its own
            log.info("demo stopped", first_data_s=self.first_data_s)
        return self._status

    # -- processes ----------------------------------------------------------------------

    def _start_servers(self) -> tuple[int, str]:
        passwd, acl = DEPLOY / "mosquitto" / "passwd", DEPLOY / "mosquitto" / "acl"
        authenticated = passwd.exists() and acl.exists()
        mosquitto = start_mosquitto(
            self.state_dir / "mosquitto",
            port_or_free(self.mqtt_port),
            password_file=passwd if authenticated else None,
            acl_file=acl if authenticated else None,
        )
        self._servers.append(mosquitto)
        self._record_pids()
        log.info("mosquitto running", port=mosquitto.port, authenticated=authenticated)
        influxd = start_influxd(self.state_dir / "influxd", port_or_free(self.influx_port))
        self._servers.append(influxd)
        self._record_pids()
        log.info("influxd running", port=influxd.port)
        return mosquitto.port, f"http://127.0.0.1:{influxd.port}"

    def _start_ingest(self, mqtt_port: int, influx_url: str) -> None:
        user, password = MQTT_USERS["ingest"]
        config = self.state_dir / "ingest.toml"
        config.write_text(
            f'state_dir = "{self.state_dir / "ingest"}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\n'
            f'username = "{user}"\npassword = "{password}"\n'
            f'[influx]\nurl = "{influx_url}"\ndatabase = "pen"\n'
            '[ingest]\nworker_id = "demo-ingest"\n'
        )
        # The parent's PENCTL_* variables would beat the file: the demo decides here.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PENCTL_")}
        with (self.state_dir / "ingest.log").open("ab") as out:
            self._ingest = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", "ingest", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**env, "PYTHONUNBUFFERED": "1"},
                preexec_fn=_die_with_parent,  # single-threaded here: safe
                start_new_session=True,  # Ctrl-C in the terminal reaches only the demo
            )
        self._record_pids()
        log.info("ingest worker running", pid=self._ingest.pid, log=str(out.name))

    def _record_pids(self) -> None:
        pids = [s.proc.pid for s in self._servers if s.proc is not None]
        if self._ingest is not None:
            pids.append(self._ingest.pid)
        (self.state_dir / PIDFILE).write_text(" ".join(map(str, pids)) + "\n")

    def _stop_children(self) -> None:
        """Ingest first (it acknowledges what it wrote), then the database, then the broker."""
        if self._ingest is not None and self._ingest.poll() is None:
            self._ingest.terminate()
            try:
                self._ingest.wait(10)
            except subprocess.TimeoutExpired:
                self._ingest.kill()
                self._ingest.wait()
        for server in reversed(self._servers):
            with contextlib.suppress(Exception):
                server.stop()
            if server.running:  # stop() escalates to SIGKILL; make sure of it anyway
                server.kill()
        (self.state_dir / PIDFILE).unlink(missing_ok=True)

    async def _watch_ingest(self) -> None:
        # A child process has no event to await in asyncio without owning its pipes.
        while self._ingest is not None and self._ingest.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        code = self._ingest.returncode if self._ingest else None
        log.error("ingest worker exited", returncode=code, log=str(self.state_dir / "ingest.log"))
        self.stop(1)

    async def _watch_first_data(self, influx_url: str) -> None:
        """Log how long it took from start until telemetry and events are queryable."""
        async with InfluxClient(InfluxSettings(url=influx_url, timeout=2.0)) as client:
            while True:
                with contextlib.suppress(InfluxError):
                    if (
                        await client.count("telemetry", "depth_um") > 0
                        and await client.count("events", "seq") > 0
                    ):
                        break
                await asyncio.sleep(0.2)
        self.first_data_s = round(time.monotonic() - self.started, 2)
        log.info("first data in InfluxDB", seconds_since_start=self.first_data_s)
        print(f"first data in InfluxDB after {self.first_data_s} s", flush=True)

    def _banner(self, mqtt_port: int, influx_url: str, pens: list[tuple[str, str]]) -> None:
        user, password = MQTT_USERS["controller"]
        ingest_user, ingest_password = MQTT_USERS["ingest"]
        lines = [
            "penctl demo is running (Ctrl-C stops everything)",
            f"  state directory  {self.state_dir}",
            f"  MQTT broker      mqtt://127.0.0.1:{mqtt_port}  "
            f"(users {user}/{password}, {ingest_user}/{ingest_password})",
            f"  InfluxDB         {influx_url}  (database pen, InfluxQL on /query)",
            f"  tablet           {self.tablet_url}  (users "
            + ", ".join(f"{u}/{p}" for u, p in TABLET_USERS)
            + ")",
        ]
        lines += [f"  pen {serial:<10} {address}" for serial, address in pens]
        print("\n".join(lines), flush=True)
        log.info(
            "stack up",
            mqtt=f"127.0.0.1:{mqtt_port}",
            influx=influx_url,
            tablet=self.tablet_url,
            pens=dict(pens),
        )


def _tablet_api(service: ControllerService, port: int) -> ApiServer:
    """The tablet API with the demo users, on ``port`` or, if that is taken, any free one."""
    app = create_app(service, UserStore.demo())
    try:
        return ApiServer(app, "127.0.0.1", port)
    except OSError:
        log.warning("tablet port taken; using a free one", port=port)
        return ApiServer(app, "127.0.0.1", 0)


async def _stop_api_when_cancelled(api: ApiServer) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await api.stop()


class _Therapist:
    """Treats one client after another on one pen, as a therapist at the tablet would."""

    def __init__(
        self,
        service: ControllerService,
        runner: Any,
        pen: Any,
        port: str,
        index: int,
        seed: str,
        plan: str,
    ) -> None:
        self.service = service
        self.runner = runner
        self.pen = pen
        self.port = port
        self.index = index
        self.plan = plan
        self.rng = random.Random(f"{seed}/{port}")
        policy = service.policy
        assert policy is not None
        self.policy: TreatmentPolicy = policy
        # The scripted incidents happen once, on the first pen, early enough that
        # the dashboards show them within the first minute.
        self.refusal_due = index == 0
        self.overshoot_due = index == 0
        self.override_due = index == 1
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.therapist = THERAPISTS[index % len(THERAPISTS)]

    async def run(self) -> None:
        sub = self.service.subscribe(100_000)
        self.queue = sub.queue
        try:
            await self._wait_until(lambda: self.service.registry.pen(self.port).cartridge_id)
            self._close_leftover_session()
            client = 0
            while True:
                client += 1
                try:
                    await self._treat_client(f"c-{self.index + 1:02d}{client:04d}")
                except (ActionRefused, TimeoutError) as exc:
                    # A pen that went away or an answer that never came: the therapist
                    # ends the session and carries on with the next client, and so
                    # does the demo, so data keeps flowing.
                    log.warning("session abandoned", port=self.port, error=repr(exc))
                    self._close_leftover_session()
                await asyncio.sleep(self.rng.uniform(2.0, 5.0))  # the next client sits down
                with contextlib.suppress(TimeoutError):
                    await self._fresh_cartridge()
        finally:
            self.service.unsubscribe(sub)

    def _close_leftover_session(self) -> None:
        # A session left open: from an abandoned client, or recovered as interrupted
        # when the demo restarts on the same state directory.
        sid = self.service.registry.live_session_id(self.port)
        if sid is not None:
            with contextlib.suppress(ActionRefused):
                self.service.act(EndSession(sid, self._actor()))
            log.info("ended an open session", port=self.port, session=sid)

    def _actor(self) -> Actor:
        return Actor(self.therapist, Role.THERAPIST)

    async def _treat_client(self, client_ref: str) -> None:
        self.therapist = self.rng.choice(THERAPISTS)
        svc, actor = self.service, self._actor()
        sid = svc.new_session_id()
        svc.act(CreateSession(sid, self.port, client_ref, self.plan, actor))
        svc.act(StartSession(sid, actor))
        plan = self.policy.plan(self.plan)
        assert plan is not None
        for zone_id in plan.zone_ids:
            await self._treat_zone(sid, zone_id)
        svc.act(EndSession(sid, actor))

    async def _treat_zone(self, sid: str, zone_id: str) -> None:
        svc, actor = self.service, self._actor()
        zone = self.policy.zone(zone_id)
        assert zone is not None
        svc.act(SelectZone(sid, zone_id, actor))
        if self.override_due and zone.max_passes < self.policy.max_passes_ceiling:
            self.override_due = False
            reason = "client tolerates well; one extra pass agreed with the client"
            svc.act(OverrideZone(sid, zone_id, MANAGER, reason, max_passes=zone.max_passes + 1))
        if self.refusal_due:
            self.refusal_due = False
            with contextlib.suppress(ActionRefused):
                svc.act(SetZoneDepth(sid, zone.max_depth_um + 250, actor))
                log.error("the deeper-than-allowed depth was accepted", zone=zone_id)
        # An allowed depth, in 50 µm steps, between 60 % and 100 % of the zone's limit.
        depth = max(50, int(zone.max_depth_um * self.rng.uniform(0.6, 1.0)) // 50 * 50)
        while True:
            ctx = svc.registry.gate_context(self.port)
            if ctx.session_state is SessionState.FAULTED:
                # The therapist checks the client and the pen, then continues.
                await asyncio.sleep(self.rng.uniform(1.0, 2.0))
                svc.act(AcknowledgeFault(sid, actor))
                continue
            if ctx.session_state in (SessionState.PAUSED, SessionState.INTERRUPTED):
                await self._wait_until(
                    lambda: svc.registry.gate_context(self.port).link is LinkStatus.UP
                )
                svc.act(ResumeSession(sid, actor))
                continue
            if ctx.zone is None or ctx.zone.zone_id != zone_id:
                svc.act(SelectZone(sid, zone_id, actor))
                continue
            if ctx.zone.passes_left == 0:
                return
            if ctx.depth_setpoint_um is None:
                svc.act(SetZoneDepth(sid, depth, actor))
            await self._arm_and_treat(sid)

    async def _arm_and_treat(self, sid: str) -> None:
        """Arm; the automatic hand makes passes until the pen is disarmed (zone done, fault)."""
        svc = self.service
        self._drain()
        try:
            await svc.act_and_wait(
                ArmPen(sid, self._actor()),
                lambda e: e.kind == EventKind.ARMED and e.session_id == sid,
                within=5.0,
            )
        except (ActionRefused, TimeoutError) as exc:
            log.warning("arming failed; retrying", port=self.port, error=str(exc))
            await asyncio.sleep(1.0)
            return
        if self.overshoot_due:
            self.overshoot_due = False
            await self._next_event(EventKind.PASS_STARTED, 30)
            self._inject("depth_overshoot", 300)
            await self._next_event(EventKind.FAULT, 10)
            self._inject("clear")
        try:
            await self._next_event(EventKind.DISARMED, 120)
        except TimeoutError:
            with contextlib.suppress(ActionRefused):
                svc.act(DisarmPen(sid, self._actor()))

    def _inject(self, kind: str, amount: float = 0.0) -> None:
        from simulated_pen.faults import Fault, FaultKind

        fault = Fault(FaultKind(kind), amount=amount)
        self.runner.apply(self.pen, lambda p, now: p.inject(fault, now))
        log.info("fault injected on the simulated pen", port=self.port, fault=kind, amount=amount)

    async def _fresh_cartridge(self) -> None:
        """Single-use cartridges: swap in a new one for the next client."""
        before = self.service.registry.pen(self.port).cartridge_id
        self.runner.apply(self.pen, lambda p, now: p.remove_cartridge(now))
        self.runner.apply(self.pen, lambda p, now: p.insert_cartridge(now))
        await self._wait_until(
            lambda: self.service.registry.pen(self.port).cartridge_id not in (None, before)
        )

    def _drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    async def _next_event(self, kind: EventKind, within: float) -> SessionEvent:
        async with asyncio.timeout(within):
            while True:
                item = await self.queue.get()
                if isinstance(item, SessionEvent) and item.port == self.port and item.kind == kind:
                    return item

    async def _wait_until(self, predicate: Callable[[], object], within: float = 30.0) -> None:
        # State owned by the pens' link; no event announces it, so poll it.
        async with asyncio.timeout(within):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
