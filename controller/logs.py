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
        # Resolve sys.stderr at each call, not once: whoever replaced it since
        # (pytest's capture, a daemon's redirect) gets the lines, and a stream
        # closed in the meantime is never written to.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)
