"""Random therapists, managers, misbehaving pens, broken links and dying controllers.

A Hypothesis state machine drives the registry through the bench (the simulator's
own firmware in a scripted world + the runtime's delivery rules) with random
sequences of therapist actions (start, select zone, set depth in and out of range,
arm, disarm, pause, override with and without a manager, end, cartridges new and
reused, moved between pens) and the world's behaviour:

* the pen: button presses, passes, telemetry with random depths and strokes, pen
  faults, lease lapses, reboots (with the link up, or while nobody listens), another
  pen on the port;
* the link: a cable pulled and noticed at once, or a cable that breaks *after the
  next k deliveries* of one step (a command applied with its acknowledgement lost,
  a reliable pen message lost with the link: PROTOCOL.md section 8.3), noticed by
  the host only later; telemetry lost, duplicated, or overtaken and delivered late
  (``MessageReceived(in_order=False)``, section 9);
* the controller: death between any two steps, or in the middle of one (after the
  next k deliveries), restarted from a journal taken at an earlier step boundary
  (the writer thread's commit lag), then ``from_dict`` + ``recover``;
* the therapist pressing the run button within the lease while the controller is
  not listening (after a link loss or a controller death).

The test keeps its own *oracle*, never read from the registry: what it did, and
what the pen really did (the firmware's state and a record of every arming, run
and stroke it made: the world). It checks:

* at the moment any command reaches the pen: no SetDepth above the effective
  zone limit or the device ceiling; no Arm without a started, running
  (not paused, interrupted or faulted) session, a selected zone with passes
  left, a depth set for that zone, a cartridge that is neither spent nor used on
  another client, and the session's own pen;
* (1) depth: every telemetry sample the controller receives, in order or not,
  that shows a running needle deeper than the approved setpoint (or the zone's
  limit) plus the pen's declared accuracy is answered at once by a Stop, unless the
  pen stopped itself first; a sample nobody receives is beyond the pen's arming
  limit plus accuracy only if the pen stopped itself;
* (2) passes: every motor run the pen made is a counted pass of the session and
  zone it was armed for, once the controller has heard from the pen again (before
  that, the registry never counts more than ran). Runs hidden by a pen reboot
  nobody saw (its run counter restarts; only the cartridge chip remembers) are the
  one tolerance, bounded and counted;
* (3) cartridges: no cartridge whose chip shows strokes ever arms for a client other
  than the one whose passes put them there;
* after every step: the pen is armed only within limits while the controller holds
  the link; the lease is renewed only while the gate would allow renewing it; every
  refusal carries a code, a message and a remediation; spent cartridges stay spent;
  the registry's state survives serialise -> JSON -> deserialise exactly.

The journal a dead controller restarts from is never older than the last Arm that
reached the pen: the runtime sends an Arm only once its own record is durable
(controller/executor.py), and records commit in decision order.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, Phase, event, settings
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
from firmware_protocol.connection import Delivered, MessageReceived
from firmware_protocol.messages import (
    FAULT_REASONS,
    Arm,
    Armed,
    CommandRefused,
    Disarmed,
    HostStopReason,
    Message,
    MotorStarted,
    MotorStopped,
    Renew,
    SetDepth,
    Stop,
    StopReason,
    Telemetry,
    TelemetryFlag,
)
from simulated_pen.firmware import FirmwareConfig, PenFirmware

from .test_session_harness import (
    MANAGER,
    NOTICE_S,
    PORT,
    PORTS,
    THERAPIST,
    Bench,
    BenchPen,
)

#: The monitor's tolerance: the pen's declared depth accuracy (Identity).
TOLERANCE_UM = FirmwareConfig().depth_accuracy_um
CEILING_UM = 2500
#: Journal points kept for a controller death to choose from (all after the last Arm).
JOURNAL_DEPTH = 8


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
Key = tuple[str, str]  # (session id, zone id)
#: How a telemetry sample travels (PROTOCOL.md section 9: lost, duplicated, overtaken).
DELIVERIES = ("in order", "in order", "lost", "duplicated", "overtaken")


@dataclass(frozen=True)
class Approval:
    """An Arm as it reached the pen: for which session and zone, at what depth and limit."""

    sid: str
    zone: str
    depth_um: int
    limit_um: int


@dataclass
class Run:
    """One motor run the pen really made (the world's history)."""

    serial: str
    boot: int
    number: int  # the pen's run counter for it
    key: Key
    approval: Approval  # the arming it ran under
    heard: bool = False  # its MotorStarted reached the registry
    hidden: bool = False  # a reboot nobody saw hid it from the counters (the slack)


class WorldFirmware(PenFirmware):
    """The simulator's firmware, unchanged, telling the oracle what it really does."""

    machine: SessionMachine | None = None
    serial = ""

    def _on_arm(self, message: Message, now: float, out: list[Message]) -> None:
        before = len(out)
        super()._on_arm(message, now, out)
        if self.machine is not None and any(isinstance(m, Armed) for m in out[before:]):
            assert isinstance(message, Arm)
            self.machine.world_pen_armed(self, message)

    def _try_start(self, now: float, out: list[Message]) -> None:
        before = self.runs
        super()._try_start(now, out)
        if self.machine is not None and self.runs != before:
            self.machine.world_run_started(self)

    def _count_strokes(self) -> None:
        cid = self.cartridge_id
        before = self.cartridge_chips.get(cid, 0) if cid is not None else 0
        super()._count_strokes()
        if self.machine is not None and cid is not None and self.cartridge_chips[cid] > before:
            self.machine.world_strokes(self, cid)


class OracleBench(Bench):
    """The bench, checking every command as it reaches the pen, and able to break the
    link (or kill the controller) after a given number of deliveries."""

    machine: SessionMachine
    #: Deliveries left before the link breaks (None: no break scheduled).
    cut: int | None = None

    def _spend(self, port: str) -> bool:
        """One delivery on ``port``: False if the link is (now) broken."""
        if not self.connected.get(port):
            return False
        if self.cut is not None:
            if self.cut == 0:
                self.cut = None
                self.machine.cable_breaks()
                return False
            self.cut -= 1
        return True

    def _deliver(self, command: Any) -> list[Message]:
        if not self._spend(command.port):
            return []
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

    def _hear(self, port: str, event: Message | Delivered) -> Outcome | None:
        if not self._spend(port):
            return None
        if isinstance(event, MotorStarted):
            self.machine.run_heard(event)
        elif isinstance(event, MotorStopped):
            self.machine.stop_heard(event)
        return super()._hear(port, event)


def stopped_itself(messages: list[Message]) -> bool:
    """The pen's own fault stop is among what it said."""
    return any(isinstance(m, Disarmed) and m.reason in FAULT_REASONS for m in messages)


class RecordingRegistry(SessionRegistry):
    """The registry, unchanged (a subclass only so that from_dict builds the same kind)."""


#: What the oracle believes of the controller's decisions: restored with the journal
#: when a controller dies (the world, the pen's history, is never restored).
CONTROLLER_FACTS = (
    "sid",
    "plan",
    "started",
    "paused",
    "interrupted",
    "needs_ack",
    "bound",
    "zone",
    "depth_for_zone",
    "overrides",
    "used_by",
    "spent",
    "sessions",
)


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bench = OracleBench(RecordingRegistry(POLICY, ports=PORTS))
        self.bench.machine = self
        self.chips: dict[int, int] = {}  # every cartridge's own memory (the world's)
        self.pen_bank = {serial: self._new_pen(serial) for serial in ("PEN0001", "PEN0002")}
        self.bench.pens[PORT] = self.pen_bank["PEN0001"]
        # --- the world: what the pens really did (never restored) ---
        self.approvals: dict[int, Approval] = {}  # Arm token -> what it approved
        self.runs: list[Run] = []
        self.world_runs: Counter[Key] = Counter()
        #: Runs a reboot nobody saw (or a journal older than one) may hide from the
        #: registry (its run counter restarted): the registry may count this many fewer,
        #: and one more (the cartridge chip says "at least one pass ran").
        self.slack: Counter[Key] = Counter()
        self.over: set[Key] = set()
        self.stroke_clients: dict[int, set[str]] = {}  # cartridge -> who put strokes on it
        self.link = "down"  # "up", "broken" (the host has not noticed yet) or "down"
        self.link_epoch = 0
        self.broke_at = 0.0
        self.identity_at_break: tuple[str, int] | None = None
        self.run_open = False  # a MotorStarted heard without its MotorStopped
        self.held: list[tuple[int, Telemetry, Approval | None]] = []  # overtaken samples
        #: (registry state, controller facts, each run's ``heard`` then, each pen's boot)
        self.journal: list[
            tuple[dict[str, Any], dict[str, Any], tuple[bool, ...], dict[str, int]]
        ] = []
        self.arm_on_the_wire = False
        self.checked_outcomes = 0
        self.session_count = 0
        self.next_cartridge = 100
        self.cartridges_seen: list[int] = []
        # --- the oracle of the controller's decisions (restored with a journal) ---
        self.sid: str | None = None
        self.plan: str | None = None
        self.started = self.paused = self.interrupted = self.needs_ack = False
        self.bound: tuple[str, int] | None = None
        self.zone: str | None = None
        self.depth_for_zone: int | None = None
        self.overrides: dict[tuple[str, str], tuple[int, int]] = {}
        self.used_by: dict[int, str] = {}
        self.spent: set[int] = set()
        self.sessions: list[str] = []
        self.link_back()

    def _new_pen(self, serial: str) -> BenchPen:
        pen = self.bench.new_pen(serial, chips=self.chips, firmware_type=WorldFirmware)
        assert isinstance(pen.firmware, WorldFirmware)
        pen.firmware.machine = self
        pen.firmware.serial = serial
        return pen

    # --- the world, as the firmware reports it ----------------------------------------

    def world_pen_armed(self, fw: WorldFirmware, arm: Arm) -> None:
        approval = self.approvals.get(arm.token)
        assert approval is not None, "the pen armed on an Arm nobody approved"
        cartridge = fw.cartridge_id
        if cartridge is not None and self.chips.get(cartridge, 0):
            clients = self.stroke_clients.get(cartridge, set())
            # (3) a cartridge with strokes on it never arms for a second client
            assert clients <= {approval.sid}, (
                f"cartridge {cartridge} with strokes from {clients} armed for {approval.sid}"
            )
            event("a used cartridge armed again for its own client")

    def world_run_started(self, fw: WorldFirmware) -> None:
        approval = self.approvals[fw.token]
        key = (approval.sid, approval.zone)
        self.world_runs[key] += 1
        self.runs.append(Run(fw.serial, self._boot_of(fw), fw.runs, key, approval))
        if not self.connected:
            event("the pen ran while the controller was not listening")

    def world_strokes(self, fw: WorldFirmware, cartridge: int) -> None:
        approval = self.approvals[fw.token]
        self.stroke_clients.setdefault(cartridge, set()).add(approval.sid)

    def _boot_of(self, fw: WorldFirmware) -> int:
        return self.pen_bank[fw.serial].boot_id

    def run_heard(self, message: MotorStarted) -> None:
        for run in reversed(self.runs):
            same_boot = run.serial == self.pen.serial and run.boot == self.pen.boot_id
            if same_boot and run.number == message.runs:
                run.heard = True
                break
        self.run_open = True
        if self.pen.cartridge_id is not None and self.sid is not None:
            self.used_by.setdefault(self.pen.cartridge_id, self.sid)
        event("a pass started")

    def stop_heard(self, message: MotorStopped) -> None:
        """The end of a run reaches the registry, with the deepest reading of the run.

        (1) also holds for samples nobody received: a pass whose peak is deeper than its
        arming's setpoint (or the zone's limit) plus the accuracy is an overshoot the pen
        confirms in a reliable message, and the registry faults the session on it
        (pen_events._on_motor_stopped) just as it would on the sample. Without this the
        oracle missed every overshoot whose samples were all lost, and then expected the
        faulted session to take the therapist's next depth."""
        if self.run_open and self.sid is not None and self.started:
            run = next(
                (
                    r
                    for r in reversed(self.runs)
                    if (r.serial, r.boot, r.number) == (*self.identity(), message.runs)
                ),
                None,
            )
            assert run is not None, "a MotorStopped for a run the pen never made"
            approval = run.approval
            limit = self.limits(approval.zone)[0] if approval.sid == self.sid else 0
            if message.peak_depth_um > min(limit, approval.depth_um) + TOLERANCE_UM:
                event("an overshoot known only from the pass's peak")
                self.needs_ack = True
        self.run_open = False

    # --- oracle helpers ---------------------------------------------------------------

    @property
    def pen(self) -> BenchPen:
        return self.bench.pens[PORT]

    @property
    def connected(self) -> bool:
        """The cable carries frames (the registry hears the pen)."""
        return bool(self.bench.connected.get(PORT))

    @property
    def in_control(self) -> bool:
        """The controller holds an intact link it knows of: every prediction applies."""
        return self.link == "up"

    def limits(self, zone: str, sid: str | None = None) -> tuple[int, int]:
        sid = sid or self.sid
        assert sid is not None
        limits = POLICY.zones[zone]
        return self.overrides.get((sid, zone), (limits.max_depth_um, limits.max_passes))

    def countable(self, key: Key) -> int:
        """Passes of ``key`` the registry can surely know of (the world's, less the slack)."""
        return self.world_runs[key] - self.slack[key]

    def treating(self) -> bool:
        return self.started and not (self.paused or self.interrupted or self.needs_ack)

    def identity(self) -> tuple[str, int]:
        return (self.pen.serial, self.pen.boot_id)

    def pen_as_heard(self) -> tuple[tuple[str, int], bool]:
        """The pen's identity, and whether its needle runs, as the registry can know them.

        On a broken link the host has not noticed yet, nothing the pen did after the
        break (a reboot nobody saw, a press of the button) has reached the registry: it
        goes by the pen as it last heard it, what it sends is lost with the link, and the
        next handshake reconciles (a changed pen faults the session, a depth it does not
        hold is cleared). Judging its answers by the pen's state since the break asked
        it to know what it cannot. In control, this is the pen itself."""
        if self.link == "broken":
            assert self.identity_at_break is not None
            return self.identity_at_break, self.run_open
        return self.identity(), self.pen.running

    def approval_now(self) -> Approval | None:
        fw = self.pen.firmware
        return self.approvals.get(fw.token) if fw.armed else None

    def check_command_on_the_wire(self, message: Message) -> None:
        if isinstance(message, SetDepth):
            assert self.sid is not None and self.zone is not None and self.treating()
            assert 0 <= message.depth_um <= min(self.limits(self.zone)[0], CEILING_UM)
            self.depth_for_zone = message.depth_um
        elif isinstance(message, Arm):
            assert self.in_control, "an Arm went out on a link the controller lost"
            assert self.sid is not None and self.treating(), "Arm outside an active session"
            assert self.zone is not None, "Arm without a zone"
            max_depth, max_passes = self.limits(self.zone)
            key = (self.sid, self.zone)
            assert self.countable(key) < max_passes, "Arm past the pass limit"
            assert self.depth_for_zone is not None, "Arm without a depth for this zone"
            assert self.depth_for_zone <= min(max_depth, CEILING_UM)
            assert message.depth_um == self.depth_for_zone
            assert message.max_depth_um == max_depth
            cartridge = self.pen.cartridge_id
            assert cartridge is not None, "Arm without a cartridge"
            assert cartridge not in self.spent, "Arm with a spent cartridge"
            assert self.used_by.get(cartridge, self.sid) == self.sid, "another client's cartridge"
            assert self.identity() == self.bound, "Arm of a pen the session did not start on"
            assert 0 < message.lease_ms <= POLICY.max_lease_ms
            self.approvals[message.token] = Approval(
                self.sid, self.zone, message.depth_um, message.max_depth_um
            )
            self.arm_on_the_wire = True
            event("an Arm reached the pen")
            if self.countable(key) == max_passes - 1:
                event("armed for a zone's last pass")
        elif isinstance(message, Renew):
            raise AssertionError("the registry never sends Renew; the link does, when told")

    def act(self, action: Any) -> Outcome:
        return self.bench.act(action)

    def pen_says(self, events: list[Message]) -> list[Outcome]:
        return self.bench.pen_says(events)

    def _controller_facts(self) -> dict[str, Any]:
        return copy.deepcopy({name: getattr(self, name) for name in CONTROLLER_FACTS})

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
        self.sessions.append(sid)
        self.started = self.paused = self.interrupted = self.needs_ack = False
        self.bound, self.zone, self.depth_for_zone = None, None, None
        self.held.clear()

    @precondition(lambda self: self.sid is not None)
    @rule()
    def start_session(self) -> None:
        assert self.sid is not None
        outcome = self.act(StartSession(self.sid, THERAPIST))
        if outcome.refusal is None:
            assert not self.started and self.link != "down"
            self.started, self.bound = True, self.identity()

    @precondition(lambda self: self.sid is not None)
    @rule(zone=st.sampled_from([*ZONES, "elbow"]))
    def select_zone(self, zone: str) -> None:
        assert self.sid is not None and self.plan is not None
        outcome = self.act(SelectZone(self.sid, zone, THERAPIST))
        if outcome.refusal is None:
            assert self.treating()
            assert zone in POLICY.plans[self.plan].zone_ids
            assert self.countable((self.sid, zone)) < self.limits(zone)[1]
            assert not self.pen.armed and not self.pen_as_heard()[1]
            if zone != self.zone:
                self.zone, self.depth_for_zone = zone, None

    @precondition(lambda self: self.sid is not None)
    @rule(depth=depths, near_limit=st.none() | st.integers(-60, 60))
    def set_depth(self, depth: int, near_limit: int | None = None) -> None:
        assert self.sid is not None
        if near_limit is not None and self.zone is not None:
            depth = self.limits(self.zone)[0] + near_limit  # the edge is where bugs live
        outcome = self.act(SetZoneDepth(self.sid, depth, THERAPIST))
        identity, running = self.pen_as_heard()
        valid = (
            self.zone is not None
            and self.treating()
            and 0 <= depth <= self.limits(self.zone)[0]
            and identity == self.bound
            and not running
            and not self.pen.armed  # an arming's depth never changes under it
        )
        if self.in_control or outcome.refusal is None:
            # On a broken link the registry may still believe a lapsed pen armed.
            assert (outcome.refusal is None) == (valid and self.link != "down"), (
                outcome.refusal,
                depth,
            )

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
        if self.link == "broken":
            self.host_notices()
        if self.link == "down":
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
            self.one_pass([(o, 15, "in order") for o in offsets], StopReason.BUTTON_RELEASED)

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
            assert self.pen_as_heard()[0] == self.bound and self.link != "down"
            self.paused = self.interrupted = False
        elif action == "acknowledge":
            assert self.needs_ack and self.link != "down" and self.bound is not None
            assert self.pen.serial == self.bound[0]
            self.needs_ack = self.paused = self.interrupted = False
            self.bound = self.pen_as_heard()[0]  # the boot the registry knows of
            # The registry keeps an approved depth the pen still holds (a rebooted pen holds
            # none). 0 mm is a depth: testing the setpoint's truth here once dropped it.
            self.depth_for_zone = self.depth_for_zone if self.pen.depth_set_um is not None else None

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
        if self.in_control:
            assert not self.pen.armed
        if any(s == self.sid for s in self.used_by.values()):
            event("a session that used a cartridge ended")
        self.spent |= {c for c, s in self.used_by.items() if s == self.sid}
        self.sid = None
        self.held.clear()

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
        samples=st.lists(
            st.tuples(st.integers(-100, 120), st.integers(0, 15), st.sampled_from(DELIVERIES)),
            max_size=4,
        ),
        reason=st.sampled_from([StopReason.BUTTON_RELEASED, StopReason.LIFT_OFF]),
    )
    def one_pass(self, samples: list[tuple[int, int, str]], reason: StopReason) -> None:
        """Press, a few samples near the setpoint (sometimes over it, sometimes lost,
        duplicated or overtaken), release; the overtaken ones arrive last."""
        self.press_button()
        for offset, strokes, delivery in samples:
            self.telemetry(offset, strokes, delivery)
        while self.held:
            self._late_sample(len(self.held) - 1)
        self.release_button(reason)

    @rule(reason=st.sampled_from([StopReason.BUTTON_RELEASED, StopReason.LIFT_OFF]))
    def release_button(self, reason: StopReason) -> None:
        self.pen_says(self.pen.release(reason))

    @rule(
        offset=st.integers(-300, 700),
        strokes=st.integers(0, 60),
        delivery=st.sampled_from(DELIVERIES),
    )
    def telemetry(self, offset: int, strokes: int, delivery: str = "in order") -> None:
        depth = max(0, (self.pen.depth_set_um or 0) + offset)
        approval = self.approval_now()
        was_running = self.pen.running
        *said, sample = self.pen.sample(depth, strokes)
        assert isinstance(sample, Telemetry)
        if was_running and approval is not None and depth > approval.limit_um + TOLERANCE_UM:
            # (1), with no host: past the arming's limit plus its accuracy, the pen itself
            # stops the needle before this sample, and says so first.
            assert stopped_itself(said) and not self.pen.running
        if stopped_itself(said) and self.connected:
            event("the pen stopped itself on depth")
            self._pen_fault()
        self.pen_says(said)
        if not self.connected or delivery == "lost":
            return
        if delivery == "overtaken":
            self.held.append((self.link_epoch, sample, approval))
            return
        self._judge(sample, approval, in_order=True)
        if delivery == "duplicated":
            self._judge(sample, approval, in_order=False)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def overtaken_sample_arrives(self, data: st.DataObject) -> None:
        """A sample overtaken on the line arrives late: delivered, marked not in order."""
        self._late_sample(data.draw(st.integers(0, len(self.held) - 1), label="sample"))

    def _late_sample(self, index: int) -> None:
        epoch, sample, approval = self.held.pop(index)
        if epoch == self.link_epoch and self.connected:
            event("a late sample was judged")
            self._judge(sample, approval, in_order=False)

    def _judge(self, sample: Telemetry, approval: Approval | None, *, in_order: bool) -> None:
        """One sample reaches the registry: (1) an overshoot is stopped at once."""
        running = bool(sample.flags & TelemetryFlag.MOTOR_RUNNING)
        outcome = self.bench.registry.handle_link_event(
            PORT, MessageReceived(sample, in_order=in_order), self.bench.tick()
        )
        sent = [c.message for c in outcome.commands]
        if running:
            assert approval is not None, "the needle ran with no approved arming"
            # Once the session it was armed for is over, no depth is approved.
            limit = self.limits(approval.zone)[0] if approval.sid == self.sid else 0
            allowed = min(limit, approval.depth_um) + TOLERANCE_UM
            if self.sid is None or self.zone is None or sample.depth_um > allowed:
                assert sent and isinstance(sent[0], Stop), "an overshoot did not stop at once"
                assert outcome.urgent_commands
                event("overshoot stopped" if in_order else "a late overshoot stopped")
                if self.sid is not None and self.started:
                    self.needs_ack = True
        elif in_order:
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

    @precondition(lambda self: self.link != "up")
    @rule(strokes=st.integers(0, 30))
    def press_while_nobody_listens(self, strokes: int) -> None:
        """The therapist presses within the lease after a link loss or a controller
        death: if the pen is still armed, the needle runs and nobody hears it."""
        self.press_button()
        self.telemetry(0, strokes, "lost")
        self.release_button(StopReason.BUTTON_RELEASED)

    @rule()
    def lease_lapses(self) -> None:
        self.bench.lease_lapses()

    @rule()
    def link_renews(self) -> None:
        self.bench.renew()

    # --- link and controller ----------------------------------------------------------------

    @precondition(lambda self: self.link == "up")
    @rule()
    def link_lost(self) -> None:
        """The cable is pulled and the host notices at once (its silence timeout)."""
        self.bench.disconnect()
        self._link_is_down()

    def cable_breaks(self) -> None:
        """The cable breaks now; the host notices only later (``host_notices``)."""
        self.bench.connected[PORT] = False
        self.pen.renew_token = None
        self.link = "broken"
        self.broke_at = self.bench.now
        self.identity_at_break = self.identity()
        self.link_epoch += 1
        event("the link broke with deliveries in flight")

    @precondition(lambda self: self.link == "broken")
    @rule()
    def host_notices(self) -> None:
        """The host's silence timeout fires: everything in flight was abandoned."""
        until = self.broke_at + NOTICE_S
        if until > self.bench.now:
            self.pen.advance(self.bench.tick(until - self.bench.now))
        self.pen.pending_telemetry.clear()  # nobody heard it
        self.bench.feed(self.bench.registry.link_down(PORT, "silence", self.bench.tick()))
        self._link_is_down()

    def _link_is_down(self) -> None:
        self.link = "down"
        self.link_epoch += 1
        self.held.clear()
        self.run_open = False
        if self.sid is not None and self.started:
            self.interrupted = True

    @precondition(lambda self: self.link == "down")
    @rule()
    def link_back(self) -> None:
        """A new link: the pen disarms for its new host and reports its state (Status)."""
        unheard = [r for r in self.runs if not r.heard and r.serial == self.pen.serial]
        self.bench.connect()
        self.link = "up"
        self.link_epoch += 1
        current = [r for r in unheard if r.boot == self.pen.boot_id]
        if any(r.key[0] != self.sid for r in current) and self.sid is not None and self.started:
            self.needs_ack = True  # runs under another session's arming: not approved here
        for run in current:
            run.heard = True  # reconciled from the pen's counters
            event("a run nobody heard was recovered")
        if self.sid is not None and self.started and self.identity() != self.bound:
            self.needs_ack = True
            self.depth_for_zone = None

    @precondition(lambda self: self.link == "up")
    @rule()
    def pen_reboots(self) -> None:
        self.bench.reboot()
        self.link_epoch += 1
        self.held.clear()
        self.run_open = False
        if self.sid is not None and self.started:
            self.needs_ack = True
            self.depth_for_zone = None

    @precondition(lambda self: self.link != "up")
    @rule()
    def pen_reboots_unseen(self) -> None:
        """The pen power-cycles while nobody listens: its run counter starts again."""
        self._hide_runs(self.pen.serial, self.pen.boot_id)
        self.pen.reboot()
        event("the pen rebooted while nobody listened")

    def _hide_runs(self, serial: str, boot: int) -> None:
        """Runs of ``serial`` from ``boot`` on that the controller has not counted can no
        longer be told from its counters: only the cartridge chip says that one ran."""
        for run in self.runs:
            if run.serial == serial and run.boot >= boot:
                self.over.add(run.key)
                if not run.heard:
                    self.slack[run.key] += 1
                    run.heard = run.hidden = True  # accounted for, by the slack

    @rule()
    def another_pen_on_the_port(self) -> None:
        if self.link == "up":
            self.link_lost()
        elif self.link == "broken":
            self.host_notices()
        leaving = self.pen.serial
        # The registry keeps what it counted of a pen that leaves the port (by serial):
        # its runs nobody heard are counted when it comes back, not before.
        other = "PEN0002" if leaving == "PEN0001" else "PEN0001"
        self.bench.pens[PORT] = self.pen_bank[other]
        self.link_back()
        if self.sid is not None and self.started and self.identity() != self.bound:
            self.depth_for_zone = None

    @precondition(lambda self: self.link == "up")
    @rule(
        k=st.integers(0, 12),
        during=st.sampled_from(
            [
                "arm",
                "disarm",
                "stop",
                "pause",
                "end",
                "depth",
                "press",
                "release",
                "pass",
                "treat",
                "treat",
            ]
        ),
        then=st.sampled_from(["link", "controller"]),
        press=st.none() | st.integers(0, 30),
        data=st.data(),
    )
    def outage_mid_step(
        self, k: int, during: str, then: str, press: int | None, data: st.DataObject
    ) -> None:
        """The link breaks (or the controller dies) after the next ``k`` deliveries of one
        step, in either direction: commands may be applied with their ACK lost, pen
        messages lost with the link."""
        steps: dict[str, Callable[[], None]] = {
            "arm": self.arm,
            "disarm": lambda: self.therapist("disarm"),
            "stop": lambda: self.therapist("stop"),
            "pause": lambda: self.therapist("pause"),
            "end": self.end_session if self.sid is not None else self.press_button,
            "depth": lambda: self.set_depth(data.draw(depths, label="depth")),
            "press": self.press_button,
            "release": lambda: self.release_button(StopReason.BUTTON_RELEASED),
            "pass": lambda: self.one_pass(
                [(0, 10, "in order"), (30, 10, "duplicated")], StopReason.BUTTON_RELEASED
            ),
            "treat": lambda: self.treat(data),
        }
        if self.sid is None and during in ("arm", "disarm", "stop", "pause", "depth"):
            during = "press"
        self.bench.cut = k
        steps[during]()
        self.bench.cut = None
        if self.link == "up":
            self.cable_breaks()  # the step had fewer deliveries: it breaks right after
        if then == "controller":
            self.controller_dies(data, mid_step=True)
        if press is not None:
            self.press_while_nobody_listens(press)

    @precondition(lambda self: self.link == "up" and self.pen.armed and not self.pen.running)
    @rule(then=st.sampled_from(["link", "controller"]), strokes=st.integers(0, 30), data=st.data())
    def armed_pen_runs_unheard(self, then: str, strokes: int, data: st.DataObject) -> None:
        """An armed pen loses its controller (cable, or SIGKILL) and the therapist presses
        within the lease: a run nobody hears, to be counted from the pen's counters."""
        self.cable_breaks()
        if then == "controller":
            self.controller_dies(data, mid_step=True)
        self.press_while_nobody_listens(strokes)

    @rule(data=st.data())
    def controller_dies_between_steps(self, data: st.DataObject) -> None:
        self.controller_dies(data, mid_step=False)

    def controller_dies(self, data: st.DataObject, *, mid_step: bool) -> None:
        """SIGKILL: the next controller starts from the journal, which may lag behind the
        last decisions (never behind an Arm that reached the pen), and recovers."""
        points = list(self.journal)
        if mid_step or not points:
            if self.arm_on_the_wire:
                points = []  # that Arm went out only once its decision was durable
            points.append(
                (
                    self.bench.registry.to_dict(),
                    self._controller_facts(),
                    self._heard(),
                    self._boots(),
                )
            )
        state, facts, heard_then, boots_then = points[
            data.draw(st.integers(0, len(points) - 1), label="journal point")
        ]
        if state != points[-1][0]:
            event("a controller restarted from a lagging journal")
        for name, value in copy.deepcopy(facts).items():
            setattr(self, name, value)
        # Runs the journal never saw become runs nobody heard; after a reboot since then,
        # the registry can tell them only from the cartridge chip. So do runs it saw made
        # but not yet counted: a reconciliation after that journal point (the pen's
        # counters read at a handshake) died with the controller, and the next one counts
        # them when their pen is back on the port. Only the runs made since that point
        # were reset here once, and the oracle then expected passes the restarted registry
        # could not know of while their pen was away. A run already hidden by a reboot is
        # in the slack for good.
        for i, run in enumerate(self.runs):
            if not run.hidden and not (i < len(heard_then) and heard_then[i]):
                run.heard = False
        for serial, boot in boots_then.items():
            if self.pen_bank[serial].boot_id != boot:
                self._hide_runs(serial, boot)
        self.pen.renew_token = None  # nobody renews: the pen stops within its lease
        self.bench.connected[PORT] = False
        self.bench.renewing[PORT] = None
        self.bench.registry = RecordingRegistry.from_dict(
            POLICY, json.loads(json.dumps(state)), ports=PORTS
        )
        self.bench.feed(self.bench.registry.recover(self.bench.tick()))
        self.journal.clear()
        self.arm_on_the_wire = False
        self._link_is_down()
        event("the controller died")

    def _heard(self) -> tuple[bool, ...]:
        return tuple(run.heard for run in self.runs)

    def _boots(self) -> dict[str, int]:
        return {serial: pen.boot_id for serial, pen in self.pen_bank.items()}

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def journal_commits(self) -> None:
        """A step boundary: what a journal written up to here would hold."""
        if self.arm_on_the_wire:
            self.journal.clear()  # older journals are behind an Arm that went out
            self.arm_on_the_wire = False
        self.journal.append(
            (self.bench.registry.to_dict(), self._controller_facts(), self._heard(), self._boots())
        )
        del self.journal[:-JOURNAL_DEPTH]

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
        approval = self.approval_now()
        assert approval is not None, "the pen is armed under no approved Arm"
        cartridge = self.pen.cartridge_id
        if cartridge is not None and self.chips.get(cartridge, 0):
            # (3) its strokes are this client's only
            assert self.stroke_clients.get(cartridge, set()) <= {approval.sid}
        assert self.pen.depth_set_um == approval.depth_um
        assert self.pen.firmware.arm_max_depth_um == approval.limit_um
        if not self.in_control:
            return  # the pen is on its own: its lease (and its own limits) stop it
        assert self.sid is not None and self.zone is not None
        assert (self.sid, self.zone) == (approval.sid, approval.zone)
        assert self.treating(), "armed or running outside an active session"
        done = self.countable((self.sid, self.zone))
        max_passes = self.limits(self.zone)[1]
        if self.pen.running:
            assert done <= max_passes
        else:
            assert done < max_passes, "armed past the zone's pass limit"
        assert self.pen.cartridge_id not in self.spent
        assert self.pen.depth_set_um <= min(self.limits(self.zone)[0], CEILING_UM)

    @invariant()
    def every_run_is_a_counted_pass(self) -> None:
        """(2): the registry's passes per session and zone against the pen's real runs."""
        registry = self.bench.registry
        for sid in self.sessions:
            session = registry.session(sid)
            assert session is not None
            for zone_id, zone in session.zones.items():
                key = (sid, zone_id)
                running = (
                    session.current_pass is not None and session.current_pass.zone_id == zone_id
                )
                counted = zone.passes_done + int(running)
                ran = self.world_runs[key]
                most = ran + (1 if key in self.over else 0)
                assert counted <= most, f"{key}: {counted} passes counted, {ran} runs made"
                if self.in_control:
                    # Runs not yet reconciled (their pen away from the port, or not heard
                    # from since) cannot be counted yet; every other one must be.
                    pending = sum(1 for r in self.runs if r.key == key and not r.heard)
                    assert counted >= ran - self.slack[key] - pending, (
                        f"{key}: {ran} runs made, {counted} passes counted"
                    )
                if sid == self.sid:
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


#: `make mutation` runs this machine once per mutant: fewer examples, and derandomized so
#: that a mutant's verdict does not depend on the run (a killed mutant stays killed).
_MUTATION_EXAMPLES = os.environ.get("STATEFUL_EXAMPLES")
SessionMachine.TestCase.settings = settings(
    max_examples=int(_MUTATION_EXAMPLES or 200),
    derandomize=_MUTATION_EXAMPLES is not None,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # No explain phase: it traces every example after a failure (about 9x slower
    # here), so shrinking ran into pytest-timeout and the failure came out as
    # "flaky" instead of as its smallest example.
    phases=[p for p in Phase if p is not Phase.explain],
)
TestSessions = SessionMachine.TestCase
