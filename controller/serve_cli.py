"""``penctl serve``: run the controller for the configured pens until SIGINT/SIGTERM.

Configuration comes from ``--config FILE.toml`` and ``PENCTL_*`` environment
variables (see controller.config). A bad configuration stops the start with a
message naming every bad key, and exit status 2.
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

from .config import ConfigError, load_settings
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
        service = ControllerService(settings)
    except (ConfigError, PolicyError) as exc:
        print(f"penctl serve: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run_until_signalled(service))
    return 0


async def run_until_signalled(service: ControllerService) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    log.info(
        "controller running", pens=list(service.pens), state_dir=str(service.settings.state_dir)
    )
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await service.stop()
