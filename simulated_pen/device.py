"""One simulated pen: the wire protocol's device end glued to the firmware model.

``SimulatedPen`` is still pure (sans-I/O): bytes in with ``receive_data``, bytes
out with ``data_to_send``, time advanced with ``tick``; ``next_deadline`` says when
``tick`` is next needed. A transport or a test harness moves the bytes and owns
the clock. Link faults live here: silence, reboot, lost renewals, and byte faults
through a pair of ``LossyChannel`` objects (one per direction) from ``channel.py``.

The link's rules for the firmware live here too (PROTOCOL.md sections 7.3 and 10):
when the device end gives up the link the pen disarms (LINK_LOST) and tells nobody;
when it accepts a Hello from a new host it disarms (NEW_HOST) and says so on the new
link, after its Identity. A pen with no link never queues events for a later one.

Everything random is drawn from generators seeded by ``(seed, serial, purpose)``,
so two runs with the same seed and the same inputs produce the same bytes.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass

from firmware_protocol.connection import (
    Connected,
    DeviceConnection,
    LinkBusyError,
    LinkConfig,
    LinkFailed,
    LinkState,
    MessageReceived,
    ProtocolViolation,
)
from firmware_protocol.framing import FrameKind, encode_frame
from firmware_protocol.messages import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    CommandRefused,
    Delivery,
    Identity,
    Message,
    Renew,
)

from .channel import ChannelStats, LossyChannel
from .faults import Fault, FaultKind, LineNoise
from .firmware import FirmwareConfig, PenFirmware, declared_identity
from .hand import Hand, HandConfig

_SERIAL_BYTES = 12  # Identity.serial is NUL-padded to this
_UNRELIABLE = Delivery.UNRELIABLE


def make_channel(noise: LineNoise, rng: random.Random) -> LossyChannel:
    """One direction of a damaged wire with the probabilities and delays of ``noise``."""
    return LossyChannel(
        rng,
        drop=noise.drop,
        corrupt=noise.corrupt,
        duplicate=noise.duplicate,
        reorder=noise.reorder,
        delay=noise.delay,
        jitter=noise.jitter,
    )


@dataclass
class PenStats:
    """What happened to one pen, beyond the link's own LinkStats."""

    boots: int = 1
    messages_sent: int = 0  # handed to the link
    messages_unlinked: int = 0  # dropped: no host had completed a handshake
    messages_busy: int = 0  # dropped: the reliable backlog was full
    refusals: int = 0  # CommandRefused sent
    bytes_ignored: int = 0  # received while silent
    faults_injected: int = 0
    link_failures: int = 0  # the device end gave up on an unacknowledged message
    renews_dropped: int = 0  # Renew frames lost on purpose (FaultKind.DROP_RENEWS)


def _derive(seed: int | str, serial: str, purpose: str) -> str:
    return f"{seed}/{serial}/{purpose}"


class SimulatedPen:
    """A pen: firmware + device link + hand + optional line noise, driven by explicit time.

    ``serial`` must be unique among the pens a controller sees (at most 12 ASCII
    characters). The pen boots at ``now``, with a fresh cartridge unless
    ``cartridge`` is False, and announces its identity.
    """

    def __init__(
        self,
        serial: str,
        *,
        now: float,
        seed: int | str = 0,
        config: FirmwareConfig | None = None,
        link_config: LinkConfig | None = None,
        line_noise: LineNoise | None = None,
        auto_hand: bool = False,
        hand_config: HandConfig | None = None,
        cartridge: bool = True,
        script: Iterable[tuple[float, Fault]] = (),
        schema_hash: int = SCHEMA_HASH,
        protocol_version: int = PROTOCOL_VERSION,
    ) -> None:
        encoded = serial.encode("ascii")
        if not 0 < len(encoded) <= _SERIAL_BYTES:
            raise ValueError(f"serial must be 1..{_SERIAL_BYTES} ASCII characters: {serial!r}")
        self.serial = serial
        self.seed = seed
        self.stats = PenStats()
        self.link_config = link_config or LinkConfig()
        # Separate generators per purpose: adding a noise draw never shifts boot ids.
        self._boot_rng = random.Random(_derive(seed, serial, "boot"))
        self._line_rng = random.Random(_derive(seed, serial, "line"))
        self._cartridges = 0
        self.firmware = PenFirmware(random.Random(_derive(seed, serial, "physics")), now, config)
        self.hand = Hand(
            random.Random(_derive(seed, serial, "hand")), auto=auto_hand, config=hand_config
        )
        self._schema_hash = schema_hash
        self._protocol_version = protocol_version
        self.boot_id = 0
        self.boot_id = self._next_boot_id()
        self.connection = DeviceConnection(self._identity(), self.link_config)
        self._out = bytearray()
        self._now = now
        self._silent_until: float | None = None
        self._tx: LossyChannel | None = None  # pen -> host
        self._rx: LossyChannel | None = None  # host -> pen
        self._script: list[tuple[float, int, Fault]] = []
        self._script_seq = 0
        self._renews_to_drop = 0
        for at, fault in script:
            self.schedule(at, fault)
        if line_noise is not None:
            self.set_line_noise(line_noise, now)
        if cartridge:
            self.insert_cartridge(now)
        self.connection.announce(now)
        self._flush(now)

    # -- identity -----------------------------------------------------------------------

    def _next_boot_id(self) -> int:
        while True:
            boot_id = self._boot_rng.getrandbits(32)
            if boot_id and boot_id != self.boot_id:
                return boot_id

    def _identity(self) -> Identity:
        return declared_identity(
            self.firmware.config,
            serial=self.serial,
            boot_id=self.boot_id,
            protocol_version=self._protocol_version,
            schema_hash=self._schema_hash,
        )

    @property
    def identity(self) -> Identity:
        """What the pen announces (host_nonce 0)."""
        return self.connection.identity

    # -- the sans-I/O surface ---------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes arrived from the host at ``now``."""
        now = self._clock(now)
        if self._silent_until is not None and now < self._silent_until:
            self.stats.bytes_ignored += len(data)
            return
        if self._rx is not None:
            self._rx.push(data, now)
            data = self._rx.pull(now)
        if data:
            self._feed(data, now)

    def tick(self, now: float) -> None:
        """Advance to ``now``: scripted faults, the hand, the firmware and link timers."""
        now = self._clock(now)
        script = self._script
        while script and script[0][0] <= now:
            _, _, fault = heapq.heappop(script)
            self.inject(fault, now)
        if self._silent_until is not None and now >= self._silent_until:
            self._silent_until = None
        if self._rx is not None:
            data = self._rx.pull(now)  # always drained, or its due bytes would stay due
            if data:
                if self._silent_until is None:
                    self._feed(data, now)
                else:
                    self.stats.bytes_ignored += len(data)
        self.hand.act(now, self)
        self._send(self.firmware.step(now), now)
        if self._silent_until is None:
            conn = self.connection
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= now:
                for event in conn.handle_timeout(now):
                    if isinstance(event, LinkFailed):
                        self._link_failed(now)
        self._flush(now)

    def emit(self, message: Message, now: float) -> None:
        """Send a message as if the firmware had produced it.

        For benchmarks and fault tests that need one exact frame at one exact
        moment (a crafted breaching telemetry sample); the firmware's own state is
        untouched.
        """
        self._send([message], self._clock(now))
        self._flush(now)

    def emit_stale(self, message: Message, now: float, behind: int) -> None:
        """Send an unreliable message numbered ``behind`` frames behind the pen's counter.

        A misbehaving pen (its counter went back) or a frame overtaken on the line: the
        host receives it as stale. For the tests that prove every sample is judged.
        """
        if message.DELIVERY is not _UNRELIABLE:
            raise ValueError("only unreliable messages are numbered that way")
        conn = self.connection
        if conn.state is not LinkState.READY:
            return
        seq = (conn.unreliable_sent - behind) & 0xFFFF
        self._out += encode_frame(FrameKind.UNRELIABLE, seq, message.TYPE, message.encode())
        self._flush(self._clock(now))

    def data_to_send(self) -> bytes:
        """Bytes for the host, accumulated since the last call."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    def next_deadline(self) -> float:
        """The latest time at which ``tick`` must be called next."""
        d = self.firmware.next_deadline()
        h = self.hand.next_action_at
        if h is not None and h < d:
            d = h
        if self._silent_until is not None:
            if self._silent_until < d:
                d = self._silent_until
        else:
            c = self.connection.next_deadline()
            if c is not None and c < d:
                d = c
        if self._script and self._script[0][0] < d:
            d = self._script[0][0]
        for channel in (self._tx, self._rx):
            if channel is not None:
                n = channel.next_delivery()
                if n is not None and n < d:
                    d = n
        return d

    # -- physical inputs (the explicit hand) ---------------------------------------------

    @property
    def armed(self) -> bool:
        return self.firmware.armed

    @property
    def running(self) -> bool:
        return self.firmware.running

    @property
    def has_cartridge(self) -> bool:
        return self.firmware.cartridge_id is not None

    def press_button(self, now: float) -> None:
        now = self._clock(now)
        self._send(self.firmware.press_button(now), now)
        self._flush(now)

    def release_button(self, now: float) -> None:
        now = self._clock(now)
        self._send(self.firmware.release_button(now), now)
        self._flush(now)

    def set_contact(self, on: bool, now: float) -> None:
        now = self._clock(now)
        self._send(self.firmware.set_contact(on, now), now)
        self._flush(now)

    def insert_cartridge(self, now: float, cartridge_id: int | None = None) -> int:
        """Insert a cartridge (a fresh unique id unless one is given); returns its id."""
        now = self._clock(now)
        if cartridge_id is None:
            cartridge_id = self.new_cartridge_id()
        self._send(self.firmware.insert_cartridge(cartridge_id, now), now)
        self._flush(now)
        return cartridge_id

    def remove_cartridge(self, now: float) -> None:
        now = self._clock(now)
        self._send(self.firmware.remove_cartridge(now), now)
        self._flush(now)

    def new_cartridge_id(self) -> int:
        """A cartridge id unique to (seed, serial, count): distinct across pens and runs."""
        self._cartridges += 1
        text = _derive(self.seed, self.serial, f"cartridge/{self._cartridges}")
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1

    # -- faults -----------------------------------------------------------------------------

    def schedule(self, at: float, fault: Fault) -> None:
        """Inject ``fault`` when the pen is ticked at or after ``at`` (absolute time)."""
        # The counter keeps same-time faults in the order they were scheduled.
        self._script_seq += 1
        heapq.heappush(self._script, (at, self._script_seq, fault))

    def inject(self, fault: Fault, now: float) -> None:
        """Inject a fault now: link faults here, physical ones in the firmware."""
        now = self._clock(now)
        self.stats.faults_injected += 1
        kind = fault.kind
        if kind is FaultKind.SILENT:
            self._silent_until = now + fault.duration
        elif kind is FaultKind.DROP_RENEWS:
            self.drop_renews(round(fault.effective_amount))
        elif kind is FaultKind.REBOOT:
            self.reboot(now, graceful=False)
        elif kind is FaultKind.LINE_NOISE:
            self.set_line_noise(fault.noise, now)
            if fault.duration > 0:
                self.schedule(now + fault.duration, Fault(FaultKind.LINE_NOISE))
        else:
            self._send(self.firmware.inject(fault, now), now)
            self._flush(now)

    @property
    def silent(self) -> bool:
        return self._silent_until is not None

    def drop_renews(self, count: int) -> None:
        """Lose the next ``count`` Renew frames that reach the pen, as a bad line would:
        deterministic, for proving the lease margin (PROTOCOL.md section 10)."""
        if count < 0:
            raise ValueError("count must not be negative")
        self._renews_to_drop = count

    def reboot(self, now: float, *, graceful: bool = True) -> None:
        """Reboot: a new boot id, a new link (the host must handshake again), an announce.

        ``graceful`` flushes what the old link had queued (a commanded Reset); a crash
        (``graceful=False``) loses it.
        """
        now = self._clock(now)
        if graceful:
            self._flush(now)
        self.firmware.reboot(now)
        self.boot_id = self._next_boot_id()
        self.connection = DeviceConnection(self._identity(), self.link_config)
        self._silent_until = None  # a watchdog reboot is how a hung pen comes back
        self.stats.boots += 1
        self.connection.announce(now)
        self._flush(now)

    def set_line_noise(self, noise: LineNoise | None, now: float) -> None:
        """Put byte faults on both directions (None or a clean LineNoise removes them).

        Bytes still in flight on the old channels are delivered at once, not lost.
        """
        now = self._clock(now)
        old_tx, old_rx = self._tx, self._rx
        if noise is None or noise.is_clean:
            self._tx = self._rx = None
        else:
            self._tx = make_channel(noise, random.Random(self._line_rng.getrandbits(64)))
            self._rx = make_channel(noise, random.Random(self._line_rng.getrandbits(64)))
        if old_tx is not None:
            self._out += old_tx.pull(float("inf"))
        if old_rx is not None:
            data = old_rx.pull(float("inf"))
            if data and self._silent_until is None:
                self._feed(data, now)

    def channel_stats(self) -> tuple[ChannelStats | None, ChannelStats | None]:
        """Stats of the (pen->host, host->pen) channels; None while the line is clean."""
        return (
            self._tx.stats if self._tx is not None else None,
            self._rx.stats if self._rx is not None else None,
        )

    # -- internals --------------------------------------------------------------------------

    def _clock(self, now: float) -> float:
        # Time never runs backwards inside the pen, whatever the caller does.
        if now < self._now:
            return self._now
        self._now = now
        return now

    def _feed(self, data: bytes, now: float) -> None:
        firmware = self.firmware
        for event in self.connection.receive_data(data, now):
            if isinstance(event, MessageReceived):
                if self._renews_to_drop and isinstance(event.message, Renew):
                    self._renews_to_drop -= 1
                    self.stats.renews_dropped += 1
                    continue
                # Applied before anything later is sent: a sample that follows the ACK
                # of a Stop already shows the pen stopped.
                self._send(firmware.handle(event.message, now), now)
                if firmware.reset_requested:
                    # Anything after the Reset in this chunk was meant for the old link.
                    self.reboot(now, graceful=True)
                    return
            elif isinstance(event, Connected):
                if not event.resumed:
                    # A new host: whatever the old one armed is not this one's. The
                    # Identity is already out; the stop follows it on the new link.
                    self._send(firmware.new_host(now), now)
            elif isinstance(event, ProtocolViolation) and event.reliable:
                # It consumed a reliable number (ACKed): say why it was not applied. One
                # in an unreliable or handshake frame is counted, never answered.
                self._send([CommandRefused(event.msg_type, event.reason)], now)
            elif isinstance(event, LinkFailed):
                self._link_failed(now)
        self._flush(now)

    def _link_failed(self, now: float) -> None:
        """The device end gave up the link: disarm (LINK_LOST). Nobody hears it; the
        messages are counted as unlinked, never queued for the next host."""
        self.stats.link_failures += 1
        self._send(self.firmware.link_lost(now), now)

    def _send(self, messages: list[Message], now: float) -> None:
        if not messages:
            return
        stats = self.stats
        conn = self.connection
        if conn.state is not LinkState.READY:
            # A pen with no host has nobody to tell; the host asks with QueryStatus.
            stats.messages_unlinked += len(messages)
            return
        silent = self._silent_until is not None
        for message in messages:
            if isinstance(message, CommandRefused):
                stats.refusals += 1
            if silent and message.DELIVERY is _UNRELIABLE:
                continue  # its bytes would be discarded anyway
            try:
                conn.send(message, now)
            except LinkBusyError:
                stats.messages_busy += 1
            else:
                stats.messages_sent += 1

    def _flush(self, now: float) -> None:
        data = self.connection.data_to_send()
        if self._silent_until is not None:
            # A silent pen writes nothing; reliable messages stay in the link's window
            # and are retransmitted once it talks again. Bytes already on the wire
            # (in the channel) still arrive.
            data = b""
        if self._tx is not None:
            if data:
                self._tx.push(data, now)
            data = self._tx.pull(now)
        if data:
            self._out += data
