"""The pen's own firmware and a bench that wires it to the SessionRegistry as the runtime will.

Used by the session tests (unit and stateful). The pen is the simulator's pure
firmware model, ``simulated_pen.firmware.PenFirmware``, driven with explicit time,
so the firmware rules exist in one place: the session tests meet the same pen as
the simulator and PROTOCOL.md section 10. Only the pen's physical world is scripted
(``ScriptedWorld``): the needle sits at its setpoint unless a test moves it for one
reading, strokes happen when a test says so, and nothing drifts by itself.

The bench delivers an Outcome the way outcome.py tells the runtime to: urgent
commands first, then the others in order, each into ``PenFirmware.handle``; it keeps
or drops lease renewals as told (while told to renew, the link renews every quarter
lease, as PenLink does) and feeds the pen's answers back to the registry until
nothing is left to do. The pen's periodic telemetry is not delivered (an unreliable
stream may lose any sample); a test takes a sample with ``BenchPen.sample``. While a
port is disconnected, nothing the pen says reaches the registry, and the pen never
queues it (PROTOCOL.md section 10).

The tests at the bottom check the harness itself, so that a broken harness cannot
make the session tests pass vacuously.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from controller.policy import TreatmentPolicy, load_policy
from controller.sessions import (
    Actor,
    LeaseAction,
    Outcome,
    PenCommand,
    Role,
    SessionRegistry,
)
from controller.sessions.outcome import EMPTY
from firmware_protocol.connection import Delivered, MessageReceived
from firmware_protocol.messages import (
    Arm,
    Armed,
    CommandRefused,
    Disarmed,
    Identity,
    Message,
    MotorStarted,
    MotorStopped,
    QueryStatus,
    RefusalCode,
    Renew,
    SetDepth,
    SetLiftOffGrace,
    SetTelemetryRate,
    Stop,
    StopReason,
    Telemetry,
    TelemetryFlag,
)
from simulated_pen.faults import Fault, FaultKind
from simulated_pen.firmware import FirmwareConfig, PenFirmware, declared_identity
from simulated_pen.physics import PenPhysics, PhysicsConfig

PORT = "/dev/ttyPEN0"
#: The pens the test registries are configured with (port -> expected serial; None: any).
PORTS: dict[str, str | None] = {PORT: None, "/dev/ttyPEN1": None}
THERAPIST = Actor("th-01", Role.THERAPIST)
MANAGER = Actor("mg-01", Role.MANAGER)
ADMIN = Actor("ad-01", Role.ADMIN)
START = 1_800_000_000.0
#: The registry's lease (controller default) and PenLink's renewal period for it.
LEASE_S = 0.250
RENEW_PERIOD_S = LEASE_S / 4
#: How long a host takes to notice a pulled cable (the controller's peer silence timeout).
NOTICE_S = 0.300
#: Telemetry flowing after a handshake before a test goes on: a full rate window and more.
WARM_UP_S = 0.400


def identity(serial: str = "PEN0001", boot_id: int = 1) -> Identity:
    """What the bench's pens declare (the simulator's defaults)."""
    return declared_identity(FirmwareConfig(), serial=serial, boot_id=boot_id, host_nonce=7)


@dataclass
class Clock:
    """The time shared by a bench, its registry and its pens (seconds)."""

    now: float = START

    def tick(self, seconds: float = 0.01) -> float:
        self.now += seconds
        return self.now


class ScriptedWorld(PenPhysics):
    """The pen's hardware, moved only by the test: no lag, no noise, no drift.

    The needle is at the actuator's target plus ``depth_offset_um`` (a test's excursion
    for one reading); the motor turns at its set rate while powered and not stalled;
    strokes are whatever the test adds. Heat and battery stay put unless a fault moves
    them.
    """

    __slots__ = ("depth_offset_um",)

    def __init__(self, now: float) -> None:
        super().__init__(random.Random(0), now, PhysicsConfig(depth_noise_um=0.0))
        self.depth_offset_um = 0.0

    def advance(self, now: float) -> None:
        self.t = max(self.t, now)
        self.depth_um = max(0.0, self.depth_target_um + self.depth_offset_um)
        self.speed_hz = self.motor_rate_hz if self.motor_on and not self.stalled else 0.0


class BenchPen:
    """One pen on the bench: the real firmware in a scripted world, on the bench's clock.

    Every action happens at the clock's next tick; time passes on the pen only through
    ``advance``, which renews the lease as the link is told to (``renew_token``).
    Physical actions return everything the pen says, in order (telemetry excepted:
    ``sample`` returns the one it is asked for, last).
    """

    def __init__(
        self,
        serial: str = "PEN0001",
        *,
        clock: Clock | None = None,
        boot_id: int = 1,
        config: FirmwareConfig | None = None,
        chips: dict[int, int] | None = None,
        firmware_type: type[PenFirmware] = PenFirmware,
    ) -> None:
        """``chips``: the cartridges' stroke memories (share one between pens so that a
        cartridge moved from pen to pen keeps its use); ``firmware_type``: the firmware
        class (a test may subclass it to watch what the pen does)."""
        self.serial = serial
        self.boot_id = boot_id
        self.clock = clock or Clock()
        self.now = self.clock.now
        self.world = ScriptedWorld(self.now)
        self.firmware = firmware_type(
            random.Random(serial), self.now, config, physics=self.world, cartridge_chips=chips
        )
        self.firmware.set_contact(True, self.now)  # a therapist's pen rests on the skin
        #: The token the link renews (None: no renewals reach the pen).
        self.renew_token: int | None = None
        #: Every command that reached this pen, in order.
        self.received: list[Message] = []
        #: Periodic telemetry produced as time passed, not yet taken by a bench.
        self.pending_telemetry: list[Telemetry] = []

    # -- what the pen is --------------------------------------------------------------

    def identity(self) -> Identity:
        return declared_identity(
            self.firmware.config, serial=self.serial, boot_id=self.boot_id, host_nonce=7
        )

    @property
    def armed(self) -> bool:
        return self.firmware.armed

    @property
    def running(self) -> bool:
        return self.firmware.running

    @property
    def depth_set_um(self) -> int | None:
        return self.firmware.depth_set_um

    @property
    def speed_hz(self) -> int:
        return self.firmware.speed_hz

    @property
    def cartridge_id(self) -> int | None:
        return self.firmware.cartridge_id

    @property
    def token(self) -> int | None:
        return self.firmware.token if self.firmware.armed else None

    # -- time -------------------------------------------------------------------------

    def advance(self, to: float) -> list[Message]:
        """Time passes on the pen up to ``to``; the link renews every quarter lease while
        it is told to. The events the pen produced; its periodic telemetry is kept in
        ``pending_telemetry`` for a bench to deliver."""
        fw = self.firmware
        out: list[Message] = []
        while self.now < to:
            if self.renew_token is not None:
                out += fw.handle(Renew(self.renew_token), self.now)
            until = min(to, self.now + RENEW_PERIOD_S)
            while self.now < until:  # every deadline of the pen: each sample is sent
                self.now = min(until, max(fw.next_deadline(), self.now + 1e-4))
                out += fw.step(self.now)
        self.pending_telemetry += [m for m in out if isinstance(m, Telemetry)]
        return [m for m in out if not isinstance(m, Telemetry)]

    def _at_next_tick(self, seconds: float = 0.01) -> tuple[float, list[Message]]:
        now = self.clock.tick(seconds)
        return now, self.advance(now)

    # -- the link ---------------------------------------------------------------------

    def apply(self, message: Message) -> list[Message]:
        """A host command arrives: the events the pen sends back."""
        now, out = self._at_next_tick()
        self.received.append(message)
        return out + self.firmware.handle(message, now)

    def new_host(self) -> list[Message]:
        """A new host said Hello: what the pen sends after its Identity."""
        now, out = self._at_next_tick()
        return out + self.firmware.new_host(now)

    def lose_host(self) -> list[Message]:
        """The host is gone (cable pulled, controller killed): renewals stop and time
        passes until a host would notice; the pen's lease runs out by itself."""
        self.renew_token = None
        return self._at_next_tick(NOTICE_S)[1]

    def lease_runs_out(self) -> list[Message]:
        """Renewals are lost (whatever the link was told): time passes past the lease."""
        token, self.renew_token = self.renew_token, None
        out = self._at_next_tick(LEASE_S + 0.01)[1]
        self.renew_token = token
        return out

    def reboot(self) -> None:
        """Power cycle: a new boot id; the pen forgets its settings, not its world."""
        now, _ = self._at_next_tick()
        self.renew_token = None
        self.firmware.reboot(now)
        self.boot_id += 1

    # -- the therapist's hand -----------------------------------------------------------

    def press(self) -> list[Message]:
        """Press the run button on the skin (released first if still held from a pass)."""
        now, out = self._at_next_tick()
        fw = self.firmware
        if fw.running:
            return out
        if fw.button:
            out += fw.release_button(now)
        out += fw.set_contact(True, now)
        return out + fw.press_button(now)

    def release(self, reason: StopReason = StopReason.BUTTON_RELEASED) -> list[Message]:
        """End the pass: let go of the button, lift the pen off the skin for longer than
        the grace, or let the lease run out."""
        now, out = self._at_next_tick()
        fw = self.firmware
        if reason is StopReason.BUTTON_RELEASED:
            return out + fw.release_button(now)
        if reason is StopReason.LIFT_OFF:
            out += fw.set_contact(False, now)
            out += self._at_next_tick(fw.lift_off_grace_ms / 1000.0 + 0.001)[1]
            now, more = self._at_next_tick()
            return out + more + fw.set_contact(True, now)
        if reason is StopReason.LEASE_EXPIRED:
            return out + self.lease_runs_out()
        raise ValueError(f"{reason.name} is not the end of a pass a hand can cause")

    def sample(self, depth_um: int, strokes: int = 0) -> list[Message]:
        """The needle reads ``depth_um`` now, after ``strokes`` more strokes if it runs:
        what the pen says (its own stop first, if the reading makes it stop), then the
        telemetry sample of that moment."""
        now, out = self._at_next_tick()
        world = self.world
        if self.firmware.running:
            world.strokes += strokes
        world.depth_offset_um = depth_um - world.depth_target_um
        try:
            return out + self.firmware.sample(now)
        finally:
            world.depth_offset_um = 0.0

    def excursion(self, depth_um: int) -> list[Message]:
        """The needle reaches ``depth_um`` between two samples (a reading, no telemetry)."""
        now, out = self._at_next_tick()
        self.world.depth_offset_um = depth_um - self.world.depth_target_um
        try:
            return out + [m for m in self.firmware.step(now) if not isinstance(m, Telemetry)]
        finally:
            self.world.depth_offset_um = 0.0

    def insert(self, cartridge_id: int) -> list[Message]:
        """Put a cartridge in (pulling the one in the slot first, if any)."""
        now, out = self._at_next_tick()
        fw = self.firmware
        if fw.cartridge_id is not None:
            out += fw.remove_cartridge(now)
        return out + fw.insert_cartridge(cartridge_id, now)

    def remove(self) -> list[Message]:
        now, out = self._at_next_tick()
        return out + self.firmware.remove_cartridge(now)

    def fault(self, reason: StopReason) -> list[Message]:
        """Make the physical cause of a fault stop happen, then take it away again (the
        pen cools, the battery is swapped, ...): what the pen said. A cause the pen does
        not react to in its state (a stall with the motor off) changes nothing."""
        fw = self.firmware
        ceiling = fw.config.max_depth_um + fw.config.depth_accuracy_um
        now, out = self._at_next_tick()
        if reason is StopReason.CARTRIDGE_REMOVED:
            return out + self.remove()
        if reason is StopReason.DEPTH_CEILING:
            return out + self.excursion(ceiling + 1)
        if reason is StopReason.DEPTH_LIMIT:
            limit = fw.arm_max_depth_um + fw.config.depth_accuracy_um + 1
            return out + self.excursion(limit) if fw.armed else out
        kinds = {
            StopReason.STALL: FaultKind.STALL,
            StopReason.OVER_CURRENT: FaultKind.OVER_CURRENT,
            StopReason.OVER_TEMPERATURE: FaultKind.OVER_TEMPERATURE,
            StopReason.LOW_BATTERY: FaultKind.LOW_BATTERY,
        }
        out += fw.inject(Fault(kinds[reason]), now)
        if reason is StopReason.STALL:  # the motor slows, and is told from a spin-up
            out += self._at_next_tick(0.001)[1]  # when it stays slow for 30 ms
            out += self._at_next_tick(fw.config.stall_time_s + 0.001)[1]
        now, more = self._at_next_tick()
        return out + more + fw.inject(Fault(FaultKind.CLEAR), now)


@dataclass
class Bench:
    """A registry, one BenchPen per port, and the runtime's delivery rules."""

    registry: SessionRegistry
    clock: Clock = field(default_factory=Clock)
    pens: dict[str, BenchPen] = field(default_factory=dict)
    connected: dict[str, bool] = field(default_factory=dict)
    renewing: dict[str, int | None] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    #: (port, command) in the order they reached the pens.
    wire: list[tuple[str, Message]] = field(default_factory=list)

    @classmethod
    def create(cls, policy: TreatmentPolicy | None = None) -> Bench:
        bench = cls(SessionRegistry(policy or load_policy(), ports=PORTS))
        bench.pens[PORT] = bench.new_pen()
        return bench

    def new_pen(self, serial: str = "PEN0001", **kwargs: object) -> BenchPen:
        """A pen on this bench's clock."""
        return BenchPen(serial, clock=self.clock, **kwargs)  # type: ignore[arg-type]

    @property
    def now(self) -> float:
        return self.clock.now

    def tick(self, seconds: float = 0.01) -> float:
        return self.clock.tick(seconds)

    def feed(
        self, outcome: Outcome, port: str = PORT, in_flight: Iterable[Message] = ()
    ) -> list[Outcome]:
        """Deliver an outcome and everything it causes; every outcome, in order.

        ``in_flight``: what the pen on ``port`` had already sent when the outcome's
        commands went out; it reaches the registry before their answers.
        """
        produced: list[Outcome] = []
        pending: deque[Outcome] = deque([outcome])
        early: list[tuple[str, Message]] = [(port, m) for m in in_flight]
        while pending:
            current = pending.popleft()
            produced.append(current)
            self.outcomes.append(current)
            events: deque[tuple[str, Message | Delivered]] = deque(early)
            early = []
            for command in (*current.urgent_commands, *current.other_commands):
                answers = self._deliver(command)
                if self.connected.get(command.port):
                    # The pen acknowledges a command before it applies it (PROTOCOL.md §8.2).
                    events.append((command.port, Delivered(0, command.message)))
                events.extend((command.port, e) for e in answers)
            for lease in current.leases:
                keep = lease.action is LeaseAction.KEEP_RENEWING
                self.renewing[lease.port] = lease.token if keep else None
                self._tell_link(lease.port)
            for event_port, event in events:
                pending.extend(self._telemetry_outcomes(event_port))
                heard = self._hear(event_port, event)
                if heard is not None:
                    pending.append(heard)
            for pen_port in self.pens:
                pending.extend(self._telemetry_outcomes(pen_port))
        return produced

    def _hear(self, port: str, event: Message | Delivered) -> Outcome | None:
        """A reliable message (or the ACK of a command) from the pen on ``port`` reaches
        the registry: its outcome, or None while the port is down (nobody hears it)."""
        if not self.connected.get(port):
            return None
        link_event = event if isinstance(event, Delivered) else MessageReceived(event)
        return self.registry.handle_link_event(port, link_event, self.tick())

    def _telemetry_outcomes(self, port: str) -> list[Outcome]:
        """The periodic telemetry the pen on ``port`` sent meanwhile, through the registry."""
        pen = self.pens.get(port)
        if pen is None or not pen.pending_telemetry:
            return []
        samples, pen.pending_telemetry = pen.pending_telemetry, []
        if not self.connected.get(port):
            return []  # nobody heard it
        return [
            outcome
            for sample in samples
            if (outcome := self.registry.handle_link_event(port, MessageReceived(sample), self.now))
            is not EMPTY
        ]

    def _tell_link(self, port: str) -> None:
        pen = self.pens.get(port)
        if pen is not None:
            pen.renew_token = self.renewing.get(port) if self.connected.get(port) else None

    def _deliver(self, command: PenCommand) -> list[Message]:
        if not self.connected.get(command.port):
            return []  # the runtime cannot send on a dead link; the pen's lease handles it
        self.wire.append((command.port, command.message))
        return self.pens[command.port].apply(command.message)

    def act(self, action: object) -> Outcome:
        """A therapist action; returns the action's own outcome (its effects are fed too)."""
        outcome = self.registry.handle(action, self.tick())  # type: ignore[arg-type]
        self.feed(outcome)
        return outcome

    def pen_says(self, events: list[Message], port: str = PORT) -> list[Outcome]:
        """What the pen said reaches the registry (nothing, while the port is down)."""
        produced = []
        for outcome in self._telemetry_outcomes(port):
            produced += self.feed(outcome, port)
        for event in events:
            heard = self._hear(port, event)
            if heard is not None:
                produced += self.feed(heard, port)
        return produced

    def connect(self, port: str = PORT) -> list[Outcome]:
        """A handshake: the pen takes the new host (disarming, NEW_HOST) and says so
        after its Identity, before it answers anything the controller sends."""
        self.connected[port] = True
        pen = self.pens[port]
        pen.pending_telemetry.clear()  # sent before the link: nobody heard it
        said = pen.new_host()
        outcome = self.registry.pen_connected(port, pen.identity(), self.tick())
        produced = self.feed(outcome, port, in_flight=said)
        # The link has been up a moment: telemetry flows (the monitor measures its rate).
        return produced + self.pen_says(pen.advance(self.tick(WARM_UP_S)), port)

    def disconnect(self, port: str = PORT) -> list[Outcome]:
        """The cable is pulled: the pen stops by its lease; the host notices the silence."""
        self.connected[port] = False
        self.renewing[port] = None
        self.pens[port].lose_host()  # nobody hears what it says
        return self.feed(self.registry.link_down(port, "cable pulled", self.tick()), port)

    def reboot(self, port: str = PORT) -> list[Outcome]:
        pen = self.pens[port]
        previous = pen.identity()
        pen.reboot()
        produced = self.feed(
            self.registry.pen_rebooted(port, previous, pen.identity(), self.tick()), port
        )
        self.connected[port] = False
        return produced + self.connect(port)

    def lease_lapses(self, port: str = PORT) -> list[Outcome]:
        """Time passes (renewals as told): a pen whose lease nobody renews disarms itself."""
        pen = self.pens[port]
        return self.pen_says(pen.advance(self.tick(LEASE_S + 0.05)), port)

    def renew(self, port: str = PORT) -> None:
        """The link's renewal timer fires (PenLink sends Renew itself, as told)."""
        token = self.renewing.get(port)
        if token is not None and self.connected.get(port):
            self.pen_says(self.pens[port].apply(Renew(token)), port)


# --- tests of the harness itself ------------------------------------------------------


def test_bench_pen_follows_the_firmware_rules() -> None:
    pen = BenchPen()
    assert pen.apply(Arm(250, 1, 500, 1000)) == [CommandRefused(Arm.TYPE, RefusalCode.NO_CARTRIDGE)]
    pen.insert(7)
    assert pen.apply(Arm(250, 1, 500, 1000)) == [CommandRefused(Arm.TYPE, RefusalCode.NO_DEPTH)]
    assert pen.apply(SetDepth(500)) == []
    (armed,) = pen.apply(Arm(250, 1, 500, 1000))
    assert isinstance(armed, Armed) and armed.token == 1
    assert pen.apply(SetDepth(600)) == [CommandRefused(SetDepth.TYPE, RefusalCode.ARMED)]
    (started,) = pen.press()
    assert isinstance(started, MotorStarted) and started.runs == 1
    *_, sample = pen.sample(480, strokes=10)
    assert isinstance(sample, Telemetry)
    assert (sample.depth_um, sample.strokes) == (480, 10)
    assert sample.flags & TelemetryFlag.MOTOR_RUNNING
    stopped = pen.apply(Stop(1))
    assert [type(e) for e in stopped] == [MotorStopped, Disarmed]
    assert not pen.armed and not pen.running
    assert pen.press() == []  # stays stopped until re-armed


def test_bench_pen_time_runs_the_lease_unless_the_link_renews() -> None:
    pen = BenchPen()
    pen.insert(7)
    pen.apply(SetDepth(500))
    pen.apply(Arm(250, 3, 500, 1000))
    pen.renew_token = 3
    assert pen.advance(pen.clock.tick(2.0)) == []  # two seconds, renewed: still armed
    assert pen.armed
    pen.renew_token = None
    assert pen.advance(pen.clock.tick(0.26)) == [Disarmed(StopReason.LEASE_EXPIRED)]


def test_bench_pen_depth_beyond_the_arming_makes_the_real_pen_stop_itself() -> None:
    pen = BenchPen()
    pen.insert(7)
    pen.apply(SetDepth(800))
    pen.apply(Arm(250, 1, 800, 1000))
    pen.press()
    *said, sample = pen.sample(1020)  # the limit plus the accuracy: not yet
    assert said == [] and isinstance(sample, Telemetry)
    *said, sample = pen.sample(1021)
    assert [(type(m), getattr(m, "reason", None)) for m in said] == [
        (MotorStopped, StopReason.DEPTH_LIMIT),
        (Disarmed, StopReason.DEPTH_LIMIT),
    ]
    assert isinstance(sample, Telemetry) and sample.depth_um == 1021
    assert sample.flags & TelemetryFlag.FAULT_LATCHED


@pytest.mark.parametrize(
    "reason",
    [
        StopReason.STALL,
        StopReason.OVER_CURRENT,
        StopReason.OVER_TEMPERATURE,
        StopReason.LOW_BATTERY,
        StopReason.CARTRIDGE_REMOVED,
        StopReason.DEPTH_CEILING,
        StopReason.DEPTH_LIMIT,
    ],
)
def test_bench_pen_faults_come_from_the_firmware(reason: StopReason) -> None:
    pen = BenchPen()
    pen.insert(7)
    pen.apply(SetDepth(800))
    pen.apply(Arm(2000, 1, 800, 1000))
    pen.press()
    said = pen.fault(reason)
    assert [m for m in said if isinstance(m, Disarmed)] == [Disarmed(reason)]
    assert pen.firmware.fault is reason
    if reason is not StopReason.CARTRIDGE_REMOVED:  # the cause is gone: the pen re-arms
        (armed,) = pen.apply(Arm(250, 2, 800, 1000))
        assert isinstance(armed, Armed)


def test_bench_delivers_urgent_commands_first_and_feeds_answers_back() -> None:
    bench = Bench.create()
    bench.connect()
    assert [type(m) for _, m in bench.wire] == [SetLiftOffGrace, SetTelemetryRate, QueryStatus]
    assert bench.registry.pen(PORT).link == "up"


def test_bench_drops_what_the_pen_says_while_the_port_is_down() -> None:
    bench = Bench.create()
    pen = bench.pens[PORT]
    assert bench.pen_says(pen.insert(42)) == []  # not connected: the registry hears nothing
    bench.connect()
    assert bench.registry.pen(PORT).cartridge_id == 42  # it learns from Status instead
