"""The local stack's child processes: mosquitto, influxd and one ingest worker, supervised.

:class:`LocalStack` starts them under one state directory, keeps them running
and stops them in an order that loses nothing (ingest first: it acknowledges
what it wrote; then the database; then the broker). The broker uses the compose
stack's password file and ACL (deploy/mosquitto), so running the stack proves
those too.

**Supervision.** Each child runs as a :class:`~.supervision.SupervisedProcess`:
its exit is awaited (asyncio's child watcher, no polling), and a dead child is
started again after a bounded exponential backoff (:class:`~.supervision.Backoff`:
0.25 s doubling to 10 s, back to 0.25 s once it stayed up 30 s), for as long as
the stack runs, each restart logged with the exit status and the backoff. A
restart is the same process in the same place: mosquitto and influxd on the same
ports with the same data directories (persisted sessions, queues and points
survive), the ingest worker with the same configuration and so the same worker
id, which is what gets its durable MQTT session back, with the messages the
broker queued for it while it was dead (docs/MQTT.md). Nothing a telemetry part
does stops the caller: the controller's outbox holds what cannot be delivered
meanwhile, and sends it again until ingest acknowledges it.

The ingest worker is a ``penctl ingest`` subprocess, not a task in the caller's
loop: the controller's event loop checks every pen's telemetry for the safety
monitor, and JSON decoding and HTTP writes of ingest batches must not stall it
(on a clinic's two cores each process gets its own). It also runs the very
command an operator deploys.

Every child dies with its parent, whatever the reason: the ingest worker by
PR_SET_PDEATHSIG (set by :mod:`.deathsig` before it execs the worker) even when
the parent is SIGKILLed; the servers' pids are kept in ``children.pids``
(rewritten at every restart) so the next start on the same state directory
reaps any a SIGKILLed parent left behind (:func:`reap_leftovers`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .processes import ServerProcess, free_port, influxd_server, mosquitto_server
from .supervision import Backoff, Probe, SupervisedProcess, http_probe, tcp_probe

log = structlog.get_logger("devtools.stack")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: MQTT users of deploy/mosquitto/passwd: role -> (user name, password).
MQTT_USERS = {
    "controller": ("controller", "controller-demo-password"),
    "ingest": ("ingest", "ingest-demo-password"),
}
PIDFILE = "children.pids"
#: The demo's one ingest worker: a fixed id, so a restarted worker resumes its durable session.
INGEST_WORKER_ID = "demo-ingest"


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


#: The order in which the children start; they stop in the reverse order.
ORDER = ("mosquitto", "influxd", "ingest")


@dataclass
class LocalStack:
    """The broker, the database and an ingest worker under ``state_dir``, kept running.

    ``await start_servers(...)``, ``await start_ingest(...)``, then ``await stop()``.
    """

    state_dir: Path
    backoff: Backoff = field(default_factory=Backoff)
    #: The running children by name ("mosquitto", "influxd", "ingest").
    children: dict[str, SupervisedProcess] = field(default_factory=dict, init=False)
    #: The servers' configuration (ports, data directories), by name.
    servers: dict[str, ServerProcess] = field(default_factory=dict, init=False)

    async def start_servers(self, mqtt_port: int, influx_port: int) -> tuple[int, str]:
        """Start mosquitto and influxd on these ports (taken or 0: any free one).

        Returns the broker's port and InfluxDB's URL once both answer.
        """
        passwd, acl = DEPLOY / "mosquitto" / "passwd", DEPLOY / "mosquitto" / "acl"
        authenticated = passwd.exists() and acl.exists()
        mosquitto = mosquitto_server(
            self.state_dir / "mosquitto",
            port_or_free(mqtt_port),
            password_file=passwd if authenticated else None,
            acl_file=acl if authenticated else None,
        )
        await self._start_server(mosquitto, tcp_probe(mosquitto.port), ready_timeout_s=30.0)
        log.info("mosquitto running", port=mosquitto.port, authenticated=authenticated)
        influxd = influxd_server(self.state_dir / "influxd", port_or_free(influx_port))
        assert influxd.ready_check != "tcp"  # plain HTTP: /ping says when it serves
        await self._start_server(influxd, http_probe(influxd.ready_check), ready_timeout_s=60.0)
        log.info("influxd running", port=influxd.port)
        return mosquitto.port, f"http://127.0.0.1:{influxd.port}"

    async def _start_server(
        self, server: ServerProcess, probe: Probe, *, ready_timeout_s: float
    ) -> None:
        self.servers[server.name] = server
        await self._supervise(
            SupervisedProcess(
                server.name,
                server.argv,
                server.log_path,
                ready=probe,
                ready_timeout_s=ready_timeout_s,
                backoff=self.backoff,
                on_start=self._started,
            )
        )

    async def start_ingest(self, mqtt_port: int, influx_url: str) -> None:
        """Start ``penctl ingest`` as MQTT user ``ingest``, logging to ``ingest.log``.

        Its configuration file fixes the worker id, so every restart is the same worker.
        """
        user, password = MQTT_USERS["ingest"]
        config = self.state_dir / "ingest.toml"
        config.write_text(
            f'state_dir = "{self.state_dir / "ingest"}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\n'
            f'username = "{user}"\npassword = "{password}"\n'
            f'[influx]\nurl = "{influx_url}"\ndatabase = "pen"\n'
            f'[ingest]\nworker_id = "{INGEST_WORKER_ID}"\n'
        )
        # The parent's PENCTL_* variables would beat the file: the stack decides here.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PENCTL_")}
        worker = [sys.executable, "-m", "penctl", "ingest", "--config", str(config)]
        await self._supervise(
            SupervisedProcess(
                "ingest",
                # Dies with this process even if it is SIGKILLed (deathsig.py says why
                # not preexec_fn: restarts happen while the controller's threads run).
                [sys.executable, "-m", "devtools.stack.deathsig", str(os.getpid()), "--", *worker],
                self.state_dir / "ingest.log",
                env={**env, "PYTHONUNBUFFERED": "1"},
                backoff=self.backoff,
                on_start=self._started,
            )
        )
        log.info("ingest worker running", pid=self.children["ingest"].pid, log="ingest.log")

    async def _supervise(self, child: SupervisedProcess) -> None:
        self.children[child.name] = child
        await child.start()

    def _started(self, child: SupervisedProcess) -> None:
        # At every start, so that the file always names the live children.
        self._record_pids()

    def _record_pids(self) -> None:
        pids = [c.pid for c in self.children.values() if c.pid is not None]
        path = self.state_dir / PIDFILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(" ".join(map(str, pids)) + "\n")
        os.replace(tmp, path)  # never half a file for reap_leftovers to read

    async def stop(self) -> None:
        """Ingest first (it acknowledges what it wrote), then the database, then the broker.

        Every child's supervision ends before any child is stopped, so a part that
        dies while the others are stopping is not started again. Each is given
        ``stop_timeout_s`` (10 s) after SIGTERM before SIGKILL.
        """
        for child in self.children.values():
            await child.halt()
        for name in reversed(ORDER):
            if (stopping := self.children.get(name)) is not None:
                try:
                    await stopping.stop()
                except Exception:  # the others must stop all the same
                    log.exception("stopping a stack child failed", child=name)
        (self.state_dir / PIDFILE).unlink(missing_ok=True)
