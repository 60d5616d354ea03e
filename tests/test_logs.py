"""The safety core's logs never wait for their reader (controller/logs.py)."""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import logging, structlog, sys, time
    from controller.logs import configure_logging
    configure_logging("json", background=True)
    log = structlog.get_logger("test")
    stdlib = logging.getLogger("asyncio")  # what asyncio's exception handler logs to
    started = time.monotonic()
    for i in range(50_000):  # ~4 MB: far more than a pipe holds
        log.info("line", number=i, padding="x" * 40)
        if i % 10 == 0:
            stdlib.error("Exception in callback %d", i)
    print(f"done {time.monotonic() - started:.3f}", flush=True)
    """
)


def test_logging_carries_on_while_nobody_reads_stderr() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # never read until the child has logged everything
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "the child blocked on its log writes"
        done = child.stdout.readline().decode()
        assert done.startswith("done"), done
        err = child.stderr.read().decode()  # the writer drains now, then the child exits
        assert child.wait(30) == 0
    finally:
        child.kill()
        child.wait()
    lines = err.splitlines()
    assert '"log lines dropped"' in err  # the reader was that far behind, and told
    assert all(line.startswith("{") and line.endswith("}") for line in lines), lines[:3]
    assert '"number": 0' in lines[0]
    assert '"event": "Exception in callback 0"' in err  # the standard library's too
