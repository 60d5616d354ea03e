"""The safety core's loop takes the interpreter back from its helper threads at once.

The core runs a few threads beside its event loop, so that nothing on the loop
waits for disk: the journal's writer, the WAL checkpointer, the log writer.
They share one interpreter lock. When a pen's frame wakes the loop while one of
them holds the lock, the loop waits until the holder lets go, and CPython asks a
holder to let go only after the switch interval (5 ms by default). So a commit
being prepared on the writer thread could delay a Stop by up to 5 ms. The core
asks for the lock back after ``CORE_SWITCH_INTERVAL_S`` instead; the cost is a
few more hand-overs per second between threads that rarely run at once.

ControllerService.start sets it, stop gives the previous one back.

Measured (penctl bench reaction, 32 pens, core on its own CPU, 30 s runs):
``reaction p99 (API flood)`` 3.1 and 3.6 ms with the default, 1.4 and 3.2 ms with
0.5 ms, 1.0-1.1 ms once the bench's pens also stopped sharing a CPU slice with
the edge (devtools/bench/fleet.py).
"""

from __future__ import annotations

import sys
from typing import Final

#: How long a thread that wants the interpreter waits before asking its holder for it.
CORE_SWITCH_INTERVAL_S: Final = 0.0005


def prefer_loop() -> float:
    """Shorten the switch interval for this process; the previous one, for ``restore``."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(CORE_SWITCH_INTERVAL_S)
    return previous


def restore(previous: float) -> None:
    """Put back the interval ``prefer_loop`` replaced (a benchmark's core has stopped)."""
    sys.setswitchinterval(previous)
