"""The demo's wiring: the local stack, simulated pens, the controller, the tablet, the clinic.

:class:`Demo` brings them up in that order under one state directory, prints
where everything is, and takes it all down again on :meth:`Demo.stop`, a
signal or ``duration`` (the whole story: ``devtools.demo.cli``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from controller.config import load_settings
from controller.edge.supervisor import EdgeSupervisor
from controller.influx import InfluxClient, InfluxError, InfluxSettings
from controller.policy import load_policy
from controller.service import WIND_DOWN_S, ControllerService
from devtools.stack.processes import wait_for_port
from devtools.stack.supervisor import MQTT_USERS, LocalStack, port_or_free, reap_leftovers
from devtools.therapist import EventFeed
from simulated_pen.control import ControlServer
from simulated_pen.runner import PenRunner, PenSlot

from .clinic import ClinicTherapist

log = structlog.get_logger("devtools.demo")

# The tablet API's demo users (api.demo_users); never enabled in a clinic.
TABLET_USERS = (
    ("therapist", "demo-therapist"),
    ("manager", "demo-manager"),
    ("admin", "demo-admin"),
)


@dataclass
class Demo:
    """The local stack and its scripted clinic; ``await run()`` until stopped."""

    state_dir: Path
    pens: int = 4
    #: Pens left to the person at the keyboard (the last ones), never to a scripted
    #: therapist; at most ``pens - 1``, so the clinic's story still happens.
    free_pens: int = 1
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
    _stack: LocalStack | None = None
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
        runner: PenRunner | None = None
        service: ControllerService | None = None
        edge: EdgeSupervisor | None = None
        tasks: list[asyncio.Task[None]] = []
        controls: list[ControlServer] = []
        stack = self._stack = LocalStack(self.state_dir)
        try:
            # Supervised: a part that dies is started again; the treatment goes on.
            mqtt_port, influx_url = self.external_servers or await stack.start_servers(
                self.mqtt_port, self.influx_port
            )
            await stack.start_ingest(mqtt_port, influx_url)
            runner = PenRunner(seed=self.seed, auto_hand=True)
            slots = await runner.start(self.pens, "pty")
            # Every pen takes commands at run time (simulated_pen/README.md, control port).
            for slot in slots:
                controls.append(await ControlServer.start(runner, slot))
            user, password = MQTT_USERS["controller"]
            api_port = port_or_free(self.api_port)
            settings = load_settings(
                None,
                state_dir=self.state_dir / "controller",
                pens=[{"url": s.address, "name": f"room{i + 1}"} for i, s in enumerate(slots)],
                mqtt={"port": mqtt_port, "username": user, "password": password},
                influx={"url": influx_url},
                api={"host": "127.0.0.1", "port": api_port, "demo_users": True},
            )
            # The clinic's script follows the same policy the controller enforces.
            policy = load_policy(settings.policy_file)
            if policy.plan(self.plan) is None:
                raise ValueError(f"no plan {self.plan!r} in the treatment policy")
            service = ControllerService(settings, policy=policy)
            await service.start()
            # The tablet API, MQTT and the audit anchor run in the edge process, as under
            # penctl serve: the controller's loop serves only the pens (and, in the demo,
            # the scripted clinic's therapists).
            edge = EdgeSupervisor(settings, service.socket_path)
            await edge.start()
            await wait_for_port("127.0.0.1", api_port, within=30.0)
            self.tablet_url = f"http://127.0.0.1:{api_port}/"
            scripted = self.pens - self.free
            self._banner(mqtt_port, influx_url, slots, controls, scripted)
            tasks.append(asyncio.create_task(self._watch_first_data(influx_url)))
            feed = EventFeed(service)
            tasks.append(asyncio.create_task(feed.run(), name="event-feed"))
            for i, slot in enumerate(slots[:scripted]):
                port = f"room{i + 1}"
                therapist = ClinicTherapist(
                    service, feed, policy, runner, slot, port, i, self.seed, self.plan
                )
                tasks.append(asyncio.create_task(therapist.run(), name=f"therapist-{port}"))
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
            # As penctl serve stops: the pens go, the edge secures what is left, then
            # it stops (stopped first, it would lose what the channel still holds).
            if service is not None and edge is not None:
                with contextlib.suppress(Exception):
                    await service.wind_down(within=WIND_DOWN_S)
            if edge is not None:
                with contextlib.suppress(Exception):
                    await edge.stop()
            if service is not None:
                with contextlib.suppress(Exception):
                    await service.stop()
            for control in controls:
                control.close()
            if runner is not None:
                runner.close()
            await stack.stop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)  # an embedding program (a test) keeps its own
            log.info("demo stopped", first_data_s=self.first_data_s)
        return self._status

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

    @property
    def free(self) -> int:
        """How many pens (the last ones) are left to the person at the keyboard."""
        return max(0, min(self.free_pens, self.pens - 1))

    def _banner(
        self,
        mqtt_port: int,
        influx_url: str,
        slots: list[PenSlot],
        controls: list[ControlServer],
        scripted: int,
    ) -> None:
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
        for i, (slot, control) in enumerate(zip(slots, controls, strict=True)):
            who = "scripted therapist" if i < scripted else "FREE for you"
            lines.append(
                f"  pen room{i + 1:<3} {slot.serial:<9} {slot.address:<12} "
                f"control {control.address}  ({who})"
            )
        for i in range(scripted, self.pens):
            where = controls[i].address.removeprefix("tcp://")
            lines += [
                f"  your pen: room{i + 1} ({slots[i].serial}). Open {self.tablet_url}, sign in as "
                "therapist/demo-therapist and pick room" + str(i + 1) + ".",
                "    Its automatic hand makes the passes while it is armed. A fresh cartridge "
                "for each client:",
                f"    echo 'cartridge insert' | socat - TCP:{where}   (more: 'help'; "
                "simulated_pen/README.md, control port)",
            ]
        print("\n".join(lines), flush=True)
        pens = {slot.serial: slot.address for slot in slots}
        log.info(
            "stack up",
            mqtt=f"127.0.0.1:{mqtt_port}",
            influx=influx_url,
            tablet=self.tablet_url,
            pens=pens,
            free=[f"room{i + 1}" for i in range(scripted, self.pens)],
        )
