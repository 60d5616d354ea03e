"""``penctl serve``: run the controller for the configured pens until SIGINT/SIGTERM.

Two processes. This one is the safety core: the pens, the registry, the journal
and the audit log, alone on its event loop. It starts and supervises the edge
process (``python -m controller.edge``) when the tablet API or MQTT is enabled:
the API on ``api.host``:``api.port``, the MQTT publisher and the audit log's
anchor, all fed from the core over a local socket (README, Architecture).

Configuration comes from ``--config FILE.toml`` and ``PENCTL_*`` environment
variables (see controller.config). A bad configuration stops the start with a
message naming every bad key, and exit status 2; so does an API port already
taken (checked before the pens connect).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import structlog

from .api.auth import UsersFileError, UserStore
from .config import ConfigError, ServiceSettings, load_settings
from .edge.supervisor import EdgeSupervisor
from .logs import configure_logging
from .policy import PolicyError
from .service import WIND_DOWN_S, ControllerService

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
    configure_logging(args.log_format, background=True)
    try:
        settings = load_settings(args.config)
        # A broken users file stops the start here, not in a restarting edge.
        UserStore.for_api(settings.api.users_file, demo_users=settings.api.demo_users)
        check_api_port(settings)
        service = build_service(settings)
    except (ConfigError, PolicyError, UsersFileError) as exc:
        print(f"penctl serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"penctl serve: cannot serve the API: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run_until_signalled(service, log_format=args.log_format))
    return 0


def build_service(settings: ServiceSettings) -> ControllerService:
    """The safety core, with a channel for its edge only if it will start one: a channel
    nobody reads would keep every event it is told, unacknowledged, for good."""
    return ControllerService(settings, channel=settings.runs_edge)


def check_api_port(settings: ServiceSettings) -> None:
    """OSError if the API's port is taken (the edge would only retry in a loop)."""
    api = settings.api
    if not api.enabled or api.port == 0:
        return
    with socket.create_server((api.host, api.port), reuse_port=False):
        pass


async def run_until_signalled(service: ControllerService, *, log_format: str = "console") -> None:
    """Run the core, and its edge if the API or MQTT is on, until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    settings = service.settings
    edge = None
    if settings.runs_edge:
        edge = EdgeSupervisor(settings, service.socket_path, log_format=log_format)
        await edge.start()
    log.info(
        "controller running", pens=list(service.pens), state_dir=str(service.settings.state_dir)
    )
    try:
        await stop.wait()
    finally:
        # The pens go first, then the edge gets what is left to secure: stopped
        # earlier, it would lose what the channel still holds unacknowledged.
        if edge is not None:
            with contextlib.suppress(Exception):
                await service.wind_down(within=WIND_DOWN_S)
            with contextlib.suppress(Exception):
                await edge.stop()
        with contextlib.suppress(Exception):
            await service.stop()
