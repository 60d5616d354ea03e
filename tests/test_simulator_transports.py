"""Simulated pens over real transports: a pseudo-terminal opened by pyserial, TCP through
pyserial's ``socket://`` URL, the in-memory pipe, the multi-pen runner and the CLI.
Wall-clock tests await events with timeouts; none of them sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import serial

from firmware_protocol.connection import LinkState, PeerRebooted
from firmware_protocol.messages import (
    Arm,
    Armed,
    Disarmed,
    MotorStarted,
    MotorStopped,
    QueryStatus,
    SetDepth,
    Status,
    StopReason,
    Telemetry,
    TelemetryFlag,
)
from simulated_pen.device import SimulatedPen
from simulated_pen.runner import PenRunner
from simulated_pen.testing import AsyncHost
from simulated_pen.transports import MemoryTransport

REPO = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def serial_host(url: str) -> AsyncIterator[tuple[AsyncHost, serial.SerialBase]]:
    """Open ``url`` with pyserial (a device path or socket://) and drive a host over it."""
    port = serial.serial_for_url(url, timeout=0)
    loop = asyncio.get_running_loop()
    host = AsyncHost(port.write)

    def readable() -> None:
        try:
            data = port.read(65536)
        except serial.SerialException:
            loop.remove_reader(port.fileno())
            return
        if data:
            host.feed(data)

    loop.add_reader(port.fileno(), readable)
    try:
        yield host, port
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(port.fileno())
        host.close()
        # pyserial's socket:// close sleeps 0.3 s; keep that off the event loop.
        await asyncio.to_thread(port.close)


def press(pen: SimulatedPen, now: float) -> None:
    pen.set_contact(True, now)
    pen.press_button(now)


async def arm(host: AsyncHost, lease_ms: int, token: int = 1) -> float:
    """SetDepth + Arm; returns the time the Arm was written."""
    start = len(host.received)
    host.send(SetDepth(1200))
    sent_at = host.loop.time()
    host.send(Arm(lease_ms, token, 1200, 2500))
    await host.wait_for(Armed, within=2.0, start=start)
    return sent_at


async def test_pty_with_pyserial_handshake_arm_and_telemetry() -> None:
    async with PenRunner(seed=1) as runner:
        (slot,) = await runner.start(1, "pty")
        assert slot.address.startswith("/dev/pts/")
        async with serial_host(slot.address) as (host, port):
            assert isinstance(port, serial.Serial)  # a real serial port object on the path
            ident = await host.connect()
            assert ident.serial_text == "SIM-0001"
            assert ident.boot_id == slot.pen.boot_id
            await arm(host, lease_ms=2000)
            _, tel = await host.wait_for(
                Telemetry, lambda m: bool(m.flags & TelemetryFlag.ARMED), within=2.0
            )
            assert tel.depth_set_um == 1200
            runner.apply(slot.pen, press)
            await host.wait_for(MotorStarted, within=2.0)
            # Needle running at the set rate, at the set depth (once the actuator settled).
            await host.wait_for(
                Telemetry,
                lambda m: (
                    bool(m.flags & TelemetryFlag.MOTOR_RUNNING)
                    and m.speed_hz >= 95
                    and abs(m.depth_um - 1200) <= 10
                ),
                within=2.0,
            )
            assert host.conn.stats.crc_errors == 0


async def test_pty_silent_host_the_pen_stops_within_its_lease_on_the_wall_clock() -> None:
    lease_s, period_s = 0.250, 0.010  # default lease, 100 Hz telemetry
    async with PenRunner(seed=2) as runner:
        (slot,) = await runner.start(1, "pty")
        async with serial_host(slot.address) as (host, _):
            await host.connect()
            mark = len(host.received)
            arm_sent = await arm(host, lease_ms=250)
            runner.apply(slot.pen, press)  # the needle runs; the host now stays silent
            _, started = await host.wait_for(MotorStarted, within=1.0, start=mark)
            arrived, stopped = await host.wait_for(MotorStopped, within=2.0, start=mark)
            _, disarmed = await host.wait_for(Disarmed, within=1.0, start=mark)
            assert stopped.reason == StopReason.LEASE_EXPIRED
            assert disarmed.reason == StopReason.LEASE_EXPIRED
            # Measured at the host: from writing Arm to reading the stop.
            assert arrived - arm_sent <= lease_s + period_s
            # Measured on the pen's clock: the needle ran no longer than the lease.
            assert stopped.device_ms - started.device_ms <= 250
            # Every sample showing the needle running was taken within the lease.
            running = [
                (t, m)
                for t, m in host.received[mark:]
                if isinstance(m, Telemetry) and m.flags & TelemetryFlag.MOTOR_RUNNING
            ]
            assert running
            assert all(t - arm_sent <= lease_s + period_s for t, _ in running)
            _, after = await host.wait_for(Telemetry, within=1.0)
            assert not after.flags & (TelemetryFlag.MOTOR_RUNNING | TelemetryFlag.ARMED)
            assert not slot.pen.running


async def test_pty_host_can_close_and_reopen_the_path() -> None:
    async with PenRunner(seed=3) as runner:
        (slot,) = await runner.start(1, "pty")
        async with serial_host(slot.address) as (host, _):
            await host.connect(nonce=0x1111)
            await arm(host, lease_ms=2000)
        # The first host is gone, but the pen does not know: it keeps streaming into
        # the pty. The next host finds those stale bytes first and must resync past them.
        async with serial_host(slot.address) as (host, _):
            await host.wait_until(lambda: host.conn.stats.bytes_received > 1000, within=3.0)
            ident = await host.connect(nonce=0x2222)
            assert ident.boot_id == slot.pen.boot_id
            start = len(host.received)
            host.send(QueryStatus())
            _, status = await host.wait_for(Status, within=2.0, start=start)
            assert status.depth_set_um == 1200
            await host.wait_for(Telemetry, within=2.0)


async def test_tcp_transport_through_pyserial_socket_url() -> None:
    async with PenRunner(seed=4) as runner:
        slots = await runner.start(2, "tcp")
        urls = [s.address for s in slots]
        assert all(u.startswith("socket://127.0.0.1:") for u in urls)
        assert len(set(urls)) == 2  # one port per pen
        async with serial_host(urls[1]) as (host, _):
            ident = await host.connect()
            assert ident.serial_text == "SIM-0002"
            await arm(host, lease_ms=2000)
            runner.apply(slots[1].pen, press)
            await host.wait_for(MotorStarted, within=2.0)
            await host.wait_for(
                Telemetry, lambda m: bool(m.flags & TelemetryFlag.MOTOR_RUNNING), within=2.0
            )
            # A second host connecting takes over (a restarted controller wins).
            async with serial_host(urls[1]) as (host2, _):
                ident2 = await host2.connect(nonce=0x4242)
                assert ident2.boot_id == ident.boot_id
                await host2.wait_for(Telemetry, within=2.0)


async def test_memory_transport() -> None:
    async with PenRunner(seed=5) as runner:
        (slot,) = await runner.start(1, "memory")
        transport = slot.transport
        assert isinstance(transport, MemoryTransport)
        host = AsyncHost(transport.host.write)
        transport.host.on_data = host.feed
        try:
            ident = await host.connect()
            assert ident.serial_text == "SIM-0001"
            await arm(host, lease_ms=2000)
            await host.wait_for(Telemetry, within=2.0)
        finally:
            host.close()


async def test_runner_serves_many_pens_from_one_timer_without_loss() -> None:
    pens = 32
    async with PenRunner(seed=6) as runner:
        slots = await runner.start(pens, "memory")
        hosts = []
        for slot in slots:
            transport = slot.transport
            assert isinstance(transport, MemoryTransport)
            host = AsyncHost(transport.host.write)
            transport.host.on_data = host.feed
            hosts.append(host)
        try:
            await asyncio.gather(*(h.connect(nonce=i + 1) for i, h in enumerate(hosts)))
            marks = [len(h.received) for h in hosts]
            wakeups, ticks = runner.stats.wakeups, runner.stats.ticks
            started = runner.now()
            await asyncio.gather(
                *(
                    h.wait_for(Telemetry, within=5.0, start=m + 30)
                    for h, m in zip(hosts, marks, strict=True)
                )
            )
            for h in hosts:
                assert h.conn.stats.unreliable_lost == 0
                assert h.conn.state is LinkState.READY
            # Pens tick at phases of their own, yet the timer wakes at most once a
            # millisecond: a wake-up serves several pens, and far fewer wake-ups than
            # pen ticks happen.
            woke = runner.stats.wakeups - wakeups
            elapsed_ms = (runner.now() - started) * 1000
            assert woke <= elapsed_ms + 1
            assert (runner.stats.ticks - ticks) / woke > 2
        finally:
            for h in hosts:
                h.close()


async def test_cli_prints_pty_paths_applies_a_fault_script_and_exits_on_sigterm(
    tmp_path: Path,
) -> None:
    script = tmp_path / "faults.toml"
    script.write_text('[[fault]]\nat = 1.0\npen = "SIM-0001"\naction = "reboot"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penctl",
        "simulate",
        "--pens",
        "2",
        "--seed",
        "9",
        "--faults",
        str(script),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        lines = [
            (await asyncio.wait_for(proc.stdout.readline(), 10.0)).decode().split()
            for _ in range(2)
        ]
        assert [serial_ for serial_, _, _ in lines] == ["SIM-0001", "SIM-0002"]
        assert all(path.startswith("/dev/pts/") for _, path, _ in lines)
        assert all(control.startswith("control=tcp://") for _, _, control in lines)
        async with serial_host(lines[0][1]) as (host, _):
            first = await host.connect()
            _, event = await host.wait_event(lambda e: isinstance(e, PeerRebooted), within=5.0)
            assert isinstance(event, PeerRebooted)
            assert event.current.boot_id != first.boot_id
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    summary = (await proc.stderr.read()).decode()
    assert "SIM-0001: boots 2" in summary


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
async def test_cli_tcp_mode_prints_socket_urls(strict: bool) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penctl",
        "simulate",
        "--pens",
        "1",
        "--tcp",
        "0",
        *(["--strict"] if strict else []),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 10.0)).decode().split()
        assert line[0] == "SIM-0001"
        assert line[1].startswith("socket://127.0.0.1:")
        async with serial_host(line[1]) as (host, _):
            assert (await host.connect()).serial_text == "SIM-0001"
            host.send(QueryStatus())
            _, status = await host.wait_for(Status, within=2.0)
            # No setpoint yet: the field means nothing, and a strict pen makes that plain.
            assert status.depth_set_um == (0xFFFF if strict else 0)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("argv", [["--pens", "0"], ["--rate", "5000"], ["--prefix", "LONGPREFIX"]])
def test_cli_refuses_bad_arguments(argv: list[str]) -> None:
    from penctl.cli import main

    assert main(["simulate", *argv]) == 2
