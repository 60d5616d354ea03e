"""The demo's scripted clinic: one therapist per pen, treating client after client.

Plan ``full_face`` unless told otherwise, zones in turn at allowed depths; the
passes are made by the simulated pen's automatic hand. The first pen's first
client also sees a refusal (a depth above the zone's limit) and a depth
overshoot that the monitor stops (a fault, acknowledged); on the second pen a
manager allows one extra pass (an override).

The tablet side is :class:`devtools.therapist.Therapist`; what is the clinic's
own is the script (who treats whom, at what depth, which incident when) and
the hands on the simulated pen (faults, cartridges).
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import structlog

from controller.errors import ActionRefused
from controller.policy import TreatmentPolicy
from controller.service import ControllerService
from controller.sessions import Actor, EventKind, OverrideZone, Role
from devtools.therapist import EventFeed
from simulated_pen.faults import Fault, FaultKind
from simulated_pen.runner import PenRunner, PenSlot

log = structlog.get_logger("devtools.demo")

THERAPISTS = ("t-0001", "t-0002", "t-0003")
MANAGER = Actor("m-0001", Role.MANAGER)


class ClinicTherapist:
    """Treats one client after another on one pen, as a therapist at the tablet would."""

    def __init__(
        self,
        service: ControllerService,
        feed: EventFeed,
        policy: TreatmentPolicy,
        runner: PenRunner,
        slot: PenSlot,
        port: str,
        index: int,
        seed: str,
        plan: str,
    ) -> None:
        self.service = service
        self.runner = runner
        self.slot = slot
        self.port = port
        self.index = index
        self.plan = plan
        self.policy = policy
        self.rng = random.Random(f"{seed}/{port}")
        # The scripted incidents happen once, on the first pen, early enough that
        # the dashboards show them within the first minute.
        self.refusal_due = index == 0
        self.overshoot_due = index == 0
        self.override_due = index == 1
        self.tablet = feed.therapist(port, self._actor(THERAPISTS[index % len(THERAPISTS)]))

    @staticmethod
    def _actor(therapist_id: str) -> Actor:
        return Actor(therapist_id, Role.THERAPIST)

    async def run(self) -> None:
        """Treat clients until cancelled."""
        await self.tablet.pen_ready()
        self._end_open_session()
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
                self._end_open_session()
            await asyncio.sleep(self.rng.uniform(2.0, 5.0))  # the next client sits down
            with contextlib.suppress(TimeoutError):
                await self._fresh_cartridge()

    def _end_open_session(self) -> None:
        # A session left open: from an abandoned client, or recovered as interrupted
        # when the demo restarts on the same state directory.
        sid = self.tablet.end_open_session()
        if sid is not None:
            log.info("ended an open session", port=self.port, session=sid)

    async def _treat_client(self, client_ref: str) -> None:
        self.tablet.actor = self._actor(self.rng.choice(THERAPISTS))
        sid = self.tablet.open_session(client_ref, self.plan)
        plan = self.policy.plan(self.plan)
        assert plan is not None
        for zone_id in plan.zone_ids:
            await self._treat_zone(sid, zone_id)
        self.tablet.end_session(sid)

    async def _treat_zone(self, sid: str, zone_id: str) -> None:
        tablet = self.tablet
        zone = self.policy.zone(zone_id)
        assert zone is not None
        tablet.select_zone(sid, zone_id)
        if self.override_due and zone.max_passes < self.policy.max_passes_ceiling:
            self.override_due = False
            reason = "client tolerates well; one extra pass agreed with the client"
            self.service.act(
                OverrideZone(sid, zone_id, MANAGER, reason, max_passes=zone.max_passes + 1)
            )
        if self.refusal_due:
            self.refusal_due = False
            with contextlib.suppress(ActionRefused):
                tablet.set_depth(sid, zone.max_depth_um + 250)
                log.error("the deeper-than-allowed depth was accepted", zone=zone_id)
        # An allowed depth, in 50 µm steps, between 60 % and 100 % of the zone's limit.
        depth = max(50, int(zone.max_depth_um * self.rng.uniform(0.6, 1.0)) // 50 * 50)
        while await tablet.prepare(sid, zone_id, depth, fault_check_s=self._checking_time):
            await self._arm_and_treat(sid)

    def _checking_time(self) -> float:
        """How long the therapist checks the client and the pen after a fault."""
        return self.rng.uniform(1.0, 2.0)

    async def _arm_and_treat(self, sid: str) -> None:
        """Arm; the automatic hand makes passes until the pen is disarmed (zone done, fault)."""
        tablet = self.tablet
        tablet.drain()
        try:
            await tablet.arm(sid, within=5.0)
        except (ActionRefused, TimeoutError) as exc:
            log.warning("arming failed; retrying", port=self.port, error=str(exc))
            await asyncio.sleep(1.0)
            return
        if self.overshoot_due:
            self.overshoot_due = False
            await tablet.next_event(EventKind.PASS_STARTED, within=30)
            self._inject("depth_overshoot", 300)
            await tablet.next_event(EventKind.FAULT, within=10)
            self._inject("clear")
        try:
            await tablet.next_event(EventKind.DISARMED, within=120)
        except TimeoutError:
            with contextlib.suppress(ActionRefused):
                tablet.disarm(sid)

    def _inject(self, kind: str, amount: float = 0.0) -> None:
        fault = Fault(FaultKind(kind), amount=amount)
        self.runner.apply(self.slot.pen, lambda p, now: p.inject(fault, now))
        log.info("fault injected on the simulated pen", port=self.port, fault=kind, amount=amount)

    async def _fresh_cartridge(self) -> None:
        """Single-use cartridges: swap in a new one for the next client."""
        before = self.tablet.view().cartridge_id
        self.runner.apply(self.slot.pen, lambda p, now: p.remove_cartridge(now))
        self.runner.apply(self.slot.pen, lambda p, now: p.insert_cartridge(now))
        await self.tablet.wait_for(lambda v: v.cartridge_id not in (None, before))
