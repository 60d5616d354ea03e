"""Structured logs for every penctl process: one configuration, chosen per command.

The safety core must never wait for its log reader: a log line written to a
pipe that nobody drains (a stalled journald, a paused ``docker logs``, a
terminal scrolled back) blocks the writer, and on the core's event loop that
would hold up every pen's Stop. ``configure_logging(..., background=True)``
(``penctl serve``) hands each line to a bounded queue that one thread writes
out; when the queue is full, lines are dropped and counted, and the next line
written says how many.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
import threading
from typing import Any, Final

import structlog

#: Lines waiting for the writer thread before new ones are dropped (~ a few MB).
QUEUE_LINES: Final = 10_000


class BackgroundStderr:
    """A file-like object whose ``write`` never blocks: a thread writes to stderr."""

    def __init__(self, max_lines: int = QUEUE_LINES) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue(max_lines)
        self._partial: list[str] = []  # print() writes a line and its end separately
        self._lock = threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._drain, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, text: str) -> int:
        """Queue whole lines for stderr; drop one (counted) if the writer is that far behind."""
        with self._lock:
            self._partial.append(text)
            if not text.endswith("\n"):
                return len(text)
            line = "".join(self._partial)
            self._partial.clear()
            try:
                self._lines.put_nowait(line)
            except queue.Full:
                self.dropped += 1
        return len(text)

    def flush(self) -> None:
        """Nothing to do here: the writer thread flushes after every line."""

    def close(self, timeout: float = 2.0) -> None:
        """Let the writer finish what is queued, for at most ``timeout`` seconds."""
        try:
            self._lines.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _drain(self) -> None:
        reported = 0
        while (text := self._lines.get()) is not None:
            try:
                if self.dropped != reported:
                    lost = self.dropped - reported
                    reported = self.dropped
                    note = {"event": "log lines dropped", "count": lost, "level": "warning"}
                    sys.stderr.write(json.dumps(note) + "\n")
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr closed or gone: nothing to tell anyone any more


def configure_logging(
    fmt: str = "json", level: int = logging.INFO, *, background: bool = False
) -> None:
    """structlog to stderr: JSON lines for services, colourless console for people.

    Records below ``level`` are dropped before any formatting work, which matters
    on the controller's event loop (the benchmarks run at WARNING). ``background``:
    lines leave through :class:`BackgroundStderr`, never blocking the caller.
    """
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    factory: Any = _stderr_logger
    if background:
        stream = BackgroundStderr()

        def factory(*_args: Any) -> structlog.WriteLogger:
            # One write per line (PrintLogger writes the line and its end apart): a
            # standard-library record from another thread cannot land in between.
            return structlog.WriteLogger(stream)  # type: ignore[arg-type]

        # The standard library's records too (asyncio's "Exception in callback", a
        # transport's fatal error when a cable is pulled): without a handler they go
        # to logging.lastResort, which writes to stderr on the caller's thread.
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_JsonFormatter() if fmt == "json" else _CONSOLE_FORMAT)
        logging.basicConfig(handlers=[handler], level=max(level, logging.WARNING), force=True)

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
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


_CONSOLE_FORMAT = logging.Formatter("%(asctime)s [%(levelname)-8s] %(name)s: %(message)s")


class _JsonFormatter(logging.Formatter):
    """A standard-library record as one JSON line, like structlog's (traceback inside)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "event": record.getMessage(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)
