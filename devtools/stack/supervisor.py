"""The local stack's child processes: mosquitto, influxd and one ingest worker.

:class:`LocalStack` starts them under one state directory and stops them in an
order that loses nothing (ingest first: it acknowledges what it wrote; then the
database; then the broker). The broker uses the compose stack's password file
and ACL (deploy/mosquitto), so running the stack proves those too.

The ingest worker is a ``penctl ingest`` subprocess, not a task in the caller's
loop: the controller's event loop checks every pen's telemetry for the safety
monitor, and JSON decoding and HTTP writes of ingest batches must not stall it
(on a clinic's two cores each process gets its own). It also runs the very
command an operator deploys.

Every child dies with its parent, whatever the reason: the ingest worker by
PR_SET_PDEATHSIG even when the parent is SIGKILLed; the servers' pids are kept
in ``children.pids`` so the next start on the same state directory reaps any a
SIGKILLed parent left behind (:func:`reap_leftovers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .processes import ServerProcess, free_port, start_influxd, start_mosquitto

log = structlog.get_logger("devtools.stack")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: MQTT users of deploy/mosquitto/passwd: role -> (user name, password).
MQTT_USERS = {
    "controller": ("controller", "controller-demo-password"),
    "ingest": ("ingest", "ingest-demo-password"),
}
PIDFILE = "children.pids"


def port_or_free(preferred: int) -> int:
    """``preferred`` if nothing listens there (0: any), else a free port."""
    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    return free_port()


def _die_with_parent() -> None:
    # Runs in the forked child before exec: SIGKILL it when the parent dies, even by
    # SIGKILL, so a killed stack never leaves a worker writing into InfluxDB.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def reap_leftovers(state_dir: Path) -> list[int]:
    """Kill children a SIGKILLed parent left behind (pids recorded in ``children.pids``).

    Only a process whose command line names this state directory is killed, so a
    recycled pid belonging to something else is left alone.
    """
    path = state_dir / PIDFILE
    killed: list[int] = []
    if not path.exists():
        return killed
    for word in path.read_text().split():
        with contextlib.suppress(ValueError, OSError):
            pid = int(word)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if str(state_dir).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    path.unlink(missing_ok=True)
    return killed


@dataclass
class LocalStack:
    """The broker, the database and an ingest worker under ``state_dir``; :meth:`stop` ends them."""

    state_dir: Path
    _servers: list[ServerProcess] = field(default_factory=list)
    _ingest: subprocess.Popen[bytes] | None = None

    def start_servers(self, mqtt_port: int, influx_port: int) -> tuple[int, str]:
        """Start mosquitto and influxd on these ports (taken or 0: any free one).

        Returns the broker's port and InfluxDB's URL.
        """
        passwd, acl = DEPLOY / "mosquitto" / "passwd", DEPLOY / "mosquitto" / "acl"
        authenticated = passwd.exists() and acl.exists()
        mosquitto = start_mosquitto(
            self.state_dir / "mosquitto",
            port_or_free(mqtt_port),
            password_file=passwd if authenticated else None,
            acl_file=acl if authenticated else None,
        )
        self._servers.append(mosquitto)
        self._record_pids()
        log.info("mosquitto running", port=mosquitto.port, authenticated=authenticated)
        influxd = start_influxd(self.state_dir / "influxd", port_or_free(influx_port))
        self._servers.append(influxd)
        self._record_pids()
        log.info("influxd running", port=influxd.port)
        return mosquitto.port, f"http://127.0.0.1:{influxd.port}"

    def start_ingest(self, mqtt_port: int, influx_url: str) -> None:
        """Start ``penctl ingest`` as MQTT user ``ingest``, logging to ``ingest.log``."""
        user, password = MQTT_USERS["ingest"]
        config = self.state_dir / "ingest.toml"
        config.write_text(
            f'state_dir = "{self.state_dir / "ingest"}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\n'
            f'username = "{user}"\npassword = "{password}"\n'
            f'[influx]\nurl = "{influx_url}"\ndatabase = "pen"\n'
            '[ingest]\nworker_id = "demo-ingest"\n'
        )
        # The parent's PENCTL_* variables would beat the file: the stack decides here.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PENCTL_")}
        with (self.state_dir / "ingest.log").open("ab") as out:
            self._ingest = subprocess.Popen(
                [sys.executable, "-m", "penctl", "ingest", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**env, "PYTHONUNBUFFERED": "1"},
                preexec_fn=_die_with_parent,  # single-threaded here: safe
                start_new_session=True,  # Ctrl-C in the terminal reaches only the parent
            )
        self._record_pids()
        log.info("ingest worker running", pid=self._ingest.pid, log=str(out.name))

    async def ingest_exited(self) -> int | None:
        """Return the ingest worker's exit status once it has exited (None: never started)."""
        # A child process has no event to await in asyncio without owning its pipes.
        while self._ingest is not None and self._ingest.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        return self._ingest.returncode if self._ingest else None

    def _record_pids(self) -> None:
        pids = [s.proc.pid for s in self._servers if s.proc is not None]
        if self._ingest is not None:
            pids.append(self._ingest.pid)
        (self.state_dir / PIDFILE).write_text(" ".join(map(str, pids)) + "\n")

    def stop(self) -> None:
        """Ingest first (it acknowledges what it wrote), then the database, then the broker."""
        if self._ingest is not None and self._ingest.poll() is None:
            self._ingest.terminate()
            try:
                self._ingest.wait(10)
            except subprocess.TimeoutExpired:
                self._ingest.kill()
                self._ingest.wait()
        for server in reversed(self._servers):
            with contextlib.suppress(Exception):
                server.stop()
            if server.running:  # stop() escalates to SIGKILL; make sure of it anyway
                server.kill()
        (self.state_dir / PIDFILE).unlink(missing_ok=True)
