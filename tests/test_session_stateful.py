"""Random therapists, managers and misbehaving pens against the session registry.

A Hypothesis state machine drives the registry through the bench (the simulator's
own firmware in a scripted world + the runtime's delivery rules) with random
sequences of therapist actions (start, select zone, set depth in and out of range,
arm, disarm, pause, override with and without a manager, end, cartridges new and
reused) and pen behaviour (button presses, telemetry with random depths and
strokes, pen faults, lease lapses, link loss, reboots, another pen on the port,
a controller restart).

The test keeps its own *oracle* of the safety facts, built only from what it
did and what the pen did (never from the registry's state), and checks:

* at the moment any command reaches the pen: no SetDepth above the effective
  zone limit or the device ceiling; no Arm without a started, running
  (not paused, interrupted or faulted) session, a selected zone with passes
  left, a depth set for that zone, a cartridge that is neither spent nor used on
  another client, and the session's own pen;
* after every step: the pen is never armed past a zone's pass limit nor outside
  an active session; pass counts match exactly; the lease is renewed only while
  the gate would allow renewing it; every refusal carries a code, a message and
  a remediation; spent cartridges stay spent; the registry's state survives
  serialise -> JSON -> deserialise exactly;
* overshoot: every telemetry sample of a running needle deeper than the zone
  limit or the setpoint plus tolerance produces an immediate Stop, unless the
  pen stopped itself first (a reading above its arming's limit plus accuracy).
"""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from controller.audit import AuditKind, canonical_json
from controller.policy import load_policy, policy_from_mapping
from controller.safety import Allowed, check_command
from controller.sessions import (
    AcknowledgeFault,
    Actor,
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    Outcome,
    OverrideZone,
    PauseSession,
    ResumeSession,
    Role,
    SelectZone,
    SessionRegistry,
    SetStrokeRate,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from firmware_protocol.messages import (
    FAULT_REASONS,
    Arm,
    CommandRefused,
    Disarmed,
    HostStopReason,
    Message,
    MotorStarted,
    Renew,
    SetDepth,
    Stop,
    StopReason,
    Telemetry,
)
from simulated_pen.firmware import FirmwareConfig

from .test_session_harness import MANAGER, PORT, PORTS, THERAPIST, Bench, BenchPen

#: The monitor's tolerance: the pen's declared depth accuracy (Identity).
TOLERANCE_UM = FirmwareConfig().depth_accuracy_um
CEILING_UM = 2500


def _policy() -> Any:
    """The default policy, with a puncture budget on the cheeks so budgets get exercised."""
    base = load_policy()
    zones: dict[str, Any] = {
        z.zone_id: {
            "label": z.label,
            "max_depth_mm": Decimal(z.max_depth_um) / 1000,
            "max_passes": z.max_passes,
        }
        for z in base.zones.values()
    }
    zones["cheeks"]["puncture_budget"] = 40
    plans = {p.plan_id: {"label": p.label, "zones": list(p.zone_ids)} for p in base.plans.values()}
    return policy_from_mapping({"policy_version": 1, "zones": zones, "plans": plans})


POLICY = _policy()
ZONES = sorted(POLICY.zones)
PLANS = sorted(POLICY.plans)
depths = st.one_of(
    st.integers(-50, 2700),
    st.sampled_from([0, 500, 750, 1000, 1500, 2000, 2500, 2501]),
)


class OracleBench(Bench):
    """The bench, checking every command as it reaches the pen."""

    machine: SessionMachine

    def _deliver(self, command: Any) -> list[Message]:
        if self.connected.get(command.port):
            self.machine.check_command_on_the_wire(command.message)
        answers = super()._deliver(command)
        if isinstance(command.message, SetDepth) and any(
            isinstance(a, CommandRefused) and a.msg_type == SetDepth.TYPE for a in answers
        ):
            # The pen kept its setpoint (armed, ARMED): the depth for the zone is unset,
            # and the pen's own (armed) setpoint stays what the arming approved.
            event("the pen refused a depth")
            self.machine.depth_for_zone = None
        return answers


def stopped_itself(messages: list[Message]) -> bool:
    """The pen's own fault stop is among what it said."""
    return any(isinstance(m, Disarmed) and m.reason in FAULT_REASONS for m in messages)


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bench = OracleBench(SessionRegistry(POLICY, ports=PORTS))
        self.bench.machine = self
        self.pen_bank = {
            "PEN0001": self.bench.new_pen("PEN0001"),
            "PEN0002": self.bench.new_pen("PEN0002"),
        }
        self.bench.pens[PORT] = self.pen_bank["PEN0001"]
        self.bench.connect()
        self.checked_outcomes = 0
        self.session_count = 0
        self.next_cartridge = 100
        self.cartridges_seen: list[int] = []
        # --- the oracle: what the test knows, independently of the registry ---
        self.sid: str | None = None
        self.plan: str | None = None
        self.started = self.paused = self.interrupted = self.needs_ack = False
        self.bound: tuple[str, int] | None = None
        self.zone: str | None = None
        self.depth_for_zone: int | None = None
        self.overrides: dict[tuple[str, str], tuple[int, int]] = {}
        self.passes: Counter[tuple[str, str]] = Counter()
        self.used_by: dict[int, str] = {}
        self.spent: set[int] = set()

    # --- oracle helpers ---------------------------------------------------------------

    @property
    def pen(self) -> BenchPen:
        return self.bench.pens[PORT]

    @property
    def connected(self) -> bool:
        return bool(self.bench.connected.get(PORT))

    def limits(self, zone: str) -> tuple[int, int]:
        assert self.sid is not None
        limits = POLICY.zones[zone]
        return self.overrides.get((self.sid, zone), (limits.max_depth_um, limits.max_passes))

    def treating(self) -> bool:
        return self.started and not (self.paused or self.interrupted or self.needs_ack)

    def identity(self) -> tuple[str, int]:
        return (self.pen.serial, self.pen.boot_id)

    def check_command_on_the_wire(self, message: Message) -> None:
        if isinstance(message, SetDepth):
            assert self.sid is not None and self.zone is not None and self.treating()
            assert 0 <= message.depth_um <= min(self.limits(self.zone)[0], CEILING_UM)
            self.depth_for_zone = message.depth_um
        elif isinstance(message, Arm):
            assert self.sid is not None and self.treating(), "Arm outside an active session"
            assert self.zone is not None, "Arm without a zone"
            max_depth, max_passes = self.limits(self.zone)
            assert self.passes[(self.sid, self.zone)] < max_passes, "Arm past the pass limit"
            assert self.depth_for_zone is not None, "Arm without a depth for this zone"
            assert self.depth_for_zone <= min(max_depth, CEILING_UM)
            cartridge = self.pen.cartridge_id
            assert cartridge is not None, "Arm without a cartridge"
            assert cartridge not in self.spent, "Arm with a spent cartridge"
            assert self.used_by.get(cartridge, self.sid) == self.sid, "another client's cartridge"
            assert self.identity() == self.bound, "Arm of a pen the session did not start on"
            assert 0 < message.lease_ms <= POLICY.max_lease_ms
            event("an Arm reached the pen")
            if self.passes[(self.sid, self.zone)] == max_passes - 1:
                event("armed for a zone's last pass")
        elif isinstance(message, Renew):
            raise AssertionError("the registry never sends Renew; the link does, when told")

    def act(self, action: Any) -> Outcome:
        return self.bench.act(action)

    def pen_says(self, events: list[Message]) -> list[Outcome]:
        for message in events:
            if isinstance(message, MotorStarted) and self.connected:
                self._count_pass_start()
        return self.bench.pen_says(events)

    def _count_pass_start(self) -> None:
        assert self.sid is not None and self.zone is not None, "the needle ran with no zone"
        self.passes[(self.sid, self.zone)] += 1
        event("a pass started")
        if self.passes[(self.sid, self.zone)] == self.limits(self.zone)[1]:
            event("a zone's last pass started")
        if self.pen.cartridge_id is not None:
            self.used_by.setdefault(self.pen.cartridge_id, self.sid)

    # --- therapist and manager ------------------------------------------------------------

    @initialize(plan=st.sampled_from(PLANS), cartridge=st.booleans())
    def a_session_is_open(self, plan: str, cartridge: bool) -> None:
        """Examples begin mid-clinic: a session started, often with a cartridge in."""
        self.create_session(plan)
        self.start_session()
        if cartridge:
            self.insert_new_cartridge()

    @rule(plan=st.sampled_from([*PLANS, "no_such_plan"]))
    def create_session(self, plan: str) -> None:
        self.session_count += 1
        sid = f"s{self.session_count}"
        outcome = self.act(CreateSession(sid, PORT, f"client-{sid}", plan, THERAPIST))
        if self.sid is not None or plan not in POLICY.plans:
            assert outcome.refusal is not None
            return
        assert outcome.refusal is None
        self.sid, self.plan = sid, plan
        self.started = self.paused = self.interrupted = self.needs_ack = False
        self.bound, self.zone, self.depth_for_zone = None, None, None

    @precondition(lambda self: self.sid is not None)
    @rule()
    def start_session(self) -> None:
        assert self.sid is not None
        outcome = self.act(StartSession(self.sid, THERAPIST))
        if outcome.refusal is None:
            assert not self.started and self.connected
            self.started, self.bound = True, self.identity()

    @precondition(lambda self: self.sid is not None)
    @rule(zone=st.sampled_from([*ZONES, "elbow"]))
    def select_zone(self, zone: str) -> None:
        assert self.sid is not None and self.plan is not None
        outcome = self.act(SelectZone(self.sid, zone, THERAPIST))
        if outcome.refusal is None:
            assert self.treating()
            assert zone in POLICY.plans[self.plan].zone_ids
            assert self.passes[(self.sid, zone)] < self.limits(zone)[1]
            assert not self.pen.armed and not self.pen.running
            if zone != self.zone:
                self.zone, self.depth_for_zone = zone, None

    @precondition(lambda self: self.sid is not None)
    @rule(depth=depths, near_limit=st.none() | st.integers(-60, 60))
    def set_depth(self, depth: int, near_limit: int | None = None) -> None:
        assert self.sid is not None
        if near_limit is not None and self.zone is not None:
            depth = self.limits(self.zone)[0] + near_limit  # the edge is where bugs live
        outcome = self.act(SetZoneDepth(self.sid, depth, THERAPIST))
        valid = (
            self.zone is not None
            and self.treating()
            and 0 <= depth <= self.limits(self.zone)[0]
            and self.connected
            and self.identity() == self.bound
            and not self.pen.running
            and not self.pen.armed  # an arming's depth never changes under it
        )
        assert (outcome.refusal is None) == valid, (outcome.refusal, depth)

    @precondition(lambda self: self.sid is not None)
    @rule(rate=st.integers(30, 170))
    def set_speed(self, rate: int) -> None:
        assert self.sid is not None
        outcome = self.act(SetStrokeRate(self.sid, rate, THERAPIST))
        if outcome.refusal is None:
            assert 50 <= rate <= 150

    @precondition(lambda self: self.sid is not None)
    @rule()
    def arm(self) -> None:
        assert self.sid is not None
        outcome = self.act(ArmPen(self.sid, THERAPIST))  # the wire check judges any Arm sent
        if outcome.refusal is not None:
            event(f"arm refused: {outcome.refusal.code}")

    @rule(data=st.data())
    def treat(self, data: st.DataObject) -> None:
        """A therapist doing it right: whatever is missing, then zone, depth, arm."""
        if self.sid is None:
            self.create_session(data.draw(st.sampled_from(PLANS), label="plan"))
        assert self.sid is not None and self.plan is not None
        if self.bound is not None and self.pen.serial != self.bound[0]:
            self.another_pen_on_the_port()  # fetch the session's own pen back
        if not self.connected:
            self.link_back()
        if not self.started:
            self.start_session()
        if self.needs_ack:
            self.therapist("acknowledge")
        if self.paused or self.interrupted:
            self.therapist("resume")
        cartridge = self.pen.cartridge_id
        reuse = data.draw(st.sampled_from(["as is", "old", "new"]), label="cartridge")
        if reuse == "old" and self.cartridges_seen:
            self.reinsert_old_cartridge(data)  # perhaps a spent one: arming must refuse it
        elif reuse == "new" or cartridge is None:
            self.insert_new_cartridge()
        zone = data.draw(st.sampled_from(POLICY.plans[self.plan].zone_ids), label="zone")
        self.therapist("disarm")
        self.select_zone(zone)
        if self.zone is not None:
            self.set_depth(data.draw(st.integers(0, self.limits(self.zone)[0]), label="depth"))
        self.arm()
        passes = data.draw(st.integers(0, 4), label="passes")
        for _ in range(passes):
            offsets = data.draw(st.lists(st.integers(-50, 80), min_size=1, max_size=3))
            self.one_pass([(o, 15) for o in offsets], StopReason.BUTTON_RELEASED)

    @precondition(lambda self: self.sid is not None)
    @rule(action=st.sampled_from(["disarm", "stop", "pause", "resume", "acknowledge"]))
    def therapist(self, action: str) -> None:
        assert self.sid is not None
        actions = {
            "disarm": DisarmPen,
            "stop": StopPen,
            "pause": PauseSession,
            "resume": ResumeSession,
            "acknowledge": AcknowledgeFault,
        }
        outcome = self.act(actions[action](self.sid, THERAPIST))
        if outcome.refusal is not None:
            return
        if action == "pause":
            assert self.treating()
            self.paused = True
        elif action == "resume":
            assert self.started and not self.needs_ack and (self.paused or self.interrupted)
            assert self.identity() == self.bound and self.connected
            self.paused = self.interrupted = False
        elif action == "acknowledge":
            assert self.needs_ack and self.connected and self.bound is not None
            assert self.pen.serial == self.bound[0]
            self.needs_ack = self.paused = self.interrupted = False
            self.bound = self.identity()
            self.depth_for_zone = self.depth_for_zone if self.pen.depth_set_um else None

    @precondition(lambda self: self.sid is not None)
    @rule(
        manager=st.booleans(),
        reason=st.sampled_from(["", "thick skin, assessed"]),
        depth=st.none() | st.integers(-10, 2700),
        passes=st.none() | st.integers(0, 10),
        zone=st.sampled_from(ZONES),
    )
    def override(
        self, manager: bool, reason: str, depth: int | None, passes: int | None, zone: str
    ) -> None:
        assert self.sid is not None and self.plan is not None
        actor = MANAGER if manager else Actor("th-02", Role.THERAPIST)
        outcome = self.act(OverrideZone(self.sid, zone, actor, reason, depth, passes))
        valid = (
            manager
            and zone in POLICY.plans[self.plan].zone_ids
            and bool(reason)
            and (depth is not None or passes is not None)
            and (depth is None or 0 < depth <= CEILING_UM)
            and (passes is None or 1 <= passes <= POLICY.max_passes_ceiling)
        )
        assert (outcome.refusal is None) == valid, (outcome.refusal, manager, depth, passes)
        if valid:
            event("override accepted")
            current = self.limits(zone)
            self.overrides[(self.sid, zone)] = (depth or current[0], passes or current[1])
            assert [a.kind for a in outcome.audit if a.kind is AuditKind.OVERRIDE]

    @precondition(lambda self: self.sid is not None)
    @rule()
    def end_session(self) -> None:
        assert self.sid is not None
        outcome = self.act(EndSession(self.sid, THERAPIST))
        assert outcome.refusal is None
        assert not self.pen.armed
        if any(s == self.sid for s in self.used_by.values()):
            event("a session that used a cartridge ended")
        self.spent |= {c for c, s in self.used_by.items() if s == self.sid}
        self.sid = None

    # --- cartridges ------------------------------------------------------------------------

    @rule()
    def insert_new_cartridge(self) -> None:
        self.next_cartridge += 1
        self.cartridges_seen.append(self.next_cartridge)
        self._insert(self.next_cartridge)

    @precondition(lambda self: bool(self.cartridges_seen))
    @rule(data=st.data())
    def reinsert_old_cartridge(self, data: st.DataObject) -> None:
        self._insert(data.draw(st.sampled_from(self.cartridges_seen), label="cartridge"))

    def _insert(self, cartridge: int) -> None:
        events = self.pen.insert(cartridge)
        if stopped_itself(events) and self.connected:
            self._pen_fault()  # a cartridge pulled while armed
        self.pen_says(events)

    @rule()
    def remove_cartridge(self) -> None:
        was_active = self.pen.armed or self.pen.running
        events = self.pen.remove()
        assert stopped_itself(events) == was_active  # the pen's rule, through the harness
        if was_active and self.connected:
            self._pen_fault()
        self.pen_says(events)

    # --- the pen ----------------------------------------------------------------------------

    @rule()
    def press_button(self) -> None:
        self.pen_says(self.pen.press())

    @rule(
        samples=st.lists(st.tuples(st.integers(-100, 120), st.integers(0, 15)), max_size=4),
        reason=st.sampled_from([StopReason.BUTTON_RELEASED, StopReason.LIFT_OFF]),
    )
    def one_pass(self, samples: list[tuple[int, int]], reason: StopReason) -> None:
        """Press, a few samples near the setpoint (sometimes over it), release."""
        self.press_button()
        for offset, strokes in samples:
            self.telemetry(offset, strokes)
        self.release_button(reason)

    @rule(reason=st.sampled_from([StopReason.BUTTON_RELEASED, StopReason.LIFT_OFF]))
    def release_button(self, reason: StopReason) -> None:
        self.pen_says(self.pen.release(reason))

    @rule(offset=st.integers(-300, 700), strokes=st.integers(0, 60))
    def telemetry(self, offset: int, strokes: int) -> None:
        if not self.connected:
            return
        depth = max(0, (self.pen.depth_set_um or 0) + offset)
        *said, sample = self.pen.sample(depth, strokes)
        assert isinstance(sample, Telemetry)
        if stopped_itself(said):
            # The reading passed the arming's limit plus the pen's accuracy: the pen
            # stopped the needle itself before this sample, and says so first.
            event("the pen stopped itself on depth")
            self._pen_fault()
        self.pen_says(said)
        running = self.pen.running
        outcome = self.bench.registry.pen_message(PORT, sample, self.bench.tick())
        sent = [c.message for c in outcome.commands]
        if running:
            limit = self.limits(self.zone)[0] if self.sid and self.zone else 0
            # Beyond the approved depth (or the zone's limit) by more than the pen's accuracy.
            allowed = min(limit, self.depth_for_zone or 0) + TOLERANCE_UM
            if self.sid is None or self.zone is None or depth > allowed:
                assert sent and isinstance(sent[0], Stop), "an overshoot did not stop at once"
                event("overshoot stopped")
                assert outcome.urgent_commands
                if self.sid is not None and self.started:
                    self.needs_ack = True
        else:
            assert not sent, "an idle pen was stopped on telemetry"
        self.bench.feed(outcome)

    @rule(reason=st.sampled_from(sorted(FAULT_REASONS)))
    def pen_fault(self, reason: StopReason) -> None:
        events = self.pen.fault(reason)  # the physical cause; the firmware decides
        if stopped_itself(events) and self.connected:
            self._pen_fault()
        self.pen_says(events)

    def _pen_fault(self) -> None:
        if self.sid is not None and self.started:
            self.needs_ack = True

    @rule()
    def lease_lapses(self) -> None:
        self.bench.lease_lapses()

    @rule()
    def link_renews(self) -> None:
        self.bench.renew()

    # --- link and controller ----------------------------------------------------------------

    @precondition(lambda self: self.connected)
    @rule()
    def link_lost(self) -> None:
        self.bench.disconnect()
        if self.sid is not None and self.started:
            self.interrupted = True

    @precondition(lambda self: not self.connected)
    @rule()
    def link_back(self) -> None:
        self.bench.connect()
        if self.sid is not None and self.started and self.identity() != self.bound:
            self.needs_ack = True

    @precondition(lambda self: self.connected)
    @rule()
    def pen_reboots(self) -> None:
        self.bench.reboot()
        if self.sid is not None and self.started:
            self.needs_ack = True
            self.depth_for_zone = None

    @rule()
    def another_pen_on_the_port(self) -> None:
        if self.connected:
            self.link_lost()
        other = "PEN0002" if self.pen.serial == "PEN0001" else "PEN0001"
        self.bench.pens[PORT] = self.pen_bank[other]
        self.link_back()
        if self.sid is not None and self.started and self.identity() != self.bound:
            self.depth_for_zone = None

    @rule()
    def controller_restarts(self) -> None:
        journal = json.loads(json.dumps(self.bench.registry.to_dict()))
        self.pen.lose_host()
        self.bench.connected[PORT] = False
        self.bench.renewing[PORT] = None
        self.bench.registry = SessionRegistry.from_dict(POLICY, journal, ports=PORTS)
        self.bench.feed(self.bench.registry.recover(self.bench.tick()))
        if self.sid is not None and self.started:
            self.interrupted = True

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def state_round_trips_exactly(self) -> None:
        state = self.bench.registry.to_dict()
        through_json = json.loads(json.dumps(state))
        assert through_json == state
        assert SessionRegistry.from_dict(POLICY, through_json, ports=PORTS).to_dict() == state

    @invariant()
    def the_pen_is_armed_only_within_limits(self) -> None:
        if not (self.pen.armed or self.pen.running):
            return
        assert self.sid is not None and self.zone is not None
        assert self.treating(), "armed or running outside an active session"
        done = self.passes[(self.sid, self.zone)]
        max_passes = self.limits(self.zone)[1]
        if self.pen.running:
            assert done <= max_passes
        else:
            assert done < max_passes, "armed past the zone's pass limit"
        assert self.pen.cartridge_id not in self.spent
        assert self.pen.depth_set_um is not None
        assert self.pen.depth_set_um <= min(self.limits(self.zone)[0], CEILING_UM)

    @invariant()
    def pass_counts_match(self) -> None:
        if self.sid is None:
            return
        session = self.bench.registry.session(self.sid)
        assert session is not None
        for zone_id, zone in session.zones.items():
            running = session.current_pass is not None and session.current_pass.zone_id == zone_id
            assert zone.passes_done + int(running) == self.passes[(self.sid, zone_id)], zone_id
            assert (zone.max_depth_um, zone.max_passes) == self.limits(zone_id)

    @invariant()
    def cartridges_are_single_use(self) -> None:
        ledger = self.bench.registry.ledger
        for cartridge in self.spent:
            assert ledger.status(cartridge, "anyone") == "spent"
        for cartridge, sid in self.used_by.items():
            record = ledger.record(cartridge)
            assert record is not None and record.session_id == sid

    @invariant()
    def renewal_only_while_the_gate_allows_it(self) -> None:
        token = self.bench.renewing.get(PORT)
        if token is None:
            return
        decision = check_command(self.bench.registry.gate_context(PORT), Renew(token))
        assert isinstance(decision, Allowed), decision

    @invariant()
    def every_refusal_explains_itself(self) -> None:
        for outcome in self.bench.outcomes[self.checked_outcomes :]:
            if outcome.refusal is not None:
                assert outcome.refusal.code
                assert outcome.refusal.message.strip()
                assert outcome.refusal.remediation.strip()
            for entry in outcome.audit:
                assert entry.message.strip()
                canonical_json(dict(entry.details))  # JSON-able, ready for the audit log
                if entry.kind is AuditKind.REFUSAL:
                    assert entry.details.get("code") or entry.details.get("by") == "pen"
                    assert entry.remediation.strip()
                if entry.kind is AuditKind.STOP:
                    assert entry.details.get("reason") or entry.details.get("pen_reason")
            for command in outcome.commands:
                if isinstance(command.message, Stop):
                    HostStopReason(command.message.reason)
        self.checked_outcomes = len(self.bench.outcomes)


SessionMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSessions = SessionMachine.TestCase
