"""The demo's scripted clinic: one therapist per pen, treating client after client.

Plan ``full_face`` unless told otherwise, zones in turn at allowed depths; the
passes are made by the simulated pen's automatic hand. The first pen's first
client also sees a refusal (a depth above the zone's limit) and a depth
overshoot that the monitor stops (a fault, acknowledged); on the second pen a
manager allows one extra pass (an override).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import structlog

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

log = structlog.get_logger("devtools.demo")

THERAPISTS = ("t-0001", "t-0002", "t-0003")
MANAGER = Actor("m-0001", Role.MANAGER)


class ClinicTherapist:
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
