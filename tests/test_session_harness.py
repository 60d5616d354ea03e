"""A fake pen and a bench that wires it to the SessionRegistry as the runtime will.

Used by the session tests (unit and stateful). The fake pen follows the
firmware rules of product.md §3 that matter to the session: it runs only while
armed, arms only with a cartridge and a depth, a Stop or Disarm stops and
disarms it, and it reports what it does with the catalogue's events. The bench
delivers an Outcome the way outcome.py tells the runtime to: urgent commands
first, then the others in order; it keeps or drops lease renewals as told and
feeds the pen's answers back until nothing is left to do.

The tests at the bottom check the harness itself, so that a broken fake cannot
make the session tests pass vacuously.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from controller.policy import TreatmentPolicy, load_policy
from controller.sessions import (
    Actor,
    LeaseAction,
    Outcome,
    PenCommand,
    Role,
    SessionRegistry,
)
from firmware_protocol.messages import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    Arm,
    Armed,
    CartridgeInserted,
    CartridgeRemoved,
    CommandRefused,
    Disarm,
    Disarmed,
    Identity,
    Message,
    MotorStarted,
    MotorStopped,
    QueryStatus,
    RefusalCode,
    Renew,
    Reset,
    SetDepth,
    SetLiftOffGrace,
    SetSpeed,
    SetTelemetryRate,
    Status,
    Stop,
    StopReason,
    Telemetry,
    TelemetryFlag,
)

PORT = "/dev/ttyPEN0"
#: The pens the test registries are configured with (port -> expected serial; None: any).
PORTS: dict[str, str | None] = {PORT: None, "/dev/ttyPEN1": None}
THERAPIST = Actor("th-01", Role.THERAPIST)
MANAGER = Actor("mg-01", Role.MANAGER)
ADMIN = Actor("ad-01", Role.ADMIN)


def identity(serial: str = "PEN0001", boot_id: int = 1) -> Identity:
    return Identity(
        protocol_version=PROTOCOL_VERSION,
        serial=serial.encode().ljust(12, b"\0"),
        fw_major=1,
        fw_minor=0,
        fw_patch=0,
        boot_id=boot_id,
        schema_hash=SCHEMA_HASH,
        max_depth_um=2500,
        max_lease_ms=1000,
        host_nonce=7,
    )


@dataclass
class FakePen:
    """The pen's side: firmware rules, no physics."""

    serial: str = "PEN0001"
    boot_id: int = 1
    armed: bool = False
    token: int | None = None
    running: bool = False
    depth_set_um: int | None = None
    speed_hz: int = 100
    cartridge_id: int | None = None
    strokes: int = 0
    device_ms: int = 0
    peak_um: int = 0
    #: Every command that reached this pen, in order.
    received: list[Message] = field(default_factory=list)

    def identity(self) -> Identity:
        return identity(self.serial, self.boot_id)

    def apply(self, message: Message) -> list[Message]:
        """Apply one host command; the events the pen sends back."""
        self.received.append(message)
        match message:
            case SetDepth(depth_um=depth):
                if not 0 <= depth <= 2500:
                    return [CommandRefused(SetDepth.TYPE, RefusalCode.DEPTH_ABOVE_CEILING)]
                self.depth_set_um = depth
            case SetSpeed(rate_hz=rate):
                if not 50 <= rate <= 150:
                    return [CommandRefused(SetSpeed.TYPE, RefusalCode.SPEED_OUT_OF_RANGE)]
                self.speed_hz = rate
            case Arm(lease_ms=lease, token=token):
                if self.cartridge_id is None:
                    return [CommandRefused(Arm.TYPE, RefusalCode.NO_CARTRIDGE)]
                if self.depth_set_um is None:
                    return [CommandRefused(Arm.TYPE, RefusalCode.NO_DEPTH)]
                self.armed, self.token = True, token
                return [Armed(token, lease)]
            case Renew(token=token):
                if not self.armed or token != self.token:
                    return [CommandRefused(Renew.TYPE, RefusalCode.BAD_TOKEN)]
            case Disarm():
                return self.stop(StopReason.HOST_DISARM)
            case Stop():
                return self.stop(StopReason.HOST_STOP)
            case QueryStatus():
                return [self.status()]
            case SetLiftOffGrace() | SetTelemetryRate():
                pass
            case Reset():
                raise AssertionError("the bench never resets a pen through the registry")
            case _:
                raise AssertionError(f"not a host command: {message!r}")
        return []

    def status(self) -> Status:
        return Status(
            armed=int(self.armed),
            motor_running=int(self.running),
            depth_set_um=self.depth_set_um or 0,
            speed_hz=self.speed_hz,
            cartridge_id=self.cartridge_id or 0,
            fault=0,
            lease_left_ms=0,
        )

    def stop(self, reason: StopReason) -> list[Message]:
        """Stop the motor and disarm (firmware: after any stop, stays stopped)."""
        events: list[Message] = []
        if self.running:
            events.append(self._motor_stopped(reason))
        if self.armed:
            self.armed, self.token = False, None
            events.append(Disarmed(reason))
        return events

    def press(self) -> list[Message]:
        if not self.armed or self.running or self.cartridge_id is None:
            return []
        self.running = True
        self.peak_um = 0
        self.device_ms += 10
        return [MotorStarted(self.device_ms, self.depth_set_um or 0, self.strokes)]

    def release(self, reason: StopReason = StopReason.BUTTON_RELEASED) -> list[Message]:
        """The run ends but the pen stays armed (button release, lift-off)."""
        if not self.running:
            return []
        return [self._motor_stopped(reason)]

    def _motor_stopped(self, reason: StopReason) -> MotorStopped:
        self.running = False
        self.device_ms += 10
        return MotorStopped(self.device_ms, reason, self.strokes, self.peak_um)

    def sample(self, depth_um: int, strokes: int = 0) -> Telemetry:
        if self.running:
            self.strokes += strokes
            self.peak_um = max(self.peak_um, depth_um)
        self.device_ms += 10
        flags = TelemetryFlag.MOTOR_RUNNING if self.running else 0
        if self.armed:
            flags |= TelemetryFlag.ARMED
        return Telemetry(
            device_ms=self.device_ms,
            depth_set_um=self.depth_set_um or 0,
            depth_um=depth_um,
            speed_hz=self.speed_hz,
            current_ma=300,
            temperature_cdeg=3000,
            battery_mv=3900,
            strokes=self.strokes,
            flags=int(flags),
        )

    def insert(self, cartridge_id: int) -> list[Message]:
        events: list[Message] = []
        if self.cartridge_id is not None:
            events += self.remove()
        self.cartridge_id = cartridge_id
        return [*events, CartridgeInserted(cartridge_id)]

    def remove(self) -> list[Message]:
        if self.cartridge_id is None:
            return []
        events = self.stop(StopReason.CARTRIDGE_REMOVED) if self.armed or self.running else []
        removed, self.cartridge_id = self.cartridge_id, None
        return [*events, CartridgeRemoved(removed)]

    def lose_host(self) -> None:
        """The lease runs out with no host: stop and disarm (nobody hears the events)."""
        self.stop(StopReason.LEASE_EXPIRED)

    def reboot(self) -> None:
        self.running = self.armed = False
        self.token = None
        self.depth_set_um = None
        self.strokes = 0
        self.boot_id += 1


@dataclass
class Bench:
    """A registry, one fake pen per port, and the runtime's delivery rules."""

    registry: SessionRegistry
    pens: dict[str, FakePen] = field(default_factory=dict)
    connected: dict[str, bool] = field(default_factory=dict)
    renewing: dict[str, int | None] = field(default_factory=dict)
    now: float = 1_800_000_000.0
    outcomes: list[Outcome] = field(default_factory=list)
    #: (port, command) in the order they reached the pens.
    wire: list[tuple[str, Message]] = field(default_factory=list)

    @classmethod
    def create(cls, policy: TreatmentPolicy | None = None) -> Bench:
        bench = cls(SessionRegistry(policy or load_policy(), ports=PORTS))
        bench.pens[PORT] = FakePen()
        return bench

    def tick(self, seconds: float = 0.01) -> float:
        self.now += seconds
        return self.now

    def feed(self, outcome: Outcome, port: str = PORT) -> list[Outcome]:
        """Deliver an outcome and everything it causes; every outcome, in order."""
        produced: list[Outcome] = []
        pending: deque[Outcome] = deque([outcome])
        while pending:
            current = pending.popleft()
            produced.append(current)
            self.outcomes.append(current)
            events: deque[tuple[str, Message]] = deque()
            for command in (*current.urgent_commands, *current.other_commands):
                events.extend((command.port, e) for e in self._deliver(command))
            for lease in current.leases:
                if lease.action is LeaseAction.KEEP_RENEWING:
                    self.renewing[lease.port] = lease.token
                else:
                    self.renewing[lease.port] = None
            for event_port, event in events:
                pending.append(self.registry.pen_message(event_port, event, self.tick()))
        return produced

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
        produced = []
        for event in events:
            if self.connected.get(port):
                produced += self.feed(self.registry.pen_message(port, event, self.tick()), port)
        return produced

    def connect(self, port: str = PORT) -> list[Outcome]:
        self.connected[port] = True
        pen = self.pens[port]
        return self.feed(self.registry.pen_connected(port, pen.identity(), self.tick()), port)

    def disconnect(self, port: str = PORT) -> list[Outcome]:
        self.connected[port] = False
        self.pens[port].lose_host()
        self.renewing[port] = None
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
        """Time passes: a pen whose lease nobody renews disarms itself."""
        pen = self.pens[port]
        if pen.armed and self.renewing.get(port) != pen.token:
            return self.pen_says(pen.stop(StopReason.LEASE_EXPIRED), port)
        return []

    def renew(self, port: str = PORT) -> None:
        """The link's renewal timer fires (PenLink sends Renew itself, as told)."""
        token = self.renewing.get(port)
        if token is not None and self.connected.get(port):
            for event in self.pens[port].apply(Renew(token)):
                self.feed(self.registry.pen_message(port, event, self.tick()), port)


# --- tests of the harness itself ------------------------------------------------------


def test_fake_pen_follows_firmware_rules() -> None:
    pen = FakePen()
    assert pen.apply(Arm(250, 1)) == [CommandRefused(Arm.TYPE, RefusalCode.NO_CARTRIDGE)]
    pen.insert(7)
    assert pen.apply(Arm(250, 1)) == [CommandRefused(Arm.TYPE, RefusalCode.NO_DEPTH)]
    pen.apply(SetDepth(500))
    assert pen.apply(Arm(250, 1)) == [Armed(1, 250)]
    assert pen.press() == [MotorStarted(pen.device_ms, 500, 0)]
    pen.sample(480, strokes=10)
    stopped = pen.apply(Stop(1))
    assert [type(e) for e in stopped] == [MotorStopped, Disarmed]
    assert not pen.armed and not pen.running
    assert pen.press() == []  # stays stopped until re-armed


def test_bench_delivers_urgent_commands_first_and_feeds_answers_back() -> None:
    bench = Bench.create()
    bench.connect()
    assert [type(m) for _, m in bench.wire] == [SetLiftOffGrace, SetTelemetryRate, QueryStatus]
    assert bench.registry.pen(PORT).link == "up"
