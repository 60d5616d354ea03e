"""``penctl ingest``: run one ingest worker (MQTT shared subscription -> InfluxDB)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import ConfigError, describe_validation_error
from ..logs import configure_logging
from .settings import IngestSection, load_ingest_settings
from .worker import IngestError, IngestWorker


def register(subparsers: Any) -> None:
    """Add the ``ingest`` subcommand to penctl's parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ingest",
        help="write MQTT telemetry and events into InfluxDB",
        description=(
            "Subscribe to every clinic's telemetry, events and status through a shared "
            "subscription and write them to InfluxDB. Settings: TOML file plus PENCTL_ "
            "environment (PENCTL_MQTT__HOST, PENCTL_INFLUX__URL, PENCTL_INGEST__GROUP, ...)."
        ),
    )
    parser.add_argument("--config", type=Path, help="TOML file with [mqtt], [influx], [ingest]")
    parser.add_argument("--worker-id", help="stable id of this worker (default: host name)")
    parser.add_argument("--group", help="shared-subscription group (default: ingest)")
    parser.add_argument(
        "--retire",
        action="store_true",
        help="leave the group for good: drain this worker's broker session, then delete it",
    )
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console" if sys.stderr.isatty() else "json",
    )
    parser.set_defaults(handler=run_ingest)


def run_ingest(args: argparse.Namespace) -> int:
    """Handler of ``penctl ingest``: 0 after a clean stop, 1 on failure, 2 on bad config."""
    configure_logging(args.log_format)
    section: dict[str, Any] = {}
    if args.worker_id:
        section["worker_id"] = args.worker_id
    if args.group:
        section["group"] = args.group
    try:
        settings = load_ingest_settings(args.config)
        if section:  # flags beat the environment and the file
            try:
                ingest = IngestSection.model_validate({**settings.ingest.model_dump(), **section})
            except ValidationError as exc:
                raise ConfigError(describe_validation_error(exc, "command line")) from exc
            settings = settings.model_copy(update={"ingest": ingest})
    except ConfigError as exc:
        print(f"penctl ingest: {exc}", file=sys.stderr)
        return 2
    worker = IngestWorker(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await (worker.retire() if args.retire else worker.run())

    try:
        asyncio.run(main())
    except IngestError as exc:
        print(f"penctl ingest: {exc}", file=sys.stderr)
        return 1
    return 0
