"""``penctl demo``: the local stack comes up, data reaches InfluxDB, SIGTERM leaves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from controller.influx import InfluxClient, InfluxError, InfluxSettings
from devtools.stack.processes import free_port

# The installed console script, as `make run` starts it.
PENCTL = str(Path(sys.executable).with_name("penctl"))


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc children lists)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                for word in (task / "children").read_text().split():
                    found.add(int(word))
                    todo.append(int(word))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left


def is_edge(pid: int) -> bool:
    """The tablet's edge process: it dies with its core (PDEATHSIG), so no pid file names it."""
    try:
        return b"controller.edge" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def processes_naming(text: str) -> set[int]:
    """Live processes whose command line contains ``text`` (the test's state dir)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                    pids.add(int(entry.name))
    return pids


async def influx_counts(url: str) -> dict[str, int]:
    """What the demo must have put into InfluxDB; raises InfluxError until it can answer."""
    async with InfluxClient(InfluxSettings(url=url, timeout=2)) as client:
        return {
            "telemetry": await client.count("telemetry", "depth_um"),
            "events": await client.count("events", "seq"),
            "refused": await client.count("safety", "seq", "\"kind\" = 'refused'"),
            "fault": await client.count("safety", "seq", "\"kind\" = 'fault'"),
            "passes": await client.count("zones", "seq", "\"kind\" = 'pass_ended'"),
        }


def test_demo_fills_influxdb_and_sigterm_leaves_no_child(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    mqtt_port, influx_port, api_port = free_port(), free_port(), free_port()
    out = (tmp_path / "demo.out").open("wb")
    started = time.monotonic()
    demo = subprocess.Popen(
        [
            *(PENCTL, "demo", "--state-dir", str(state)),
            *("--pens", "2", "--duration", "300", "--log-format", "json"),
            *("--mqtt-port", str(mqtt_port), "--influx-port", str(influx_port)),
            *("--api-port", str(api_port)),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PENCTL_")},
    )
    children: set[int] = set()
    try:
        deadline = started + 60
        seen: dict[str, int] = {}
        while time.monotonic() < deadline:
            assert demo.poll() is None, (tmp_path / "demo.out").read_text()[-3000:]
            with contextlib.suppress(InfluxError):
                seen = asyncio.run(influx_counts(f"http://127.0.0.1:{influx_port}"))
                if all(seen.values()):
                    break
            children |= descendants(demo.pid)
            time.sleep(0.25)
        first_data = time.monotonic() - started
        assert all(seen.values()), f"after 60 s InfluxDB holds only {seen}"
        print(f"telemetry, events, a refusal and a fault in InfluxDB after {first_data:.1f} s")
        children |= descendants(demo.pid)
        # mosquitto, influxd and the ingest worker: the check below is not vacuous.
        assert len(children) >= 3, children
        assert processes_naming(str(state)), "children are found by their state directory"
        # The demo measures the same thing itself (polling every 0.2 s) and says so.
        deadline = time.monotonic() + 10
        while b"first data in InfluxDB" not in (tmp_path / "demo.out").read_bytes():
            assert time.monotonic() < deadline, "the demo never reported its first data"
            time.sleep(0.05)

        # The tablet is up, with the demo users it prints.
        tablet = f"http://127.0.0.1:{api_port}"
        assert f"{tablet}/".encode() in (tmp_path / "demo.out").read_bytes()
        assert "<html" in httpx.get(f"{tablet}/", timeout=10).text.lower()
        login = httpx.post(
            f"{tablet}/api/login",
            json={"username": "therapist", "password": "demo-therapist"},
            timeout=10,
        )
        assert login.status_code == 200, login.text

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0, (tmp_path / "demo.out").read_text()[-3000:]
        left = {pid for pid in children if alive(pid)} | processes_naming(str(state))
        assert not left, f"processes left after SIGTERM: {left}"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in children | processes_naming(str(state)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        out.close()


def test_a_killed_demo_leaves_nothing_once_started_again(tmp_path: Path) -> None:
    """SIGKILL gives the demo no chance to clean up: the ingest worker dies with it
    (PDEATHSIG) and the next start on the same state directory kills the servers."""
    state = tmp_path / "demo"
    argv = [
        *(PENCTL, "demo", "--state-dir", str(state)),
        *("--pens", "1", "--mqtt-port", "0", "--influx-port", "0", "--log-format", "json"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PENCTL_")}
    log = (tmp_path / "demo.out").open("wb")
    demo = subprocess.Popen([*argv, "--duration", "300"], stdout=log, stderr=log, env=env)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        pids: set[int] = set()
        while (len(children) < 3 or pids != children) and time.monotonic() < deadline:
            assert demo.poll() is None, (tmp_path / "demo.out").read_text()[-3000:]
            children = {pid for pid in descendants(demo.pid) if alive(pid) and not is_edge(pid)}
            with contextlib.suppress(OSError, ValueError):
                pids = {int(p) for p in (state / "children.pids").read_text().split()}
            time.sleep(0.1)
        assert len(children) >= 3, children
        assert pids == children, "the pid file names every child"
        demo.kill()
        demo.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len({p for p in children if alive(p)}) > 2:
            time.sleep(0.05)
        assert len({p for p in children if alive(p)}) == 2, "the ingest worker outlived the demo"

        again = subprocess.run(
            [*argv, "--duration", "1"], stdout=log, stderr=log, env=env, timeout=120, check=False
        )
        assert again.returncode == 0, (tmp_path / "demo.out").read_text()[-3000:]
        assert not {p for p in children if alive(p)}, "left over after the second start"
        assert not processes_naming(str(state))
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in children | processes_naming(str(state)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        log.close()


def _stack_children(state: Path) -> dict[str, int]:
    """The demo's live children by part, from its pid file and their command lines."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for word in (state / "children.pids").read_text().split():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{word}/cmdline").read_bytes()
                for part in ("mosquitto", "influxd", "ingest"):
                    if f"/{part}".encode() in cmdline and alive(int(word)):
                        found[part] = int(word)
    return found


def test_a_killed_part_is_restarted_and_the_clinic_goes_on(tmp_path: Path) -> None:
    """SIGKILL the demo's ingest worker, then its broker, then its database: the demo
    keeps running (it used to stop within 0.4 s of losing ingest), restarts each,
    logs why and after which backoff, and its clinic's passes keep reaching InfluxDB.
    SIGTERM then stops everything, the replacements included."""
    state = tmp_path / "demo"
    influx_port = free_port()
    influx = f"http://127.0.0.1:{influx_port}"
    out_path = tmp_path / "demo.out"
    out = out_path.open("wb")
    demo = subprocess.Popen(
        [
            *(PENCTL, "demo", "--state-dir", str(state)),
            *("--pens", "2", "--duration", "300", "--log-format", "json"),
            *("--mqtt-port", "0", "--influx-port", str(influx_port), "--api-port", "0"),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PENCTL_")},
    )
    every: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        passes = 0
        while passes == 0 or len(_stack_children(state)) < 3:
            assert demo.poll() is None, out_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo's clinic never treated a pass"
            with contextlib.suppress(InfluxError):
                passes = asyncio.run(influx_counts(influx))["passes"]
            time.sleep(0.25)
        for part in ("ingest", "mosquitto", "influxd"):
            before = _stack_children(state)
            every |= set(before.values())
            os.kill(before[part], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _stack_children(state).get(part) in (None, before[part]):
                assert demo.poll() is None, f"the demo stopped when {part} died"
                assert time.monotonic() < deadline, f"{part} was not restarted"
                time.sleep(0.05)  # another process's pid file: nothing to await
            every |= set(_stack_children(state).values())
        # The clinic goes on: more passes reach InfluxDB after all three came back.
        deadline = time.monotonic() + 60
        after = passes
        while after <= passes:
            assert demo.poll() is None, out_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no pass in InfluxDB after the restarts {after}"
            with contextlib.suppress(InfluxError):
                after = asyncio.run(influx_counts(influx))["passes"]
            time.sleep(0.25)
        restarts = [
            line
            # The JSON log lines; the banner is plain text.
            for line in (
                json.loads(raw) for raw in out_path.read_bytes().splitlines() if raw[:1] == b"{"
            )
            if line.get("event") == "stack child exited; restarting after a backoff"
        ]
        assert [(r["child"], r["status"]) for r in restarts] == [
            (part, "killed by SIGKILL") for part in ("ingest", "mosquitto", "influxd")
        ]
        assert all(r["backoff_s"] == 0.25 for r in restarts)  # each part's first death

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0, out_path.read_text()[-3000:]
        left = {pid for pid in every if alive(pid)} | processes_naming(str(state))
        assert not left, f"processes left after SIGTERM: {left}"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in every | processes_naming(str(state)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        out.close()
