"""``penctl serve``: run the controller for the configured pens until SIGINT/SIGTERM.

The tablet API (controller.api) is served on ``api.host``:``api.port`` in the same
event loop unless ``api.enabled = false``. Configuration comes from ``--config
FILE.toml`` and ``PENCTL_*`` environment variables (see controller.config). A bad
configuration stops the start with a message naming every bad key, and exit
status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

import structlog

from .api import UserStore, create_app
from .api.auth import UsersFileError
from .api.server import ApiServer
from .audit_anchor import AuditAnchor
from .config import ConfigError, ServiceSettings, load_settings
from .influx import InfluxSettings
from .logs import configure_logging
from .policy import PolicyError
from .service import ControllerService

log = structlog.get_logger(__name__)


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="run the controller for the configured pens", description=__doc__
    )
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="service configuration")
    p.add_argument(
        "--log-format", choices=("json", "console"), default="console", help="log lines on stderr"
    )
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    configure_logging(args.log_format)
    try:
        settings = load_settings(args.config)
        users = load_users(settings)
        service = ControllerService(settings)
    except (ConfigError, PolicyError, UsersFileError) as exc:
        print(f"penctl serve: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_until_signalled(service, users))
    except OSError as exc:  # the API port is taken
        print(f"penctl serve: cannot serve the API: {exc}", file=sys.stderr)
        return 2
    return 0


def load_users(settings: ServiceSettings) -> UserStore:
    """The API's users: the users file, plus the demo users in demo mode."""
    api = settings.api
    users = UserStore.load(api.users_file) if api.users_file else UserStore()
    if api.demo_users:
        users.add_demo_users()
    return users


def start_audit_anchor(service: ControllerService) -> list[asyncio.Task[None]]:
    """Publish the audit log's head over MQTT (controller/audit_anchor.py), if MQTT is on.

    It only reads the audit file and listens to the service's events: when the
    publisher moves to its own process (issue 12), this goes with it.
    """
    settings = service.settings
    if not settings.mqtt.enabled:
        return []
    anchor = AuditAnchor(
        settings.state_dir / "audit.db", settings.clinic_id, service.controller_id, settings.mqtt
    )
    return [
        asyncio.create_task(anchor.run(), name="audit-anchor"),
        asyncio.create_task(anchor.follow(service), name="audit-anchor-events"),
    ]


async def run_until_signalled(service: ControllerService, users: UserStore | None = None) -> None:
    """Run the service (and the tablet API, if enabled) until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    api = service.settings.api
    server = None
    if api.enabled:
        if users is None:
            users = load_users(service.settings)
        if not users.users:
            log.warning("no API users: set api.users_file (or api.demo_users for a demo)")
        app = create_app(service, users, api, influx=_charts_influx(service.settings))
        # Bound before the pens connect: a taken port stops the start, not a session.
        try:
            server = ApiServer(app, api.host, api.port, api)
        except OSError:
            await service.stop()  # closes the journal and audit log it opened
            raise
    await service.start()
    log.info(
        "controller running", pens=list(service.pens), state_dir=str(service.settings.state_dir)
    )
    anchor_tasks = start_audit_anchor(service)
    try:
        if server is not None:
            await server.start()
            log.info("tablet API listening", url=server.url)
        await stop.wait()
    finally:
        for task in anchor_tasks:
            task.cancel()
        await asyncio.gather(*anchor_tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop()
        with contextlib.suppress(Exception):
            await service.stop()


def _charts_influx(settings: ServiceSettings) -> InfluxSettings:
    """Where the manager's charts are read from: the ``[influx]`` the ingest workers fill."""
    influx = settings.influx
    return InfluxSettings(
        url=influx.url,
        database=influx.database,
        username=influx.username,
        password=influx.password,
        token=influx.token,
        timeout=5.0,
    )
