"""A controller wired to simulated pens over real pseudo-terminals, for end-to-end tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.api import UserStore
from controller.config import ApiSettings, load_settings
from controller.edge.runtime import Edge
from controller.influx import InfluxSettings
from controller.live import LiveItem
from controller.policy import TreatmentPolicy, load_policy
from controller.safety.context import LinkStatus
from controller.service import ControllerService
from controller.sessions import Actor, EndSession, EventKind, Role, SessionEvent
from devtools.therapist import Therapist
from simulated_pen.device import SimulatedPen
from simulated_pen.runner import PenRunner, PenSlot

THERAPIST = Actor("t-0001", Role.THERAPIST)
MANAGER = Actor("m-0001", Role.MANAGER)


async def eventually(predicate: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    """Wait until predicate() holds, checking every few milliseconds.

    For state that lives in another component with no event to await (a simulated
    pen's motor); every controller-side condition is awaited through events.
    """
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polls state owned elsewhere
            await asyncio.sleep(0.002)


@dataclass
class Rig:
    runner: PenRunner | None
    service: ControllerService
    slots: list[PenSlot]
    events: list[SessionEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    therapists: list[Therapist] = field(default_factory=list)
    #: The edge (MQTT publisher) started with the rig when it was given an MQTT port.
    edge: Edge | None = None

    async def secured(self) -> None:
        """Every record decided so far durable, and every event and sample secured in the
        edge's outbox (flushed to disk)."""
        self.service.sync_records()
        assert self.service.core_channel is not None
        await self.service.core_channel.drained()

    async def finish(self, sids: list[str]) -> None:
        """End the sessions, take the pens away (nothing new is produced after this) and
        wait until everything decided is secured in the edge's outbox."""
        for sid in sids:
            self.service.act(EndSession(sid, THERAPIST))
        assert self.runner is not None
        self.runner.close()
        assert await self.service.wind_down()

    def pen(self, index: int = 0) -> SimulatedPen:
        return self.slots[index].pen

    def port(self, index: int = 0) -> str:
        return f"room{index + 1}"

    def therapist(self, index: int = 0) -> Therapist:
        """The scripted therapist at pen ``index``'s tablet."""
        return self.therapists[index]

    def physical(self, index: int, action: Callable[[SimulatedPen, float], Any]) -> Any:
        """Do something to the pen in the therapist's hand (button, contact, cartridge)."""
        assert self.runner is not None, "the pens run in another process"
        return self.runner.apply(self.slots[index].pen, action)

    async def wait_event(self, kind: EventKind, within: float = 5.0, **detail: Any) -> SessionEvent:
        """The first event of ``kind`` (seen so far or still to come) matching ``detail``."""

        def matches(e: SessionEvent) -> bool:
            return e.kind == kind and all(e.detail.get(k) == v for k, v in detail.items())

        async with asyncio.timeout(within):
            while True:
                found = [e for e in self.events if matches(e)]
                if found:
                    return found[0]
                await self._changed.wait()
                self._changed.clear()

    async def start_treating(
        self,
        zone: str,
        depth_um: int,
        *,
        index: int = 0,
        plan: str = "full_face",
        client_ref: str = "client-ref-1",
    ) -> str:
        """Create and start a session, select a zone, set its depth, arm; return its id."""
        therapist = self.therapist(index)
        sid = therapist.open_session(client_ref, plan)
        therapist.select_zone(sid, zone)
        therapist.set_depth(sid, depth_um)
        await therapist.arm(sid)
        return sid

    async def arm(self, sid: str, index: int = 0) -> None:
        await self.therapist(index).arm(sid)

    async def one_pass(self, index: int = 0, hold: float = 0.15) -> SessionEvent:
        """Touch the skin, press, hold, release, lift; return the pass_ended event."""
        before = sum(1 for e in self.events if e.kind == EventKind.PASS_ENDED)
        self.physical(index, lambda p, now: p.set_contact(True, now))
        self.physical(index, lambda p, now: p.press_button(now))
        await self.wait_nth(EventKind.PASS_STARTED, before + 1)
        await asyncio.sleep(hold)  # the therapist's hand: a pass takes time
        self.physical(index, lambda p, now: p.release_button(now))
        self.physical(index, lambda p, now: p.set_contact(False, now))
        return await self.wait_nth(EventKind.PASS_ENDED, before + 1)

    async def wait_after(self, mark: int, *kinds: EventKind, within: float = 5.0) -> SessionEvent:
        """The first event of one of ``kinds`` among those after the first ``mark`` seen."""
        async with asyncio.timeout(within):
            while True:
                for event in self.events[mark:]:
                    if event.kind in kinds:
                        return event
                await self._changed.wait()
                self._changed.clear()

    async def wait_nth(self, kind: EventKind, n: int, within: float = 5.0) -> SessionEvent:
        async with asyncio.timeout(within):
            while True:
                found = [e for e in self.events if e.kind == kind]
                if len(found) >= n:
                    return found[n - 1]
                await self._changed.wait()
                self._changed.clear()

    async def _collect(self) -> None:
        sub = self.service.subscribe(maxsize=100_000)
        try:
            while True:
                item: LiveItem = await sub.queue.get()
                if isinstance(item, SessionEvent):
                    self.events.append(item)
                    self._changed.set()
        finally:
            self.service.unsubscribe(sub)


@asynccontextmanager
async def edge_for(
    service: ControllerService,
    *,
    users: UserStore | None = None,
    api: ApiSettings | None = None,
    charts: InfluxSettings | None = None,
    mqtt: bool = False,
) -> AsyncIterator[Edge]:
    """The edge (tablet API on ``api``, MQTT if ``mqtt``) joined to a running core.

    In the test's own event loop, for the test's convenience; ``penctl serve`` runs it as
    a process of its own (tests/test_core_isolation.py proves what that buys).
    """
    update: dict[str, Any] = {"api": api or ApiSettings(port=0)}
    edge = Edge(
        service.settings.model_copy(update=update),
        Path(service.socket_path),
        users=users,
        api=api is not None,
        mqtt=mqtt,
        charts=charts,
    )
    await edge.start()
    try:
        yield edge
    finally:
        await edge.stop()


def policy_with(tmp_path: Path, extra_zone_lines: str = "") -> TreatmentPolicy:
    """The default policy, optionally with extra TOML lines appended (e.g. a budget)."""
    source = Path(__file__).resolve().parent.parent / "controller" / "default_policy.toml"
    text = source.read_text()
    if extra_zone_lines:
        text = text.replace("[zones.forehead]\n", "[zones.forehead]\n" + extra_zone_lines, 1)
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return load_policy(path)


async def start_rig(
    tmp_path: Path,
    pens: int = 1,
    policy: TreatmentPolicy | None = None,
    state_dir: Path | None = None,
    *,
    urls: list[str] | None = None,
    runner: PenRunner | None = None,
    slots: list[PenSlot] | None = None,
    mqtt_port: int | None = None,
    expected_serials: list[str | None] | None = None,
    mqtt: dict[str, Any] | None = None,
    api: dict[str, Any] | None = None,
) -> tuple[Rig, asyncio.Task[None]]:
    """A controller on fresh simulated pens, or on given pens/urls (pens elsewhere)."""
    if urls is None:
        if runner is None:
            runner = PenRunner(seed=7)
            slots = await runner.start(pens, "pty")
        assert slots is not None
        urls = [s.address for s in slots]
    settings = load_settings(
        None,
        state_dir=state_dir or tmp_path / "state",
        pens=[
            {
                "url": url,
                "name": f"room{i + 1}",
                "expected_serial": (expected_serials or [None] * len(urls))[i],
            }
            for i, url in enumerate(urls)
        ],
        mqtt={"enabled": mqtt_port is not None, "port": mqtt_port or 1883, **(mqtt or {})},
        api={"port": 0, **(api or {})},
    )
    service = ControllerService(settings, policy=policy)
    therapists = [Therapist(service, f"room{i + 1}", THERAPIST) for i in range(len(urls))]
    rig = Rig(runner, service, slots or [], therapists=therapists)
    collector = asyncio.create_task(rig._collect())
    await service.start()
    if mqtt_port is not None:
        rig.edge = Edge(settings, Path(service.socket_path), api=False, mqtt=True)
        await rig.edge.start()
    for therapist in therapists:
        # Connected, and the cartridge reported in answer to the QueryStatus sent on connect
        # (a pen with an unexpected serial is connected too, though never armed).
        await therapist.wait_for(
            lambda v: (
                v.link in (LinkStatus.UP, LinkStatus.UNEXPECTED)
                and v.cartridge_id is not None
                and v.pen_confirmed
                and v.telemetry_rate_hz is not None
            ),
            within=10,
        )
    return rig, collector


async def stop_rig(rig: Rig, collector: asyncio.Task[None], close_runner: bool = True) -> None:
    collector.cancel()
    await asyncio.gather(collector, return_exceptions=True)
    if rig.edge is not None:
        await rig.edge.stop()
    await rig.service.stop()
    if close_runner and rig.runner is not None:
        rig.runner.close()
