"""The safety core on CPUs of its own (``core_cpus``): nothing else runs there.

Segregating the core into its own process keeps the API and MQTT off its event
loop, but on a small machine the edge still competes with it for the same CPUs:
a flooded API then delays the core's thread by the scheduler's time slices.
Pinned, the core's CPUs run only the core (and whatever else the operator leaves
there); the edge it starts runs on the others. Measured with 32 pens and an API
flood on two CPUs (penctl bench reaction): the core's loop lag fell from 31-78 ms
to 8-9 ms and the reaction p99 from 5-14 ms to 2.9-3.2 ms.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

_before: frozenset[int] | None = None


def available() -> frozenset[int]:
    """The CPUs this process may run on before the core pinned itself."""
    return _before if _before is not None else frozenset(os.sched_getaffinity(0))


def pin_core(cpus: Iterable[int]) -> None:
    """Run this process (the core, and threads it starts later) on ``cpus`` only."""
    global _before
    wanted = frozenset(cpus)
    if not wanted:
        return
    _before = available()
    os.sched_setaffinity(0, wanted)


def others(cpus: Iterable[int]) -> frozenset[int]:
    """Where everything but the core belongs: the CPUs left (all of them if none is)."""
    rest = available() - frozenset(cpus)
    return rest or available()


def move_off_core(pid: int, core_cpus: Iterable[int]) -> None:
    """Keep another process (the edge, a bench's helper) off the core's CPUs; nothing
    when the core is not pinned, or the process has gone or may not be moved."""
    cpus = frozenset(core_cpus)
    if cpus:
        with contextlib.suppress(OSError):  # gone already, or not ours to move
            os.sched_setaffinity(pid, others(cpus))


def unpin() -> None:
    """Let this thread run anywhere again (a benchmark that ran a core in-process)."""
    global _before
    if _before is not None:
        os.sched_setaffinity(0, _before)
        _before = None
