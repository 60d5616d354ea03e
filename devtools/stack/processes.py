"""Start real `mosquitto` and `influxd` processes on free loopback ports.

Tests, benchmarks and the local demo stack all use these, so the servers a test
talks to are configured exactly like the ones `make run` brings up. Each server
keeps its files under a working directory the caller owns; restarting a server
with the same directory and port keeps its persisted state, which is how the
outage tests kill and revive a broker or a database mid-session.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO_BINARIES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")
INFLUXD_BINARIES = ("/usr/bin/influxd",)


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(host: str, port: int, *, within: float) -> None:
    """Return once ``host:port`` accepts TCP connections; TimeoutError after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {within} s") from None
            await asyncio.sleep(0.05)  # polling a port: there is no event to await
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def _binary(candidates: tuple[str, ...], name: str) -> str:
    for path in (*candidates, shutil.which(name) or ""):
        if path and os.access(path, os.X_OK):
            return path
    raise ServerError(f"{name} is not installed: run `make deps` (Debian package {name})")


@dataclass
class ServerProcess:
    """A running server; stop() or kill() it, start_again() with the same state."""

    name: str
    argv: list[str]
    port: int
    workdir: Path
    ready_check: str  # "tcp" or an HTTP URL answering 2xx when ready
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start_again(self, timeout: float = 30.0) -> ServerProcess:
        if self.running:
            raise ServerError(f"{self.name} is already running")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate cleanly (SIGTERM), killing after timeout."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the crash a fault-injection test wants."""
        self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            if self.is_ready():
                return
            time.sleep(0.05)
        self.kill()
        raise ServerError(f"{self.name} not ready on port {self.port} after {timeout:.0f} s")

    def is_ready(self) -> bool:
        """Whether the server answers now (its port, or its HTTP ready URL with a 2xx)."""
        if self.ready_check == "tcp":
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return True
            return False
        try:
            with urllib.request.urlopen(self.ready_check, timeout=0.5) as resp:
                return 200 <= int(resp.status) < 300
        except OSError:
            return False


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener's files: the CA that clients must present certificates from (when
    ``require_certificate``), and the broker's own certificate and key."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


def start_mosquitto(
    workdir: Path,
    port: int | None = None,
    *,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    max_queued_messages: int = 1_000_000,
    tls: BrokerTls | None = None,
    timeout: float = 30.0,
) -> ServerProcess:
    """Mosquitto 2 (:func:`mosquitto_server`), started and ready."""
    server = mosquitto_server(
        workdir,
        port,
        password_file=password_file,
        acl_file=acl_file,
        max_queued_messages=max_queued_messages,
        tls=tls,
    )
    return server.start_again(timeout)


def mosquitto_server(
    workdir: Path,
    port: int | None = None,
    *,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    max_queued_messages: int = 1_000_000,
    tls: BrokerTls | None = None,
) -> ServerProcess:
    """Mosquitto 2 with persistence and raised queue limits; TLS only, with ``tls``.

    Writes its configuration under ``workdir`` and returns it not yet started
    (``start_again()`` starts it; devtools.stack.supervisor runs the same argv
    under asyncio so that it can await the process's exit).

    Debian ships 2.0.11, which queues only 1000 messages per client by default:
    a durable ingest session that falls behind would lose messages, so the limit
    is raised here (and in the compose file's mosquitto.conf).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    lines = [
        # Run as root, mosquitto would switch to user "mosquitto" and lose access to
        # its persistence directory; stay the user who started it.
        f"user {getpass.getuser()}",
        f"listener {port} 127.0.0.1",
        "persistence true",
        f"persistence_location {workdir}/",
        "autosave_interval 1",
        f"max_queued_messages {max_queued_messages}",
        "max_queued_bytes 0",
        "max_inflight_messages 0",
        "set_tcp_nodelay true",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if tls is not None:  # these apply to the listener above
        lines += [
            f"cafile {tls.cafile}",
            f"certfile {tls.certfile}",
            f"keyfile {tls.keyfile}",
            "tls_version tlsv1.2",
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
        ]
    if password_file is not None:
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        lines.append("allow_anonymous true")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return ServerProcess(
        "mosquitto",
        [_binary(MOSQUITTO_BINARIES, "mosquitto"), "-c", str(conf)],
        port,
        workdir,
        "tcp",
    )


def start_influxd(
    workdir: Path,
    port: int | None = None,
    *,
    auth_enabled: bool = False,
    https: tuple[Path, Path] | None = None,
    timeout: float = 60.0,
) -> ServerProcess:
    """InfluxDB 1.x (:func:`influxd_server`), started and ready."""
    return influxd_server(workdir, port, auth_enabled=auth_enabled, https=https).start_again(
        timeout
    )


def influxd_server(
    workdir: Path,
    port: int | None = None,
    *,
    auth_enabled: bool = False,
    https: tuple[Path, Path] | None = None,
) -> ServerProcess:
    """InfluxDB 1.x serving its v1 HTTP API (the API 2.x and 3.x also accept).

    ``https``: (certificate, key) to serve HTTPS only. Writes its configuration
    under ``workdir`` and returns it not yet started, as :func:`mosquitto_server`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    rpc_port = free_port()
    conf = workdir / "influxdb.conf"
    https_lines = (
        f'  https-enabled = true\n  https-certificate = "{https[0]}"\n'
        f'  https-private-key = "{https[1]}"\n'
        if https
        else ""
    )
    conf.write_text(
        f"""reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{workdir}/meta"
  logging-enabled = false
[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
  index-version = "inmem"
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  auth-enabled = {"true" if auth_enabled else "false"}
  log-enabled = false
  suppress-write-log = true
  pprof-enabled = false
{https_lines}[continuous_queries]
  enabled = false
"""
    )
    return ServerProcess(
        "influxd",
        [_binary(INFLUXD_BINARIES, "influxd"), "-config", str(conf)],
        port,
        workdir,
        # Over HTTPS the port answering is enough (the test's CA is not the system's).
        "tcp" if https else f"http://127.0.0.1:{port}/ping",
    )
