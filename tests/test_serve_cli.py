"""`penctl serve` as a process: bad configuration refused by name; pens served until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from controller.config import ServiceSettings, load_settings
from controller.edge.supervisor import EdgeSupervisor
from controller.journal import Journal
from controller.serve_cli import build_service, run_until_signalled
from devtools.stack.processes import free_port, wait_for_port
from firmware_protocol.messages import Telemetry

from .controller_rig import eventually

REPO = Path(__file__).resolve().parent.parent


def test_bad_configuration_is_refused_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[pens]]\nurl = "/dev/null"\n[link]\nlease_ms = 5000\nbaud = 9600\n')
    proc = subprocess.run(
        [sys.executable, "-m", "penctl", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "link.lease_ms: Input should be less than or equal to 2000" in proc.stderr
    assert "link.baud: unknown key" in proc.stderr
    assert not (tmp_path / "var").exists()  # nothing was started or written


async def test_serve_connects_simulated_pens_and_stops_cleanly(tmp_path: Path) -> None:
    sim = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penctl",
        "simulate",
        "--pens",
        "2",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert sim.stdout is not None
    try:
        paths = [(await sim.stdout.readline()).decode().split()[1] for _ in range(2)]
        state = tmp_path / "state"
        config = tmp_path / "controller.toml"
        config.write_text(
            f'state_dir = "{state}"\n[mqtt]\nenabled = false\n[api]\nport = 0\n'
            + "".join(f'[[pens]]\nurl = "{p}"\nname = "room{i}"\n' for i, p in enumerate(paths))
        )
        serve = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "penctl",
            "serve",
            "--config",
            str(config),
            stderr=asyncio.subprocess.STDOUT,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        assert serve.stdout is not None
        try:
            log = b""
            async with asyncio.timeout(20):
                # The pens, and the tablet API from the edge process the core started.
                while log.count(b"pen connected") < 2 or b"tablet API listening" not in log:
                    line = await serve.stdout.readline()
                    assert line, log.decode()
                    log += line
            serve.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(serve.wait(), 20) == 0
        finally:
            # A controller left running would keep reopening these pty paths, which
            # the next test's pens may get.
            if serve.returncode is None:
                serve.kill()
                await serve.wait()
        journal = Journal(state / "journal.db")
        pens = journal.load_all("pen")
        assert sorted(pens) == ["room0", "room1"]
        assert {p["serial"] for p in pens.values()} == {"SIM-0001", "SIM-0002"}
    finally:
        sim.send_signal(signal.SIGTERM)
        await sim.wait()


def _core_with_an_api(tmp_path: Path) -> ServiceSettings:
    """A core with no pens whose edge serves the tablet API (MQTT off) on a free port."""
    return load_settings(
        None,
        state_dir=tmp_path / "state",
        pens=[],
        mqtt={"enabled": False},
        api={"enabled": True, "port": free_port(), "demo_users": True},
    )


async def test_a_clean_stop_lets_the_edge_secure_the_last_samples(tmp_path: Path) -> None:
    """SIGTERM: the core lets go of its pens, and the edge secures what was told last
    before it is stopped. (The edge was stopped first: whatever the channel still held
    unacknowledged, here the last samples not yet flushed, was lost.)"""
    settings = _core_with_an_api(tmp_path)
    port = settings.api.port
    service = build_service(settings)
    channel = service.core_channel
    assert channel is not None
    channel.flush_interval = 3600.0  # only the stop flushes what is told below
    serving = asyncio.create_task(run_until_signalled(service))
    try:
        await wait_for_port("127.0.0.1", port, within=30)
        await eventually(lambda: channel.connected, within=10, what="edge connected")
        payload = Telemetry(1, 500, 498, 100, 300, 2500, 4000, 10, 0x03, 1).encode()
        channel.telemetry(("room1", "SIM-1", None, None), 1.0, payload)
        assert channel.has_unacknowledged or channel._pending.records  # told, not secured
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 30)
    finally:
        if not serving.done():
            serving.cancel()
    assert not channel.has_unacknowledged
    assert channel.counters.samples == 1


def test_without_api_or_mqtt_the_core_keeps_no_channel(tmp_path: Path) -> None:
    """Nobody would read it: every event told would be kept unacknowledged for good."""
    off = {"enabled": False}
    alone = build_service(load_settings(None, state_dir=tmp_path / "a", api=off, mqtt=off))
    assert alone.core_channel is None and alone.socket_path == ""
    served = build_service(load_settings(None, state_dir=tmp_path / "b", mqtt=off))
    assert served.core_channel is not None


async def test_a_stop_before_the_edge_is_up_waits_for_it_to_secure_what_was_told(
    tmp_path: Path,
) -> None:
    """The stop comes while no edge is connected (still starting, or being restarted
    after a crash): the core waits for the next one to catch up and secure what was
    told, within its limit. The edge runs in a session of its own, so a Ctrl-C at the
    core's terminal reaches only the core, which stops the edge after that."""
    settings = _core_with_an_api(tmp_path)
    service = build_service(settings)
    channel = service.core_channel
    assert channel is not None
    await service.start()
    edge = EdgeSupervisor(settings, service.socket_path)
    try:
        payload = Telemetry(1, 500, 498, 100, 300, 2500, 4000, 10, 0x03, 1).encode()
        channel.telemetry(("room1", "SIM-1", None, None), 1.0, payload)
        winding = asyncio.create_task(service.wind_down(within=30))
        await asyncio.sleep(0)  # the wind-down is waiting, with nobody connected
        assert not channel.connected and not winding.done()
        await edge.start()
        assert await winding
        assert not channel.has_unacknowledged
        assert edge.process is not None
        assert os.getpgid(edge.process.pid) != os.getpgrp()
    finally:
        await edge.stop()
        await service.stop()
