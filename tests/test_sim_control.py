"""The simulated pen's control port, over real sockets (TCP on loopback and a Unix socket)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_protocol.messages import (
    Arm,
    Armed,
    MotorStarted,
    MotorStopped,
    QueryStatus,
    SetDepth,
    Status,
)
from simulated_pen.control import ControlServer
from simulated_pen.runner import PenRunner, PenSlot
from simulated_pen.testing import AsyncHost
from simulated_pen.transports import MemoryTransport

REPO = Path(__file__).resolve().parent.parent


class Client:
    """A control client: one command line out, one answer line back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def __call__(self, line: str) -> str:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        answer = await asyncio.wait_for(self.reader.readline(), 10.0)
        return answer.decode().rstrip("\n")

    def close(self) -> None:
        self.writer.close()


async def connect(address: str) -> Client:
    if address.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(address.removeprefix("unix:"))
    else:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
    return Client(reader, writer)


def host_of(slot: PenSlot) -> AsyncHost:
    """A protocol host on the pen's in-memory transport."""
    assert isinstance(slot.transport, MemoryTransport)
    end = slot.transport.host
    host = AsyncHost(end.write)
    end.on_data = host.feed
    return host


def fields(answer: str) -> dict[str, str]:
    assert answer.startswith("ok "), answer
    return dict(word.split("=", 1) for word in answer.split()[1:])


@pytest.fixture
async def pen() -> AsyncIterator[tuple[PenRunner, PenSlot]]:
    async with PenRunner(seed=3) as runner:
        slot = await runner.add_pen("memory")
        yield runner, slot


async def test_tcp_control_drives_the_pen_and_the_host_sees_it(
    pen: tuple[PenRunner, PenSlot],
) -> None:
    runner, slot = pen
    control = await ControlServer.start(runner, slot)
    assert control.address.startswith("tcp://127.0.0.1:")
    host = host_of(slot)
    client = await connect(control.address)
    try:
        await host.connect()
        first = fields(await client("status"))
        assert first["serial"] == slot.serial
        assert first["armed"] == "0" and first["hand"] == "manual"
        old = int(first["cartridge"])

        assert await client("contact on") == "ok"
        assert await client("press") == "ok"
        assert slot.pen.firmware.button and slot.pen.firmware.contact
        assert await client("release") == "ok"
        assert await client("contact off") == "ok"
        assert fields(await client("status"))["button"] == "0"

        # A fresh cartridge: a new id, and the host hears it in the pen's status.
        new = int(fields(await client("cartridge insert"))["cartridge"])
        assert new != old
        host.send(QueryStatus())
        _, status = await host.wait_for(Status, within=2.0)
        assert status.cartridge_id == new
        assert await client("cartridge pull") == "ok"
        assert fields(await client("status"))["cartridge"] == "none"
        chosen = fields(await client("cartridge insert 4242"))["cartridge"]
        assert chosen == "4242"

        # Any scripted fault, with the fault script's keys.
        assert await client("fault silent duration=0.5") == "ok fault=silent"
        assert slot.pen.silent
        assert await client("fault depth_overshoot amount_um=150") == "ok fault=depth_overshoot"
        assert await client("fault clear") == "ok fault=clear"
        assert await client("hand auto") == "ok"
        assert fields(await client("status"))["hand"] == "auto"
        assert await client("hand manual") == "ok"
        assert not slot.pen.hand.auto
    finally:
        client.close()
        control.close()
        host.close()


async def test_a_pass_by_hand_runs_the_motor_of_an_armed_pen(
    pen: tuple[PenRunner, PenSlot],
) -> None:
    runner, slot = pen
    control = await ControlServer.start(runner, slot)
    host = host_of(slot)
    client = await connect(control.address)
    try:
        await host.connect()
        host.send(SetDepth(400))
        host.send(Arm(2000, 1, 400, 500))
        await host.wait_for(Armed, within=2.0)
        answer = asyncio.ensure_future(client("pass 0.3"))
        _, started = await host.wait_for(MotorStarted, within=2.0)
        assert started is not None
        _, stopped = await host.wait_for(MotorStopped, within=3.0)
        assert stopped is not None
        assert await answer == "ok"
        assert not slot.pen.running
    finally:
        client.close()
        control.close()
        host.close()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("jump", "unknown command 'jump'"),
        ("contact maybe", "usage: contact on|off"),
        ("press hard", "press takes no arguments"),
        ("cartridge insert x", "ID must be a whole number"),
        ("fault meteor", "unknown action 'meteor'"),
        ("fault silent", "silent needs a duration > 0"),
        ("fault silent duration=soon", "duration must be a number"),
        ("fault reboot amount_um=3", "do not apply to action 'reboot'"),
        ("pass 99", "SECONDS must be more than 0"),
    ],
)
async def test_bad_commands_answer_an_error_and_leave_the_pen_alone(
    pen: tuple[PenRunner, PenSlot], line: str, error: str
) -> None:
    runner, slot = pen
    control = await ControlServer.start(runner, slot)
    client = await connect(control.address)
    try:
        before = await client("status")
        answer = await client(line)
        assert answer.startswith("error ") and error in answer, answer
        assert await client("status") == before
        assert slot.pen.stats.faults_injected == 0
    finally:
        client.close()
        control.close()


async def test_unix_socket_control_and_quit(pen: tuple[PenRunner, PenSlot], tmp_path: Path) -> None:
    runner, slot = pen
    control = await ControlServer.start(runner, slot, path=tmp_path / "pen.sock")
    assert control.address == f"unix:{tmp_path / 'pen.sock'}"
    client = await connect(control.address)
    try:
        assert (await client("help")).startswith("ok commands: help")
        assert await client("QUIT") == "ok bye"
        assert await asyncio.wait_for(client.reader.read(), 5.0) == b""  # closed by the pen
    finally:
        client.close()
        control.close()


async def test_penctl_simulate_prints_each_pens_control_address() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penctl",
        "simulate",
        "--pens",
        "2",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        lines = [
            (await asyncio.wait_for(proc.stdout.readline(), 10.0)).decode().split()
            for _ in range(2)
        ]
        assert [line[0] for line in lines] == ["SIM-0001", "SIM-0002"]
        for serial, _, control in lines:
            assert control.startswith("control=tcp://127.0.0.1:")
            client = await connect(control.removeprefix("control="))
            assert fields(await client("status"))["serial"] == serial
            assert int(fields(await client("cartridge insert"))["cartridge"]) > 0
            client.close()
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
