"""``python -m controller.edge``: the edge process the safety core starts and supervises.

It serves the tablet API, publishes over MQTT and anchors the audit log (see
``runtime.py``), from what the core tells it over the channel's socket. It dies
with the core (Linux ``PR_SET_PDEATHSIG``): a core that was killed leaves no edge
behind to be confused with the next one's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

import structlog

from controller.api.auth import UsersFileError, UserStore
from controller.config import ServiceSettings
from controller.logs import configure_logging

from .runtime import Edge

log = structlog.get_logger(__name__)
_PR_SET_PDEATHSIG = 1
#: The edge yields the CPU to the safety core: on a busy machine the pens come first.
EDGE_NICENESS = 5


def _die_with(parent: int) -> None:
    """Receive SIGTERM when the parent dies; exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(0)


async def _run(settings: ServiceSettings, socket: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    users = UserStore.for_api(settings.api.users_file, demo_users=settings.api.demo_users)
    edge = Edge(settings, socket, users=users)
    try:
        await edge.start()
        log.info("edge running", socket=str(socket))
        await stop.wait()
    finally:
        await edge.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.edge", description=__doc__)
    parser.add_argument("--settings", type=Path, required=True, help="the core's settings (JSON)")
    parser.add_argument("--socket", type=Path, required=True, help="the core's channel socket")
    parser.add_argument("--parent", type=int, default=0, help="the core's process id")
    parser.add_argument("--log-format", choices=("json", "console"), default="console")
    args = parser.parse_args(argv)
    if args.parent:
        _die_with(args.parent)
    with contextlib.suppress(OSError):
        os.nice(EDGE_NICENESS)
    configure_logging(args.log_format)
    try:
        settings = ServiceSettings.model_validate_json(args.settings.read_text())
    except (OSError, ValueError) as exc:
        print(f"edge: cannot read the core's settings: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(settings, args.socket))
    except UsersFileError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the API port is taken, say
        print(f"edge: cannot serve: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
