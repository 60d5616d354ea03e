"""devtools.stack.supervision: the restart policy, on real (small) child processes."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.stack.processes import free_port
from devtools.stack.supervision import (
    Backoff,
    StartError,
    SupervisedProcess,
    describe,
    tcp_probe,
)

SLEEPER = ["sleep", "60"]


def test_backoff_doubles_to_its_bound_and_never_overflows() -> None:
    policy = Backoff(initial_s=0.25, factor=2.0, max_s=10.0)
    assert [policy.delay(n) for n in range(8)] == [0.25, 0.5, 1, 2, 4, 8, 10, 10]
    assert policy.delay(1_000_000) == 10.0  # never gives up, never raises OverflowError


def test_exit_status_in_words() -> None:
    assert describe(-9) == "killed by SIGKILL"
    assert describe(3) == "exit status 3"
    assert describe(0) == "exit status 0"


async def _stopped(child: SupervisedProcess) -> None:
    await child.stop()
    assert child.proc is not None and child.proc.returncode is not None


async def test_a_killed_child_is_restarted_with_growing_backoff(tmp_path: Path) -> None:
    started: list[int] = []
    child = SupervisedProcess(
        "sleeper",
        SLEEPER,
        tmp_path / "sleeper.log",
        backoff=Backoff(initial_s=0.05, factor=2.0, max_s=0.2, reset_after_s=60.0),
        on_start=lambda c: started.append(c.pid or 0),
    )
    await child.start()
    try:
        pids = []
        for n in range(1, 5):
            pid = child.pid
            assert pid is not None
            pids.append(pid)
            os.kill(pid, signal.SIGKILL)
            restart = await asyncio.wait_for(child.restarted(n), 10)
            assert (restart.pid, restart.status, restart.returncode) == (
                pid,
                "killed by SIGKILL",
                -signal.SIGKILL,
            )
            assert restart.new_pid == child.pid != pid
            assert restart.downtime_s >= restart.backoff_s
        # Four deaths in a row, none after a healthy run: 0.05, 0.1, 0.2, then bounded.
        assert [r.backoff_s for r in child.restarts] == [0.05, 0.1, 0.2, 0.2]
        assert started == [*pids, child.pid]  # on_start at every start: the pid file follows
    finally:
        await _stopped(child)


async def test_a_child_that_stayed_up_starts_again_from_the_first_backoff(tmp_path: Path) -> None:
    # reset_after_s 0: every run counts as healthy, so no backoff grows.
    child = SupervisedProcess(
        "sleeper",
        SLEEPER,
        tmp_path / "sleeper.log",
        backoff=Backoff(initial_s=0.05, factor=2.0, max_s=1.0, reset_after_s=0.0),
    )
    await child.start()
    try:
        for n in range(1, 4):
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            await asyncio.wait_for(child.restarted(n), 10)
        assert [r.backoff_s for r in child.restarts] == [0.05, 0.05, 0.05]
    finally:
        await _stopped(child)


async def test_a_clean_exit_is_restarted_too(tmp_path: Path) -> None:
    """A part that exits by itself (status 0 or not) is as dead as a killed one."""
    child = SupervisedProcess(
        "quitter",
        ["sh", "-c", "sleep 0.2; exit 3"],
        tmp_path / "quitter.log",
        backoff=Backoff(initial_s=0.01, max_s=0.02),
    )
    await child.start()
    try:
        second = await asyncio.wait_for(child.restarted(2), 10)
        first = child.restarts[0]
        assert (first.status, second.status) == ("exit status 3", "exit status 3")
        assert first.uptime_s >= 0.2 and second.uptime_s >= 0.2
    finally:
        await _stopped(child)


async def test_a_failed_restart_backs_off_further_and_is_retried(tmp_path: Path) -> None:
    """While the replacement cannot come up (here: a flag file), every start fails and
    waits longer; once the cause is gone the child is back. Never given up."""
    port = free_port()
    fail = tmp_path / "fail"
    # Listens on ``port`` unless the flag exists, in which case it exits at once.
    server = (
        "import socket, sys, time, pathlib\n"
        f"if pathlib.Path({str(fail)!r}).exists(): sys.exit(4)\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)\n"
    )
    child = SupervisedProcess(
        "server",
        [sys.executable, "-c", server],
        tmp_path / "server.log",
        ready=tcp_probe(port),
        ready_timeout_s=10,
        backoff=Backoff(initial_s=0.02, factor=2.0, max_s=0.16, reset_after_s=60.0),
    )
    await child.start()
    try:
        fail.touch()
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        while child.failed_starts < 3:  # noqa: ASYNC110 - counted by the supervisor's task
            await asyncio.sleep(0.01)
        fail.unlink()
        restart = await asyncio.wait_for(child.restarted(1), 10)
        assert restart.status == "killed by SIGKILL"  # what killed it, not what failed since
        assert restart.attempts == child.failed_starts + 1 >= 4
        assert restart.backoff_s == 0.02
        assert await tcp_probe(port)()
    finally:
        await _stopped(child)


async def test_a_first_start_that_fails_raises(tmp_path: Path) -> None:
    """A stack that cannot come up at all says so at once instead of retrying for ever."""
    child = SupervisedProcess(
        "broken",
        ["sh", "-c", "echo no config >&2; exit 2"],
        tmp_path / "broken.log",
        ready=tcp_probe(free_port()),
    )
    with pytest.raises(StartError, match="exit status 2 before it was ready"):
        await child.start()
    assert "no config" in (tmp_path / "broken.log").read_text()


async def test_stop_ends_supervision_then_the_process(tmp_path: Path) -> None:
    child = SupervisedProcess("sleeper", SLEEPER, tmp_path / "sleeper.log")
    await child.start()
    proc = child.proc
    assert proc is not None
    await child.stop()
    assert proc.returncode == -signal.SIGTERM
    assert child.restarts == []  # its SIGTERM was not taken for a death to repair
    await child.stop()  # again: nothing to do


async def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    child = SupervisedProcess(
        "stubborn",
        ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"],
        tmp_path / "stubborn.log",
        stop_timeout_s=0.3,
    )
    await child.start()
    while b"ready" not in (tmp_path / "stubborn.log").read_bytes():  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # the trap must be set before SIGTERM comes
    proc = child.proc
    assert proc is not None
    await child.stop()
    assert proc.returncode == -signal.SIGKILL


def test_deathsig_kills_the_command_with_its_parent(tmp_path: Path) -> None:
    """The ingest worker's wrapper: the exec'd command (same pid) dies when its parent does."""
    parent_code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-m', 'devtools.stack.deathsig',\n"
        "                          str(os.getpid()), '--', 'sleep', '60'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        pidfd = os.pidfd_open(pid)
        try:
            deadline = time.monotonic() + 10
            while b"sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                assert time.monotonic() < deadline, "the wrapper never exec'd its command"
                time.sleep(0.01)  # an exec has no event to wait on from outside
            parent.kill()
            parent.wait()
            # A pidfd becomes readable when its process exits: wait on that, not a clock.
            readable, _, _ = select.select([pidfd], [], [], 10)
            assert readable, "the command outlived its parent"
        finally:
            os.close(pidfd)
    finally:
        parent.kill()
        parent.wait()


def test_deathsig_refuses_to_start_an_orphan() -> None:
    """Its parent already gone (here: not the pid named), it must not start the command."""
    done = subprocess.run(
        [sys.executable, "-m", "devtools.stack.deathsig", "1", "--", "sleep", "60"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert "parent 1 is gone" in done.stderr
