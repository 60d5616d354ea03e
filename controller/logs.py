"""Structured logs for every penctl process: one configuration, chosen per command."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """structlog to stderr: JSON lines for services, colourless console for people.

    Records below ``level`` are dropped before any formatting work, which matters
    on the controller's event loop (the benchmarks run at WARNING).
    """
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
